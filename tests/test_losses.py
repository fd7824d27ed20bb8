import math

import pytest
import torch

from uprlhf.reward.losses import bradley_terry_loss, centering_penalty, mse_refinement_loss


def test_bradley_terry_matches_hand_values_on_single_model_rewards():
    # margins 1 and 0: -log σ(1) = log(1 + e^-1), -log σ(0) = log 2
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected)


def test_bradley_terry_compares_ensemble_means_on_member_rewards():
    # member means: chosen [1, 0], rejected [0, 0] -> same margins as above
    chosen = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    rejected = torch.tensor([[0.5, -0.5], [0.0, 0.0]])
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dc of mean(-log σ(c - r)) = -(1 - σ(c - r)) / B
    expected = -(1 - torch.sigmoid(torch.tensor([0.0, 1.0]))) / 2
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_bradley_terry_stays_finite_for_extreme_margins():
    chosen = torch.tensor([1e4, -1e4], requires_grad=True)
    rejected = torch.tensor([-1e4, 1e4])
    loss = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1e4)  # (0 + 2e4) / 2
    assert torch.isfinite(chosen.grad).all()


def test_bradley_terry_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3))


def test_bradley_terry_rejects_higher_rank_and_empty_batches():
    with pytest.raises(ValueError, match=r"\[B\] or \[B, K\]"):
        bradley_terry_loss(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="at least one"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))


def test_centering_penalty_is_the_mean_square_of_each_pairs_reward_sum():
    # pair sums 1 and 0 → (1 + 0) / 2; on [B, K] the mean runs over members too: sums 1, 0, 2, −2 → 9 / 4
    assert centering_penalty(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(0.5)
    assert centering_penalty(torch.tensor([[1.0, 0.0], [1.0, -1.0]]), torch.tensor([[0.0, 0.0], [1.0, -1.0]])).item() == pytest.approx(9 / 4)
    with pytest.raises(ValueError, match="one non-empty shape"):
        centering_penalty(torch.zeros(2), torch.zeros(3))


def test_mse_refinement_is_mean_squared_error_over_all_members():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    targets = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    # errors 0, 2, 0, 2 -> (0 + 4 + 0 + 4) / 4
    assert mse_refinement_loss(pred, targets).item() == pytest.approx(2.0)


def test_mse_refinement_gradient_flows_to_predictions():
    pred = torch.tensor([[1.0, 2.0]], requires_grad=True)
    mse_refinement_loss(pred, torch.tensor([[0.0, 0.0]])).backward()
    torch.testing.assert_close(pred.grad, torch.tensor([[1.0, 2.0]]))  # 2·err / N


def test_mse_refinement_rejects_mismatched_or_non_2d_inputs():
    with pytest.raises(ValueError, match="same shape"):
        mse_refinement_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        mse_refinement_loss(torch.zeros(3), torch.zeros(3))

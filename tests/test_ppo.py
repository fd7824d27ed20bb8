import math

import pytest
import torch

from uprlhf.rl.ppo import (
    AdaptiveKLController, RunningMean, explained_variance, gae, kl_estimate, kl_loss, policy_loss, token_rewards, value_loss,
    whiten,
)


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + values)


def test_gae_mask_ends_each_sequence_at_its_last_token():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.3, 9.0], [0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, ret = gae(rewards, values, 1.0, 1.0, mask)
    short, _ = gae(rewards[:1, :2], values[:1, :2], 1.0, 1.0)
    assert torch.allclose(adv[0, :2], short[0])
    assert adv[0, 2] == 0 and ret[0, 2] == 0
    # with gamma = lam = 1 the advantage is the return-to-go minus the value
    assert torch.allclose(adv[1], torch.tensor([1.0, 1.0, 1.0]) - values[1])


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    t = logp - ref
    assert torch.allclose(kl_estimate(logp, ref, "k1"), t)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), t.square() / 2)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(-t) - 1 + t)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; allowed: 'k1', 'k2', 'k3'"):
        kl_estimate(logp, ref, "k4")


# log π_θ - log π_ref per token: rows [0.1, 0.2, 0.3] and [0.4, -0.2, (5.0 on padding)]
KL_REF = torch.zeros(2, 3)
KL_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _kl_logp() -> torch.Tensor:
    return torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 5.0]], requires_grad=True)


def test_sequence_squared_kl_loss_is_up_rlhf_eq_15():
    logp = _kl_logp()
    loss = kl_loss(logp, KL_REF, KL_MASK, "sequence_sq")
    # sequence log-ratios 0.6 and 0.2 (padding left out); mean of squares (0.36 + 0.04) / 2, no ½
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    # d/dt of mean_b (Σ t)² = 2·S_b / B on each real token: 0.6 on row 0, 0.2 on row 1, 0 on padding
    torch.testing.assert_close(logp.grad, torch.tensor([[0.6, 0.6, 0.6], [0.2, 0.2, 0.0]]))


def test_per_token_kl_loss_is_the_masked_mean_of_the_estimator():
    # k2: ½t² = 0.005, 0.02, 0.045, 0.08, 0.02 over the 5 real tokens: 0.17 / 5
    assert kl_loss(_kl_logp(), KL_REF, KL_MASK, "per_token", "k2").item() == pytest.approx(0.034)
    # k1: (0.1 + 0.2 + 0.3 + 0.4 - 0.2) / 5
    assert kl_loss(_kl_logp(), KL_REF, KL_MASK, "per_token", "k1").item() == pytest.approx(0.16)
    with pytest.raises(ValueError, match="unknown KL loss form 'seq'"):
        kl_loss(_kl_logp(), KL_REF, KL_MASK, "seq")


def test_k3_is_unbiased_for_kl_under_sampling():
    torch.manual_seed(0)
    p = torch.distributions.Categorical(logits=torch.tensor([1.0, 0.0, -1.0]))
    q = torch.distributions.Categorical(logits=torch.tensor([0.0, 0.5, 0.0]))
    x = p.sample((200_000,))
    exact = torch.distributions.kl_divergence(p, q)
    for kind in ("k1", "k3"):
        assert kl_estimate(p.log_prob(x), q.log_prob(x), kind).mean().item() == pytest.approx(exact.item(), abs=5e-3)


def test_token_rewards_put_the_sequence_reward_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl = torch.full((2, 3), 0.1)
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl, mask)
    assert torch.allclose(rewards, torch.tensor([[-0.1, 0.9, 0.0], [-0.1, -0.1, 1.9]]))


def test_policy_loss_clips_large_ratios():
    old = torch.zeros(1, 2)
    adv = torch.ones(1, 2)
    mask = torch.ones(1, 2)
    loss, info = policy_loss(torch.full((1, 2), math.log(2.0)), old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert info["clip_fraction"] == 1.0
    loss, info = policy_loss(torch.zeros(1, 2), old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.0) and info["clip_fraction"] == 0.0


def test_value_loss_takes_the_worse_of_clipped_and_raw():
    old = torch.zeros(1, 1)
    returns = torch.ones(1, 1)
    mask = torch.ones(1, 1)
    # moving to 1.0 is clipped to 0.2, whose error (0.8² / 2) is the larger one
    assert value_loss(torch.ones(1, 1), old, returns, mask, clip=0.2).item() == pytest.approx(0.32)


def test_explained_variance_of_known_pairs_ignores_padding():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[0.0, 2.0, 4.0, 50.0]])
    # residuals -1, 0, 1: Var 2/3; Var[returns] = 8/3 -> 1 - 1/4
    assert explained_variance(torch.tensor([[1.0, 2.0, 3.0, -9.0]]), returns, mask) == pytest.approx(0.75)
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask) == pytest.approx(0.0)  # the mean return
    assert explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0)  # a zero value head
    # reversed: residuals -4, 0, 4, Var 32/3 -> 1 - 4
    assert explained_variance(torch.tensor([[4.0, 2.0, 0.0, 0.0]]), returns, mask) == pytest.approx(-3.0)
    assert explained_variance(torch.zeros(1, 4), torch.ones(1, 4), mask) == 0.0  # constant returns: nothing to explain


def test_whiten_ignores_padding():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = whiten(values, mask)
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)


def test_adaptive_kl_controller_moves_toward_target_and_restores():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(2.0, n_samples=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ctl.update(0.5, n_samples=10) < 0.1 * (1 + 0.2 * 0.1)
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    assert fixed.update(5.0, 10) == 0.1
    other = AdaptiveKLController(0.0, None, 1)
    other.load_state_dict(ctl.state_dict())
    assert other.coef == ctl.coef


def test_running_mean_covers_every_sample_and_restores():
    ubar = RunningMean()
    assert ubar.value == 0.0
    ubar.update(torch.tensor([1.0, 2.0]))
    assert ubar.update(torch.tensor([6.0])) == pytest.approx(3.0)
    again = RunningMean()
    again.load_state_dict(ubar.state_dict())
    assert again.value == pytest.approx(3.0) and again.count == 3

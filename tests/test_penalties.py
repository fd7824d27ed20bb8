import math

import pytest
import torch

import uprlhf.rl.penalties as penalties
from uprlhf.rl.penalties import PENALTIES, ensemble_stats, penalize, register_penalty

# rows [1, 2, 3] and [0, 0, 0]: m = [2, 0], u = [sqrt(2/3), 0], u² = [2/3, 0]
REWARDS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
U = math.sqrt(2 / 3)


def test_ensemble_stats_uses_population_std():
    mean, std = ensemble_stats(REWARDS)
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(std, torch.tensor([U, 0.0]))


def test_ensemble_stats_of_single_member_has_zero_std():
    _, std = ensemble_stats(torch.tensor([[1.5], [-2.0]]))
    torch.testing.assert_close(std, torch.zeros(2))


def test_mean_penalty_is_ensemble_mean():
    torch.testing.assert_close(penalize("mean", REWARDS), torch.tensor([2.0, 0.0]))


def test_lcb_subtracts_lam_times_std():
    torch.testing.assert_close(penalize("lcb", REWARDS), torch.tensor([2.0 - U, 0.0]))
    torch.testing.assert_close(penalize("lcb", REWARDS, lam=0.5), torch.tensor([2.0 - 0.5 * U, 0.0]))


def test_uwo_subtracts_lam_times_variance():
    torch.testing.assert_close(penalize("uwo", REWARDS), torch.tensor([2.0 - 2 / 3, 0.0]))
    torch.testing.assert_close(penalize("uwo", REWARDS, lam=3.0), torch.tensor([0.0, 0.0]))


def test_up_rlhf_centres_std_on_running_mean():
    shaped = penalize("up_rlhf", REWARDS, beta=2.0, running_mean=0.5)
    # m - 2·(u - 0.5) = [2 - 2u + 1, 0 + 1]
    torch.testing.assert_close(shaped, torch.tensor([3.0 - 2 * U, 1.0]))
    # ū may be any real and a 0-d tensor; a negative ū is allowed
    shaped = penalize("up_rlhf", REWARDS, beta=1.0, running_mean=torch.tensor(-1.0))
    # m - (u + 1) = [1 - u, -1]
    torch.testing.assert_close(shaped, torch.tensor([1.0 - U, -1.0]))


def test_var_kl_weights_log_ratio_by_variance():
    shaped = penalize("var_kl", REWARDS, beta=0.5, log_ratio=torch.tensor([3.0, 7.0]))
    # m - 0.5·u²·lr = [2 - 0.5·(2/3)·3, 0 - 0]
    torch.testing.assert_close(shaped, torch.tensor([1.0, 0.0]))


def test_registry_knows_coefficients_and_defaults():
    assert set(PENALTIES) >= {"mean", "lcb", "uwo", "up_rlhf", "var_kl"}
    assert PENALTIES["mean"].coefficients == ()
    assert dict(PENALTIES["lcb"].defaults) == {"lam": 1.0}
    assert PENALTIES["up_rlhf"].coefficients == ("beta", "running_mean")
    assert PENALTIES["var_kl"].required == ("log_ratio",)


def test_register_penalty_adds_a_new_penalty_from_one_function(monkeypatch):
    monkeypatch.setattr(penalties, "PENALTIES", dict(PENALTIES))

    @register_penalty("optimistic", non_negative=("c",))
    def _optimistic(mean, std, *, c=2.0):
        return mean + c * std

    torch.testing.assert_close(penalties.penalize("optimistic", REWARDS), torch.tensor([2.0 + 2 * U, 0.0]))
    with pytest.raises(ValueError, match="already registered"):
        register_penalty("optimistic")(_optimistic)
    assert "optimistic" not in PENALTIES


def test_unknown_penalty_lists_allowed_names():
    with pytest.raises(ValueError, match=r"unknown penalty 'nope'.*'lcb'.*'var_kl'"):
        penalize("nope", REWARDS)


@pytest.mark.parametrize("name, coefficient", [("lcb", "lam"), ("uwo", "lam"), ("up_rlhf", "beta")])
def test_negative_strength_is_rejected_by_name(name, coefficient):
    with pytest.raises(ValueError, match=f"'{coefficient}' must be >= 0"):
        penalize(name, REWARDS, **{coefficient: -0.1})


def test_nan_strength_is_rejected():
    with pytest.raises(ValueError, match="'lam' must be >= 0"):
        penalize("lcb", REWARDS, lam=float("nan"))


def test_negative_beta_is_rejected_for_var_kl():
    with pytest.raises(ValueError, match="'beta'"):
        penalize("var_kl", REWARDS, beta=-1.0, log_ratio=torch.zeros(2))


def test_unknown_coefficient_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown coefficient.*'beta'.*allowed: \['lam'\]"):
        penalize("lcb", REWARDS, beta=1.0)


def test_var_kl_requires_log_ratio_of_batch_shape():
    with pytest.raises(ValueError, match="requires coefficient.*'log_ratio'"):
        penalize("var_kl", REWARDS, beta=1.0)
    with pytest.raises(ValueError, match="log_ratio must be"):
        penalize("var_kl", REWARDS, log_ratio=torch.zeros(3))


def test_up_rlhf_rejects_non_scalar_running_mean():
    with pytest.raises(ValueError, match="running_mean"):
        penalize("up_rlhf", REWARDS, running_mean=torch.zeros(2))


def test_one_dimensional_member_rewards_are_rejected():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        penalize("mean", torch.tensor([1.0, 2.0]))


def test_penalize_in_run_passes_only_the_run_state_a_penalty_takes():
    from uprlhf.rl.penalties import penalize_in_run

    members = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # mean [2, 2], u [1, 0]
    log_ratio = torch.tensor([0.5, 0.5])
    up = penalize_in_run("up_rlhf", members, {"beta": 2.0}, running_mean=0.5, log_ratio=log_ratio)
    assert torch.allclose(up, torch.tensor([2.0 - 2.0 * 0.5, 2.0 + 2.0 * 0.5]))
    var = penalize_in_run("var_kl", members, {"beta": 1.0}, running_mean=0.5, log_ratio=log_ratio)
    assert torch.allclose(var, torch.tensor([2.0 - 0.5, 2.0]))
    lcb = penalize_in_run("lcb", members, {"lam": 1.0}, running_mean=0.5, log_ratio=log_ratio)
    assert torch.allclose(lcb, torch.tensor([1.0, 2.0]))

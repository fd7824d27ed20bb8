import math

import pytest
import torch

from uprlhf.rl.penalties import PENALTIES, ensemble_stats, penalize, penalize_in_run

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


# rows [0, 4] and [1, 1]: m = [2, 1], u = [2, 0], u² = [4, 0]
SPREAD = torch.tensor([[0.0, 4.0], [1.0, 1.0]])


def test_var_kl_weights_log_ratio_by_std_by_default_and_by_variance_with_power_2():
    log_ratio = torch.tensor([0.5, 3.0])
    # paper 002's experiments: m - β·σ·lr = [2 - 0.25·2·0.5, 1 - 0] = [1.75, 1]
    torch.testing.assert_close(penalize("var_kl", SPREAD, beta=0.25, log_ratio=log_ratio), torch.tensor([1.75, 1.0]))
    # its theorem: m - β·σ²·lr = [2 - 0.25·4·0.5, 1] = [1.5, 1]
    torch.testing.assert_close(penalize("var_kl", SPREAD, beta=0.25, power=2.0, log_ratio=log_ratio), torch.tensor([1.5, 1.0]))
    # on the 3-member rows: m - 0.5·u²·lr = [2 - 0.5·(2/3)·3, 0 - 0]
    shaped = penalize("var_kl", REWARDS, beta=0.5, power=2.0, log_ratio=torch.tensor([3.0, 7.0]))
    torch.testing.assert_close(shaped, torch.tensor([1.0, 0.0]))


def test_member_shapes_that_members_reward_with_the_whole_ensembles_std():
    # lcb of member 1: r_1 - 0.5·u = [4 - 0.5·2, 1 - 0]; of member 0: [0 - 1, 1]
    torch.testing.assert_close(penalize("lcb", SPREAD, lam=0.5, member=1), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(penalize("lcb", SPREAD, lam=0.5, member=0), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(penalize("mean", SPREAD, member=1), torch.tensor([4.0, 1.0]))
    # var_kl of member 0: r_0 - β·σ·lr = [0 - 0.25·2·0.5, 1]
    shaped = penalize_in_run("var_kl", SPREAD, {"beta": 0.25}, running_mean=0.0, log_ratio=torch.tensor([0.5, 3.0]), member=0)
    torch.testing.assert_close(shaped, torch.tensor([-0.25, 1.0]))
    # without a member, the ensemble mean as before
    torch.testing.assert_close(penalize("lcb", SPREAD, lam=0.5), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("member", [2, -1])
def test_a_member_outside_the_ensemble_is_refused(member):
    with pytest.raises(ValueError, match=rf"penalty 'lcb': member {member} is out of range for K = 2 members \(0 to 1\)"):
        penalize("lcb", SPREAD, member=member)


def test_every_penalty_but_mean_declares_it_needs_an_uncertainty():
    assert [n for n in PENALTIES.names() if not PENALTIES.get(n).needs_uncertainty] == ["mean"]


def test_registry_knows_coefficients_and_defaults():
    assert set(PENALTIES) >= {"mean", "lcb", "uwo", "up_rlhf", "var_kl"}
    assert PENALTIES["mean"].coefficients == ()
    assert dict(PENALTIES["lcb"].defaults) == {"lam": 1.0}
    assert PENALTIES["up_rlhf"].coefficients == ("beta", "running_mean")
    assert PENALTIES["var_kl"].required == ("log_ratio",)


@pytest.fixture
def throwaway():
    """Names registered in a test are removed again after it."""
    added: list[str] = []
    yield added
    for name in added:
        if name in PENALTIES:
            PENALTIES.unregister(name)


def test_register_penalty_adds_a_new_penalty_from_one_function(throwaway):
    throwaway.append("optimistic")

    @PENALTIES.register("optimistic", non_negative=("c",))
    def _optimistic(mean, std, *, c=2.0):
        return mean + c * std

    torch.testing.assert_close(penalize("optimistic", REWARDS), torch.tensor([2.0 + 2 * U, 0.0]))
    with pytest.raises(ValueError, match="penalty 'optimistic' is already registered"):
        PENALTIES.register("optimistic")(_optimistic)
    assert PENALTIES.get("optimistic").kl == "reward" and PENALTIES.get("optimistic").reads == ()


def test_registration_declares_kl_placement_and_run_state():
    assert PENALTIES.get("up_rlhf").kl == "loss" and PENALTIES.get("up_rlhf").reads == ("running_mean",)
    assert PENALTIES.get("var_kl").kl == "penalty" and PENALTIES.get("var_kl").reads == ("log_ratio",)
    assert all(PENALTIES.get(n).kl == "reward" and not PENALTIES.get(n).reads for n in ("mean", "lcb", "uwo"))
    assert PENALTIES.get("up_rlhf").configurable == ("beta",)
    assert PENALTIES.get("var_kl").configurable == ("beta", "power")


@pytest.mark.parametrize(
    "metadata, problem",
    [
        ({"kl": "both"}, "kl must be one of"),
        ({"reads": ("step",)}, "reads"),  # not a parameter, nor run state
        ({"reads": ("c",)}, "reads"),  # a parameter, but not run state
        ({"non_negative": ("d",)}, "non_negative"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_registrations_are_refused(metadata, problem):
    def _p(mean, std, *, c=1.0):
        return mean

    with pytest.raises(TypeError, match=problem):
        PENALTIES.register("bad", **metadata)(_p)
    assert "bad" not in PENALTIES


def test_member_is_no_coefficient_name():
    def _p(mean, std, *, member=0):
        return mean

    with pytest.raises(TypeError, match="'member' is reserved"):
        PENALTIES.register("bad", kl="reward")(_p)
    assert "bad" not in PENALTIES


def test_a_penalty_registered_with_kl_loss_moves_the_kl_into_the_loss(throwaway):
    from uprlhf.rl.config import RLConfig

    throwaway.append("loss_kl_probe")

    @PENALTIES.register("loss_kl_probe", kl="loss", reads=("running_mean",))
    def _probe(mean, std, *, running_mean=0.0):
        return mean - (std - running_mean)

    assert RLConfig(penalty={"name": "loss_kl_probe"}).kl_in_loss()
    assert not RLConfig(penalty={"name": "loss_kl_probe"}, kl={"placement": "reward"}).kl_in_loss()
    assert RLConfig(penalty={"name": "up_rlhf"}).kl_in_loss()
    assert RLConfig(penalty={"name": "mean"}, kl={"placement": "loss"}).kl_in_loss()
    # var_kl's own KL replaces the classic one: neither in the loss nor in the reward, unless asked for
    assert RLConfig(penalty={"name": "var_kl"}).kl_placement() == "penalty"
    assert not RLConfig(penalty={"name": "var_kl"}).kl_in_loss() and not RLConfig(penalty={"name": "var_kl"}).kl_in_reward()
    assert RLConfig(penalty={"name": "var_kl"}, kl={"placement": "reward"}).kl_in_reward()
    assert RLConfig(penalty={"name": "mean"}).kl_in_reward() and not RLConfig(penalty={"name": "up_rlhf"}).kl_in_reward()
    # its run state is not a configurable coefficient, and the run hands it over
    with pytest.raises(ValueError, match=r"has no coefficient\(s\) \['running_mean'\]"):
        RLConfig(penalty={"name": "loss_kl_probe", "coefficients": {"running_mean": 1.0}})
    shaped = penalize_in_run("loss_kl_probe", REWARDS, {}, running_mean=0.5, log_ratio=torch.zeros(2))
    torch.testing.assert_close(shaped, torch.tensor([2.0 - (U - 0.5), 0.5]))


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


def test_penalize_in_run_passes_only_the_run_state_a_penalty_reads():
    members = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # mean [2, 2], u [1, 0]
    log_ratio = torch.tensor([0.5, 0.5])
    up = penalize_in_run("up_rlhf", members, {"beta": 2.0}, running_mean=0.5, log_ratio=log_ratio)
    assert torch.allclose(up, torch.tensor([2.0 - 2.0 * 0.5, 2.0 + 2.0 * 0.5]))
    var = penalize_in_run("var_kl", members, {"beta": 1.0}, running_mean=0.5, log_ratio=log_ratio)
    assert torch.allclose(var, torch.tensor([2.0 - 0.5, 2.0]))
    lcb = penalize_in_run("lcb", members, {"lam": 1.0}, running_mean=0.5, log_ratio=log_ratio)
    assert torch.allclose(lcb, torch.tensor([1.0, 2.0]))

import math

import numpy as np
import pytest

from uprlhf.studies.bandit import (
    LOW_VARIABILITY,
    POLICIES,
    BanditConfig,
    l2_policies,
    results_table,
    simulate,
    tilted,
)

TINY = BanditConfig(arms=20, draws=300)


@pytest.mark.parametrize("form", ["l2", "kl"])
def test_simulation_is_deterministic_for_a_seed(form):
    cfg = TINY.replace(form=form)
    first, again, other = simulate(cfg, 3), simulate(cfg, 3), simulate(cfg, 4)
    for name in POLICIES:
        assert np.array_equal(first["returns"][name], again["returns"][name])
        assert first[name] == again[name]
        assert not np.array_equal(first["returns"][name], other["returns"][name])


def test_settings_of_one_seed_share_the_true_reward():
    high, low = simulate(TINY, 0), simulate(TINY.replace(variance_range=LOW_VARIABILITY), 0)
    assert np.array_equal(high["true_reward"], low["true_reward"])
    assert low["variance"].min() >= 70 and high["variance"].min() < 70


def test_l2_policies_match_the_papers_closed_forms_by_hand():
    # R̂ = (3, 4), σ² = (1, 4), ε = 1: π1 − π0 = R̂/5; Σ⁻¹R̂ = (3, 1), R̂ᵀΣ⁻¹R̂ = 13, λ_min = 1.
    vanilla, aware = l2_policies(np.array([[3.0, 4.0]]), np.array([1.0, 4.0]), 1.0)
    assert np.allclose(vanilla, [[0.6, 0.8]])
    assert np.allclose(aware, [[3 / math.sqrt(13), 1 / math.sqrt(13)]])
    assert (aware**2 * [1.0, 4.0]).sum() == pytest.approx(1.0)  # ‖d‖²_Σ = λ_min·ε


def test_tilting_reaches_the_kl_budget_by_hand():
    # two arms, mass 0.8 on the higher score: KL = 0.8 ln 1.6 + 0.2 ln 0.4.
    kl = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert np.allclose(tilted(np.array([[1.0, 0.0], [0.0, 3.0]]), kl), [[0.8, 0.2], [0.2, 0.8]])


def test_kl_policies_on_two_arms_put_the_matched_mass_on_the_arm_they_rank_first():
    # With two arms and KL fixed, each policy's return is 0.8·r*(its top arm) + 0.2·r*(the other).
    kl = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    out = simulate(BanditConfig(arms=2, draws=200, form="kl", budget=kl), 0)
    r = out["true_reward"]
    allowed = np.array([0.8 * r[0] + 0.2 * r[1], 0.2 * r[0] + 0.8 * r[1]])
    for name in POLICIES:
        returns = out["returns"][name]
        assert np.abs(returns[:, None] - allowed).min(1).max() < 1e-9
        assert out[name]["mean"] == pytest.approx(returns.mean()) and out[name]["std"] == pytest.approx(returns.std())
    assert out["reference_return"] == pytest.approx(r.mean())


def test_variance_aware_l2_policy_is_the_less_risky_one_when_variances_vary():
    """The paper's claim (Figs. 3–4) on its own settings: 1000 arms, σ² in (3, 100) or (70, 100)."""
    high = simulate(BanditConfig(), 0)
    low = simulate(BanditConfig(variance_range=LOW_VARIABILITY), 0)
    # This run: high 3.93 ± 0.95 (vanilla) vs 1.93 ± 0.32; low 3.07 ± 0.97 vs 2.83 ± 0.89.
    assert high["variance_aware"]["std"] < 0.5 * high["vanilla"]["std"]
    assert 0.8 * low["vanilla"]["std"] < low["variance_aware"]["std"] < low["vanilla"]["std"]
    assert high["variance_aware"]["mean"] < high["vanilla"]["mean"]  # the smaller Σ-ball also gives up return


def test_results_table_has_a_row_per_setting_form_and_policy():
    rows = results_table(0, BanditConfig(arms=50, draws=100))
    assert [(r["setting"], r["form"], r["policy"]) for r in rows[:4]] == [
        ("high", "l2", "vanilla"), ("high", "l2", "variance_aware"), ("high", "kl", "vanilla"), ("high", "kl", "variance_aware"),
    ]
    assert len(rows) == 8 and {"mean", "std", "p_below_reference", "reference"} <= set(rows[0])


@pytest.mark.parametrize("bad, match", [
    ({"arms": 1}, "greater than or equal to 2"), ({"variance_range": (5.0, 1.0)}, "variance_range"), ({"form": "kl", "budget": 3.0, "arms": 20}, "log\\(arms\\)"),
    ({"budget": 0.0}, "greater than 0"), ({"form": "l1"}, "form"),
])
def test_config_refuses_impossible_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        BanditConfig(**bad)

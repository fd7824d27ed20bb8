import math

import numpy as np
import pytest
import torch

from uprlhf.rl.gold_metrics import gold_at_kl, pairwise_win_rate, uncertainty_diagnostics, var_reward


def test_var_reward_is_the_population_variance():
    # mean 2; squared deviations 1, 1, 1, 1 over four responses -> 1 (the sample variance would be 4/3).
    assert var_reward([1.0, 3.0, 1.0, 3.0]) == pytest.approx(1.0)
    assert var_reward(torch.tensor([5.0])) == 0.0


@pytest.mark.parametrize("bad, match", [([], "empty"), ([[1.0, 2.0]], "1-D"), ([1.0, math.nan], "non-finite")])
def test_var_reward_refuses_what_has_no_variance(bad, match):
    with pytest.raises(ValueError, match=match):
        var_reward(bad)


def test_win_rate_counts_ties_as_half():
    # prompt 0: a wins; 1: b wins; 2: tie; 3: a wins -> (1 + 0 + 0.5 + 1) / 4.
    assert pairwise_win_rate([0.9, 0.1, 0.5, 0.3], [0.2, 0.4, 0.5, -1.0]) == pytest.approx(0.625)
    assert pairwise_win_rate(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5


def test_win_rate_refuses_arms_not_aligned_by_prompt():
    with pytest.raises(ValueError, match="aligned by prompt.*3 and 2"):
        pairwise_win_rate([1.0, 2.0, 3.0], [1.0, 2.0])


def test_gold_at_kl_interpolates_along_the_curve_sorted_by_kl():
    kls, golds = [2.0, 0.0, 1.0], [0.0, 1.0, 3.0]  # sorted: (0, 1), (1, 3), (2, 0)
    assert gold_at_kl(kls, golds, 0.5) == pytest.approx(2.0)
    assert gold_at_kl(kls, golds, 1.25) == pytest.approx(3.0 - 0.25 * 3.0)
    assert gold_at_kl(kls, golds, 2.0) == pytest.approx(0.0)


def test_gold_at_kl_is_none_outside_the_run_rather_than_extrapolated():
    assert gold_at_kl([0.0, 1.0], [1.0, 2.0], 1.5) is None
    assert gold_at_kl([0.5, 1.0], [1.0, 2.0], 0.1) is None
    assert gold_at_kl([math.nan], [1.0], 0.0) is None


def test_gold_at_kl_drops_missing_gold_and_averages_shared_kl():
    # step at KL 0.5 has no gold; the two points at KL 1 average to 3.
    assert gold_at_kl([0.0, 0.5, 1.0, 1.0], [1.0, math.nan, 2.0, 4.0], 0.5) == pytest.approx(2.0)


def test_gold_at_kl_refuses_bad_input():
    with pytest.raises(ValueError, match="aligned"):
        gold_at_kl([0.0, 1.0], [1.0], 0.5)
    with pytest.raises(ValueError, match="kl must be finite"):
        gold_at_kl([0.0, 1.0], [1.0, 2.0], math.nan)


# Proxy rises and gold falls with the index: samples 3, 4, 5 are above the proxy's median (3.5) and below gold's (3.5).
PROXY, GOLD, KL = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_u_that_ranks_every_hacked_sample_first_has_auroc_one_and_its_kl_rank_correlation():
    # u ranks 1 2 3 6 5 4 against KL's 1..6: Σd² = 8, ρ = 1 − 6·8 / (6·35) = 0.7714.
    figures = uncertainty_diagnostics([0.1, 0.2, 0.3, 0.6, 0.5, 0.4], KL, PROXY, GOLD)
    # Every sample above the proxy's median is hacked, so u cannot be asked to tell them apart there; the proxy
    # rises as KL does, so u's rank correlation with it is the same.
    assert figures == {"u_kl_spearman_samples": pytest.approx(1 - 48 / 210), "u_hacked_auroc": 1.0, "u_hacked_auroc_high_proxy": None,
                       "u_proxy_spearman": pytest.approx(1 - 48 / 210)}


def test_hacked_auroc_is_the_share_of_hacked_over_other_pairs_with_ties_as_half():
    # hacked u 0.2, 0.6, 0.4 against 0.1, 0.5, 0.3: 1 + 3 + 2 of 9 pairs.
    assert uncertainty_diagnostics([0.1, 0.5, 0.3, 0.2, 0.6, 0.4], KL, PROXY, GOLD)["u_hacked_auroc"] == pytest.approx(6 / 9)
    flat = uncertainty_diagnostics([0.3] * 6, KL, PROXY, GOLD)
    assert flat == {"u_kl_spearman_samples": None, "u_hacked_auroc": 0.5, "u_hacked_auroc_high_proxy": None, "u_proxy_spearman": None}


def test_u_that_only_follows_the_proxy_is_caught_by_the_auroc_within_the_high_proxy_half():
    """Gold 1 6 5 2 4 3 (median 3.5): samples 3 and 5 are hacked, 4 is the high-proxy sample gold also likes.
    Overall, hacked u 0.5, 0.1 beat only u 0.2 of four others: 1/8. Within the high half: 0.5 > 0.2, 0.1 < 0.2: ½."""
    figures = uncertainty_diagnostics([0.9, 0.9, 0.9, 0.5, 0.2, 0.1], KL, PROXY, [1.0, 6.0, 5.0, 2.0, 4.0, 3.0])
    assert figures["u_hacked_auroc"] == pytest.approx(1 / 8) and figures["u_hacked_auroc_high_proxy"] == pytest.approx(0.5)
    # u ranks 5 5 5 3 2 1 (ties share their mean rank) against 1..6: Σ products −15.5 over √(15.5 · 17.5)
    assert figures["u_proxy_spearman"] == pytest.approx(-15.5 / math.sqrt(15.5 * 17.5))


def test_uncertainty_diagnostics_are_none_without_hacked_samples_and_refuse_misaligned_input():
    assert uncertainty_diagnostics([0.1, 0.2, 0.3], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["u_hacked_auroc"] is None
    with pytest.raises(ValueError, match="aligned"):
        uncertainty_diagnostics([0.1, 0.2], [0.0, 1.0, 2.0], [1.0, 2.0], [1.0, 2.0])

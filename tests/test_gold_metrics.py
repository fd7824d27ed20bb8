import math

import numpy as np
import pytest
import torch

from uprlhf.rl.gold_metrics import gold_at_kl, pairwise_win_rate, var_reward


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

import math

import numpy as np
import pytest
import torch

from uprlhf.reward.metrics import expected_calibration_error, ood_auroc, preference_accuracy


def test_ece_matches_hand_worked_example():
    # Δ = [2, -2, 1, 0]; max|Δ| = 2, s = ln(99)/2.
    #   |Δ| = 2 -> c = σ(ln 99) = 0.99, bin 14 (twice; one correct, one not)
    #   |Δ| = 1 -> c = σ(ln √99) = √99/(1+√99) ≈ 0.9087, bin 12, correct
    #   |Δ| = 0 -> c = 0.5, bin 0, incorrect
    # ECE = 2/4·|0.5 - 0.99| + 1/4·|1 - √99/(1+√99)| + 1/4·|0 - 0.5|
    expected = 0.5 * 0.49 + 0.25 / (1 + math.sqrt(99)) + 0.25 * 0.5
    assert expected_calibration_error(torch.tensor([2.0, -2.0, 1.0, 0.0])) == pytest.approx(expected)


def test_ece_pools_confidences_that_share_a_bin():
    # n_bins = 1: ECE = |accuracy - mean confidence| = |1/4 - (0.99 + 3·0.5)/4|
    ece = expected_calibration_error([3.0, 0.0, 0.0, 0.0], n_bins=1)
    assert ece == pytest.approx(abs(0.25 - (0.99 + 1.5) / 4))


def test_ece_ranks_calibrated_below_overconfident():
    # every |Δ| is the max, so every confidence is 0.99
    calibrated = [1.0] * 99 + [-1.0]  # 99 % right at 99 % confidence
    overconfident = [1.0] * 50 + [-1.0] * 50  # 50 % right at 99 % confidence
    assert expected_calibration_error(calibrated) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(overconfident) == pytest.approx(0.49)


def test_ece_is_invariant_to_reward_scale():
    delta = torch.tensor([0.3, -0.1, 0.7, 0.05, -0.6])
    assert expected_calibration_error(delta * 100) == pytest.approx(expected_calibration_error(delta))


def test_ece_of_all_zero_margins_uses_confidence_one_half():
    # s is undefined: every c = 0.5 and no pair is correct -> ECE = 0.5
    assert expected_calibration_error(np.zeros(4)) == pytest.approx(0.5)


def test_ece_rejects_empty_input_and_bad_bins():
    with pytest.raises(ValueError, match="empty"):
        expected_calibration_error(torch.tensor([]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([1.0], n_bins=0)
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error([1.0, float("nan")])


def test_ece_accepts_tensors_that_require_grad():
    delta = torch.tensor([1.0, -1.0], requires_grad=True)
    assert expected_calibration_error(delta) == pytest.approx(0.49)


def test_preference_accuracy_counts_only_strictly_positive_margins():
    assert preference_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        preference_accuracy([])


def test_ood_auroc_is_one_when_ood_is_always_more_uncertain():
    assert ood_auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9])) == 1.0


def test_ood_auroc_is_zero_when_ordering_is_reversed():
    assert ood_auroc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0


def test_ood_auroc_is_one_half_for_identical_scores():
    assert ood_auroc([0.4, 0.4], [0.4, 0.4]) == pytest.approx(0.5)


def test_ood_auroc_rejects_an_empty_side():
    with pytest.raises(ValueError, match="uncertainty_ood"):
        ood_auroc([0.1], [])

"""Evaluation metrics for reward models: calibration, accuracy, OOD detection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _as_1d(values: ArrayLike, name: str) -> Tensor:
    """A detached float64 CPU copy of a non-empty, finite [N] input."""
    tensor = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def expected_calibration_error(reward_diff: ArrayLike, n_bins: int = 15) -> float:
    """ECE of reward margins Δ = r(y_w) - r(y_l), as defined in DESIGN §1.

    Δ is scaled by s = ln(99)/max|Δ| so the largest margin maps to confidence
    0.99, which makes the metric independent of each model's reward scale.
    Confidence c = σ(s·|Δ|) ∈ [0.5, 0.99], correct = 1[Δ > 0], and
    ECE = Σ_b (|B_b|/N)·|mean correct_b - mean c_b| over ``n_bins`` equal-width
    bins on [0.5, 1] (left-closed; the last bin also holds 1.0).

    When every Δ is 0, s is undefined; the model then expresses no preference,
    so every confidence is taken as 0.5 (and every pair counts as incorrect).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    delta = _as_1d(reward_diff, "reward_diff")
    margin = delta.abs()
    max_margin = margin.max()
    if max_margin > 0:
        confidence = torch.sigmoid(margin * (math.log(99.0) / max_margin))
    else:
        confidence = torch.full_like(delta, 0.5)
    correct = (delta > 0).to(torch.float64)

    inner_edges = torch.linspace(0.5, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidence, inner_edges, right=True)
    counts = torch.bincount(bins, minlength=n_bins).to(torch.float64)
    gap_sums = torch.bincount(bins, weights=correct - confidence, minlength=n_bins)
    # Σ_b (|B_b|/N)·|mean gap_b| = Σ_b |Σ gap_b| / N; empty bins contribute 0.
    return float(gap_sums.abs().sum() / counts.sum())


def preference_accuracy(reward_diff: ArrayLike) -> float:
    """Fraction of pairs where the chosen response gets the higher reward (Δ > 0)."""
    delta = _as_1d(reward_diff, "reward_diff")
    return float((delta > 0).to(torch.float64).mean())


def ood_auroc(uncertainty_in: ArrayLike, uncertainty_ood: ArrayLike) -> float:
    """AUROC of the uncertainty as a detector of out-of-distribution inputs.

    OOD samples are the positives: 1.0 means every OOD sample is more uncertain
    than every in-distribution one, 0.5 means the uncertainty carries no signal.
    """
    from sklearn.metrics import roc_auc_score  # here, not at the top: ~1 s of import in every scorer and selector actor

    scores_in = _as_1d(uncertainty_in, "uncertainty_in").numpy()
    scores_ood = _as_1d(uncertainty_ood, "uncertainty_ood").numpy()
    labels = np.concatenate([np.zeros(len(scores_in)), np.ones(len(scores_ood))])
    return float(roc_auc_score(labels, np.concatenate([scores_in, scores_ood])))

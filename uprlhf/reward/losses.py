"""Training losses for the reward-model ensemble (DESIGN §1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean of -log σ(chosen - rejected), the Bradley–Terry preference loss.

    Rewards are [B] for one model or [B, K] for an ensemble; with K members the
    ensemble means are compared, so the whole ensemble is trained as one predictor.
    ``F.logsigmoid`` keeps the loss finite for any reward margin.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must have the same shape, got {tuple(chosen.shape)} "
            f"and {tuple(rejected.shape)}"
        )
    if chosen.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(chosen.shape)}")
    if chosen.shape[0] == 0:
        raise ValueError("bradley_terry_loss needs at least one preference pair")
    if chosen.dim() == 2:
        chosen, rejected = chosen.mean(dim=1), rejected.mean(dim=1)
    return -F.logsigmoid(chosen - rejected).mean()


def centering_penalty(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean of (r⁺ + r⁻)² over pairs (and members, for [B, K]): zero when each pair's rewards sit
    symmetrically about 0, the reward-centring regulariser of Eisenstein et al. (2023)."""
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"chosen and rejected must have one non-empty shape, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    return ((chosen + rejected) ** 2).mean()


def mse_refinement_loss(pred: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error between member rewards [N, K] and their relabelled targets.

    Refinement (DESIGN §1, step 4) regresses each member onto expert labels
    projected to that member's own reward scale, so the targets are per member.
    """
    if pred.shape != targets.shape:
        raise ValueError(
            f"pred and targets must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if pred.dim() != 2:
        raise ValueError(f"pred must be [N, K], got shape {tuple(pred.shape)}")
    if pred.numel() == 0:
        raise ValueError("mse_refinement_loss needs at least one target")
    return F.mse_loss(pred, targets)


def member_bradley_terry_loss(chosen: Tensor, rejected: Tensor, weights: Tensor | None = None) -> Tensor:
    """Bradley–Terry loss of each member on its own, averaged over the K members.

    Unlike ``bradley_terry_loss`` on [B, K], members do not share a prediction, so
    each learns the preferences independently (independent, linear, frozen-head
    and LoRA ensembles). ``weights`` [B, K] (e.g. bootstrap counts) weigh pairs
    per member.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 2:
        raise ValueError(
            f"chosen and rejected must both be [B, K], got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    per_pair = -F.logsigmoid(chosen - rejected)
    if weights is None:
        return per_pair.mean()
    if weights.shape != per_pair.shape:
        raise ValueError(f"weights must be {tuple(per_pair.shape)}, got {tuple(weights.shape)}")
    return ((per_pair * weights).sum(0) / weights.sum(0).clamp_min(1e-8)).mean()

"""Quantile projection: expert labels on a 1-5 scale become regression targets per member.

An expert's 1-5 scale and each member's reward scale are unrelated, so label j is
mapped onto the j-th quintile of the member's own reward distribution: the refined
member keeps its scale, and only the ordering the expert gave is learnt.
"""

from __future__ import annotations

import torch
from torch import Tensor

LABELS = range(1, 6)


def quantile_targets(
    labels: Tensor,
    member_rewards: Tensor,
    noise_std: float = 0.01,
    *,
    reference: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Targets [N, K]: label j of member k is ``quantile(reward_k, 0.2 * j)`` plus N(0, noise_std²).

    ``labels`` [N] in 1..5; ``member_rewards`` [N, K]. The quantiles are taken over
    ``reference`` [M, K] when given (the selector passes every candidate row of the round), else over
    ``member_rewards`` itself. The noise keeps samples with equal labels from
    collapsing onto one value; ``noise_std=0`` gives the exact quantiles.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or member_rewards.ndim != 2 or labels.shape[0] != member_rewards.shape[0]:
        raise ValueError(f"labels must be [N] and member_rewards [N, K]; got {tuple(labels.shape)} and {tuple(member_rewards.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError("labels must be integers in 1..5")
    bad = (labels < LABELS.start) | (labels >= LABELS.stop)
    if bad.any():
        raise ValueError(f"labels must be in 1..5; got {sorted(set(labels[bad].tolist()))}")
    source = (member_rewards if reference is None else reference).float()
    if source.shape[1] != member_rewards.shape[1]:
        raise ValueError(f"reference has {source.shape[1]} members, member_rewards {member_rewards.shape[1]}")
    levels = torch.tensor([0.2 * j for j in LABELS], dtype=source.dtype)
    quintiles = torch.quantile(source, levels, dim=0)  # [5, K]
    targets = quintiles[labels.long() - 1]
    if noise_std > 0:
        targets = targets + noise_std * torch.randn(targets.shape, generator=generator, dtype=targets.dtype)
    return targets

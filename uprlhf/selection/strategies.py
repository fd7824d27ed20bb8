"""Selection strategies over the same labelling budget: UGDA and its ablations (DESIGN §1).

Every strategy labels ⌊⌊N·γ⌉·η⌉ (halves up) of N candidates, so the comparison is
at equal cost; only which samples are chosen differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from uprlhf.registry import Registry

InfluenceFn = Callable[[list[int]], Tensor]  # candidate indices → influence scores, one each


@dataclass
class Budget:
    """How many candidates the uncertainty filter keeps, and how many are finally labelled."""

    filtered: int
    selected: int

    @classmethod
    def of(cls, n: int, gamma: float, eta: float) -> Budget:
        filtered = max(1, int(n * gamma + 0.5)) if n else 0  # halves round up
        return cls(filtered, max(1, int(filtered * eta + 0.5)) if filtered else 0)


Strategy = Callable[[Tensor, Budget, InfluenceFn, torch.Generator], list[int]]
# ``@STRATEGIES.register("name")`` on ``fn(variance, budget, influence, generator) -> indices``.
STRATEGIES: Registry[Strategy] = Registry("selection strategy")


def _top(values: Tensor, k: int) -> list[int]:
    """Indices of the k largest values; ties broken by position, so selection is deterministic."""
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return order[:k]


@STRATEGIES.register("ugda")
def uncertainty_then_influence(variance: Tensor, budget: Budget, influence: InfluenceFn, gen: torch.Generator) -> list[int]:
    """Keep the most uncertain γ, then the most influential η of those."""
    uncertain = _top(variance, budget.filtered)
    scores = influence(uncertain)
    return [uncertain[i] for i in _top(scores, budget.selected)]


@STRATEGIES.register("uncertainty")
def uncertainty_only(variance: Tensor, budget: Budget, influence: InfluenceFn, gen: torch.Generator) -> list[int]:
    """Ablation: the most uncertain samples, no influence."""
    return _top(variance, budget.selected)


@STRATEGIES.register("influence")
def influence_only(variance: Tensor, budget: Budget, influence: InfluenceFn, gen: torch.Generator) -> list[int]:
    """Ablation: the most influential of all candidates, no uncertainty filter."""
    everything = list(range(len(variance)))
    return _top(influence(everything), budget.selected)


@STRATEGIES.register("random")
def uniform(variance: Tensor, budget: Budget, influence: InfluenceFn, gen: torch.Generator) -> list[int]:
    """Baseline: the same budget drawn uniformly at random."""
    return torch.randperm(len(variance), generator=gen)[: budget.selected].tolist()

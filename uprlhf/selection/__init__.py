"""Reward refinement: choose which of the policy's samples to relabel, and refine the ensemble on them."""

from uprlhf.selection.influence import influence_scores
from uprlhf.selection.targets import quantile_targets

__all__ = ["influence_scores", "quantile_targets"]

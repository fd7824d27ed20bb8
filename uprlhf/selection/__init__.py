"""Reward refinement: choose which of the policy's samples to relabel, and refine the ensemble on them."""

from importlib import import_module

__all__ = ["influence_scores", "quantile_targets"]
_HOMES = {"influence_scores": "uprlhf.selection.influence", "quantile_targets": "uprlhf.selection.targets"}


def __getattr__(name: str):
    # Imported on first use, so that the light ``uprlhf.selection.config`` does not pull in torch.
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

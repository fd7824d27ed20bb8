"""uprlhf: RLHF whose reward is an ensemble, so every reward carries an uncertainty, and the uncertainty is used.

The library is laid out by domain: ``uprlhf.data`` (loaders, the embedded task, gold
scorers), ``uprlhf.reward`` (ensembles, their training, losses, evaluation, metrics),
``uprlhf.rl`` (PPO maths, policy, learner, rollout, scoring, weight sync, penalties,
alarm, best-of-n, replay, run state) and ``uprlhf.selection`` (strategies, influence,
labelers, refinement). The functions below are the public maths, importable from here;
they load on first use, so importing ``uprlhf`` stays cheap and cycle-free.
"""

from __future__ import annotations

from importlib import import_module

_PUBLIC = {
    "bradley_terry_loss": "uprlhf.reward.losses",
    "nuclear_diversity": "uprlhf.reward.ensembles",
    "expected_calibration_error": "uprlhf.reward.metrics",
    "penalize": "uprlhf.rl.penalties",
    "gae": "uprlhf.rl.ppo",
    "kl_estimate": "uprlhf.rl.ppo",
    "quantile_targets": "uprlhf.selection.targets",
    "influence_scores": "uprlhf.selection.influence",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'uprlhf' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)

"""Advantage estimators: one registry, ``ppo.estimator`` names the one the learner uses.

An estimator is ``fn(rewards, values, mask, cfg) -> (advantages, returns)`` over the
per-token rewards [B, T], the old values [B, T] and the response mask [B, T], with
``cfg`` the run's ``PPOConfig`` (γ, λ, ...). GAE, the reference algorithm of the
papers, is the first; critic-free estimators (RLOO, group baselines) register the
same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from uprlhf.registry import Registry
from uprlhf.rl.ppo import gae

if TYPE_CHECKING:
    from uprlhf.rl.config import PPOConfig

AdvantageEstimator = Callable[[Tensor, Tensor, Tensor, "PPOConfig"], tuple[Tensor, Tensor]]

# ``@ADVANTAGE_ESTIMATORS.register("name")`` on ``fn(rewards, values, mask, cfg) -> (advantages, returns)``.
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("gae")
def _gae(rewards: Tensor, values: Tensor, mask: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with the config's γ and λ (``uprlhf.rl.ppo.gae``)."""
    return gae(rewards, values, cfg.gamma, cfg.lam, mask)

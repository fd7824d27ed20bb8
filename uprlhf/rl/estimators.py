"""Advantage estimators: one registry, ``ppo.estimator`` names the one the learner uses.

An estimator is ``fn(rewards, values, mask, groups, cfg) -> (advantages, returns)`` over
the per-token rewards [B, T] (the shaped sequence reward on the last token, minus any
in-reward KL), the old values [B, T], the response mask [B, T] and the prompt-group id
of every row [B] (the ``ppo.samples_per_prompt`` samples of one prompt share an id),
with ``cfg`` the run's ``PPOConfig`` (γ, λ, ...). Its registration says what the learner
does around it: ``critic`` (whether the value head is trained: a critic-free estimator
leaves it frozen and adds no value loss), ``min_group`` (samples per prompt it needs)
and ``whiten`` (whether the entry whitens the advantages over the batch it gets, a
learner rank's shard: the PPO convention). GAE, the reference algorithm of the papers,
is the default; GRPO, RLOO and REINFORCE++-baseline are critic-free: each compares a
response's sequence return R_i = Σ_t r_{i,t} with the other samples of its prompt, and
puts the one advantage on every response token (outcome supervision, no γ); their
returns are R_i on every response token, read only by the ``return_mean`` statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from uprlhf.registry import Registry
from uprlhf.rl.ppo import gae, whiten

if TYPE_CHECKING:
    from uprlhf.rl.config import PPOConfig

EstimatorFn = Callable[[Tensor, Tensor, Tensor, Tensor, "PPOConfig"], tuple[Tensor, Tensor]]

GROUP_STD_EPS = 1e-6  # GRPO's ε: a group of equal rewards gets advantage 0, not 0/0


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator and what the learner does around it (see the module docstring)."""

    name: str
    fn: EstimatorFn
    critic: bool = True
    min_group: int = 1
    whiten: bool = True

    @classmethod
    def of(cls, name: str, fn: EstimatorFn, *, critic: bool = True, min_group: int = 1, whiten: bool = True) -> AdvantageEstimator:
        if min_group < 1:
            raise ValueError(f"advantage estimator {name!r}: min_group must be >= 1, got {min_group}")
        return cls(name, fn, critic, min_group, whiten)

    def __call__(self, rewards: Tensor, values: Tensor, mask: Tensor, groups: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
        """(advantages as the policy loss takes them, returns): whitened over the batch where registered so."""
        advantages, returns = self.fn(rewards, values, mask, groups, cfg)
        return (whiten(advantages, mask) if self.whiten else advantages), returns


# ``@ADVANTAGE_ESTIMATORS.register("name", critic=..., min_group=..., whiten=...)`` on
# ``fn(rewards, values, mask, groups, cfg) -> (advantages, returns)``.
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator", make=AdvantageEstimator.of)


def group_ids(size: int, n: int) -> Tensor:
    """The group id of each row of a batch that holds ``n`` consecutive samples of each prompt."""
    return torch.arange(size) // n


def repeat_prompts(prompts: list[str], n: int) -> list[str]:
    """Each prompt ``n`` times in a row: the rows ``group_ids(len(prompts) * n, n)`` numbers."""
    return [prompt for prompt in prompts for _ in range(n)]


def sequence_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """R_i [B]: the sum of a response's token rewards (shaped reward plus any in-reward KL term)."""
    return (rewards * mask).sum(1)


def group_stats(values: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's group index [B], and per group: its size, the mean and the sample std (n − 1) of ``values``."""
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    counts = counts.to(values.dtype)
    means = values.new_zeros(len(counts)).index_add_(0, index, values) / counts
    squares = values.new_zeros(len(counts)).index_add_(0, index, (values - means[index]).square())
    return index, counts, means, (squares / (counts - 1).clamp(min=1)).sqrt()


def group_reward_std(rewards: Tensor, mask: Tensor, groups: Tensor) -> float:
    """The mean over groups of the sample std of R_i within the group: 0 means no group has a signal to compare."""
    return float(group_stats(sequence_returns(rewards, mask), groups)[3].mean())


def _grouped(name: str, rewards: Tensor, mask: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """R_i and, per row, its group's size, mean and std; a group below the estimator's ``min_group`` is a ValueError."""
    returns = sequence_returns(rewards, mask)
    index, counts, means, stds = group_stats(returns, groups)
    need = ADVANTAGE_ESTIMATORS.get(name).min_group
    if counts.min() < need:
        raise ValueError(f"advantage estimator {name!r} needs >= {need} samples per prompt group; the smallest has {int(counts.min())}")
    return returns, counts[index], means[index], stds[index]


def _per_token(advantage: Tensor, returns: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The sequence advantage on every response token, and R_i there as the return (no value loss reads it)."""
    return advantage[:, None] * mask, returns[:, None] * mask


@ADVANTAGE_ESTIMATORS.register("gae")
def _gae(rewards: Tensor, values: Tensor, mask: Tensor, groups: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with the config's γ and λ (``uprlhf.rl.ppo.gae``); groups play no part."""
    return gae(rewards, values, cfg.gamma, cfg.lam, mask)


@ADVANTAGE_ESTIMATORS.register("grpo", critic=False, min_group=2, whiten=False)
def _grpo(rewards: Tensor, values: Tensor, mask: Tensor, groups: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """GRPO (DeepSeekMath, outcome supervision): A_i = (R_i − mean_g R) / (std_g R + ε), already normalised per group."""
    returns, _, means, stds = _grouped("grpo", rewards, mask, groups)
    return _per_token((returns - means) / (stds + GROUP_STD_EPS), returns, mask)


@ADVANTAGE_ESTIMATORS.register("rloo", critic=False, min_group=2, whiten=False)
def _rloo(rewards: Tensor, values: Tensor, mask: Tensor, groups: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """RLOO: A_i = R_i − mean_{j≠i} R_j = n/(n − 1)·(R_i − mean_g R), the baseline free of the sample itself."""
    returns, counts, means, _ = _grouped("rloo", rewards, mask, groups)
    return _per_token(counts / (counts - 1) * (returns - means), returns, mask)


@ADVANTAGE_ESTIMATORS.register("reinforce_baseline", critic=False, min_group=2, whiten=True)
def _reinforce_baseline(rewards: Tensor, values: Tensor, mask: Tensor, groups: Tensor, cfg: PPOConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (OpenRLHF's reinforce_baseline): A_i = R_i − mean_g R, then whitened over the batch (``whiten``)."""
    returns, _, means, _ = _grouped("reinforce_baseline", rewards, mask, groups)
    return _per_token(returns - means, returns, mask)

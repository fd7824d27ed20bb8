"""RewardScorer: a Ray role over ``uprlhf.rl.scoring.EnsembleScorer`` (ensemble + reference policy + extra rules)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actors import timed
from actors.group import dispatch, first
from uprlhf.config import ExtraReward, PolicyConfig
from uprlhf.rl.policy import SampledBatch
from uprlhf.rl.scoring import EnsembleScorer


class RewardScorer:
    def __init__(
        self, checkpoint: str, version: int, policy: PolicyConfig, max_length: int, temperature: float, threads: int,
        device: str = "cpu", extra_rewards: Sequence[ExtraReward] = (), normalise: bool = False,
    ):
        torch.set_num_threads(threads)
        self.scorer = EnsembleScorer(checkpoint, policy, max_length=max_length, temperature=temperature, device=device,
                                     extra_rewards=extra_rewards, normalise=normalise)
        self.scorer.version = version

    @dispatch(gather=first, timed=True)
    def score(self, batch: SampledBatch, step: int | None = None) -> tuple[dict, float]:
        return timed(self.scorer.score, batch, step)

    @dispatch(gather=first, timed=True)
    def member_rewards(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, float]:
        return timed(self.scorer.member_rewards, prompts, responses)

    @dispatch(gather=first, timed=True)
    def load_ensemble(self, checkpoint: str, version: int) -> tuple[None, float]:
        return timed(self.scorer.load_ensemble, checkpoint, version)

    def version(self) -> int:
        return self.scorer.version

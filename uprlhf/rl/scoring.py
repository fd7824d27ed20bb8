"""The reward side of a step: ensemble member rewards, the frozen reference policy's log-probs, and the rules beside the ensemble.

Reward models read text, not the policy's token ids: each response is decoded
and re-encoded with the reward model's own tokenizer, so a policy and a reward
model with different vocabularies work together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from uprlhf.rl.config import ExtraReward, PolicyConfig
from uprlhf.reward.ensembles import MANIFEST, RewardEnsemble, member_stats_problem
from uprlhf.models import load_policy
from uprlhf.rl.extra_rewards import ExtraRewards
from uprlhf.rl.penalties import ensemble_stats
from uprlhf.rl.policy import SampledBatch, forward_logprobs
from uprlhf.reward.evaluation import score_texts
from uprlhf.reward.training import TOKENIZER_DIR


def check_reward_checkpoint(path: str | Path, kind: str, k: int, normalise: bool = False) -> list[str]:
    """Problems with a reward checkpoint folder, before anything loads it."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        return [f"{path}: not a reward ensemble checkpoint (no {MANIFEST}); train one with jobs.train_reward"]
    manifest = json.loads(manifest_path.read_text())
    problems = []
    if manifest.get("kind") != kind:
        problems.append(f"{manifest_path}: kind is {manifest.get('kind')!r} but reward_kind={kind!r}")
    if manifest.get("k") != k:
        problems.append(f"{manifest_path}: K is {manifest.get('k')} but reward_k={k}")
    if not (Path(path) / TOKENIZER_DIR).exists():
        problems.append(f"{path}: no {TOKENIZER_DIR}/ folder (the reward models' tokenizer)")
    problem = member_stats_problem(path) if normalise else None
    return problems + ([problem] if problem else [])


class EnsembleScorer:
    """Scores responses with every member of a reward ensemble, the reference policy and the extra reward rules."""

    def __init__(
        self, checkpoint: str | Path, policy: PolicyConfig, *, max_length: int, temperature: float, device: str = "cpu",
        extra_rewards: Sequence[ExtraReward] = (), normalise: bool = False,
    ):
        from transformers import AutoTokenizer

        self.device = torch.device(device)
        self.normalise = normalise
        self.ensemble = RewardEnsemble.load(checkpoint, normalise=normalise).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(Path(checkpoint) / TOKENIZER_DIR)
        self.reference = load_policy(policy.model).to(self.device).eval().requires_grad_(False)
        self.max_length = max_length
        self.temperature = temperature
        self.extras = ExtraRewards(extra_rewards)
        self.version = 0

    def load_ensemble(self, checkpoint: str | Path, version: int) -> None:
        """Swap in a refined ensemble (the selector publishes new versions)."""
        self.ensemble = RewardEnsemble.load(checkpoint, normalise=self.normalise).to(self.device).eval()
        self.version = version

    def member_rewards(self, prompts: list[str], responses: list[str]) -> Tensor:
        """[B, K] rewards, all members in one forward where the ensemble kind allows."""
        return score_texts(self.ensemble, self.tokenizer, prompts, responses, max_length=self.max_length).cpu()

    @torch.inference_mode()
    def reference_logprobs(self, batch: SampledBatch) -> Tensor:
        logp, _ = forward_logprobs(self.reference, batch.to(self.device), self.temperature)
        return logp.cpu()

    def score(self, batch: SampledBatch, step: int | None = None) -> dict:
        """Member rewards, reference log-probs and, for a training step (``step`` given), every extra rule's values.

        The gold evaluation scores without a step: it reads the ensemble alone.
        """
        rewards = self.member_rewards(batch.prompts, batch.responses)
        extras = {} if step is None else self.extras(batch.prompts, batch.responses, step)
        return {"member_rewards": rewards, "ref_logprobs": self.reference_logprobs(batch), "extra_rewards": extras}


@dataclass
class ScoredBatch:
    """A sampled batch with its scores, and what every consumer derives from them, computed once.

    ``mean`` and ``std`` are the ensemble mean m and population std u per sample [B];
    ``log_ratio`` is the sequence log π_sampler/π_ref summed over response tokens [B];
    ``extra_rewards`` holds each extra rule's unweighted values [B] by name.
    """

    sampled: SampledBatch
    member_rewards: Tensor  # [B, K]
    ref_logprobs: Tensor  # [B, T]
    extra_rewards: dict[str, Tensor] = field(default_factory=dict)
    mean: Tensor = field(init=False)
    std: Tensor = field(init=False)
    log_ratio: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.mean, self.std = ensemble_stats(self.member_rewards)
        self.log_ratio = ((self.sampled.logprobs - self.ref_logprobs) * self.sampled.response_mask).sum(1)

    @classmethod
    def of(cls, sampled: SampledBatch, scores: dict[str, Tensor]) -> ScoredBatch:
        return cls(sampled, scores["member_rewards"], scores["ref_logprobs"], scores["extra_rewards"])

"""RolloutWorker: a Ray actor over a ``uprlhf.rollout`` engine (hf on CPU, vllm on GPU)."""

from __future__ import annotations

import ray
import torch

from actors import timed
from uprlhf.config import PolicyConfig, RolloutConfig
from uprlhf.policy import SampledBatch
from uprlhf.rollout import make_rollout_engine


@ray.remote
class RolloutWorker:
    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, threads: int):
        torch.set_num_threads(threads)
        self.engine = make_rollout_engine(policy, rollout)

    def generate(self, prompts: list[str], seed: int) -> tuple[SampledBatch, float]:
        return timed(self.engine.generate, prompts, seed)

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> tuple[None, float]:
        return timed(self.engine.load_weights, weights, version)

    def version(self) -> int:
        return self.engine.version

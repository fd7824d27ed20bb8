"""RolloutWorker: a Ray actor over a ``uprlhf.rl.rollout`` engine (hf on CPU, vllm on GPU)."""

from __future__ import annotations

import ray
import torch

from actors import timed
from uprlhf.config import PolicyConfig, RolloutConfig
from uprlhf.rl.policy import SampledBatch
from uprlhf.rl.rollout import make_rollout_engine
from uprlhf.rl.weight_sync import Layout, open_group


@ray.remote
class RolloutWorker:
    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, threads: int):
        torch.set_num_threads(threads)
        self.engine = make_rollout_engine(policy, rollout)
        self.group = None  # the weight-sync group, when weights are broadcast

    def generate(self, prompts: list[str], seed: int) -> tuple[SampledBatch, float]:
        return timed(self.engine.generate, prompts, seed)

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> tuple[None, float]:
        return timed(self.engine.load_weights, weights, version)

    def join_sync_group(self, address: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self.group = open_group(address, port, rank, world_size, backend)

    def receive_weights(self, layout: Layout, version: int) -> tuple[None, float]:
        return timed(self.engine.receive_weights, self.group, layout, version)

    def version(self) -> int:
        return self.engine.version

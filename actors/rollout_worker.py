"""RolloutWorker: a Ray role over a ``uprlhf.rl.rollout`` engine (hf on CPU, vllm on GPU).

A call on the group splits the prompts over the workers (worker i samples with its
own seed) and joins their batches into one.
"""

from __future__ import annotations

import torch

from actors import timed
from actors.group import broadcast, dispatch, every, split
from uprlhf.config import PolicyConfig, RolloutConfig
from uprlhf.rl.policy import SampledBatch
from uprlhf.rl.rollout import make_rollout_engine
from uprlhf.rl.weight_sync import Layout, open_group
from uprlhf.seeds import derive_seed


def split_prompts(n: int, prompts: list[str], seed: int) -> list[tuple[tuple, dict]]:
    """Worker i gets the i-th slice of the prompts and a sampling seed of its own, derived from ``seed``."""
    return [((part, derive_seed(seed, "rollout worker", i)), {}) for i, part in enumerate(split(prompts, n))]


def join_batches(batches: list[SampledBatch]) -> SampledBatch:
    return SampledBatch.concat(batches)


def sync_ranks(n: int, address: str, port: int, backend: str) -> list[tuple[tuple, dict]]:
    """Worker i is rank i + 1 of the weight-sync group (the learner's rank 0 sends)."""
    return [((address, port, i + 1, n + 1, backend), {}) for i in range(n)]


class RolloutWorker:
    def __init__(self, policy: PolicyConfig, rollout: RolloutConfig, threads: int):
        torch.set_num_threads(threads)
        self.engine = make_rollout_engine(policy, rollout)
        self.group = None  # the weight-sync group, when weights are broadcast

    @dispatch(split_prompts, join_batches, timed=True)
    def generate(self, prompts: list[str], seed: int) -> tuple[SampledBatch, float]:
        return timed(self.engine.generate, prompts, seed)

    @dispatch(broadcast, every, timed=True)
    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> tuple[None, float]:
        return timed(self.engine.load_weights, weights, version)

    @dispatch(sync_ranks)
    def join_sync_group(self, address: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self.group = open_group(address, port, rank, world_size, backend)

    @dispatch(broadcast, every, timed=True)
    def receive_weights(self, layout: Layout, version: int) -> tuple[None, float]:
        return timed(self.engine.receive_weights, self.group, layout, version)

    def version(self) -> int:
        return self.engine.version

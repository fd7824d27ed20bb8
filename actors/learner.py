"""LearnerWorker: one DeepSpeed rank of ``uprlhf.rl.learner.PPOLearner``; the learner role is W of them.

Rank 0 names the rendezvous address, then every rank joins one torch.distributed
group (gloo on CPU, NCCL on GPU). A ``train`` call on the group shards the batch over
the ranks and averages their statistics; weights and layouts come from rank 0.
"""

from __future__ import annotations

import os

import ray
import torch

from actors import timed
from actors.group import dispatch, first, to_first
from uprlhf.config import RLConfig
from uprlhf.rl.config import LearnerConfig
from uprlhf.rl.learner import LearnerBatch, PPOLearner
from uprlhf.netutil import free_port, init_default_group
from uprlhf.rl.weight_sync import Layout, open_group


def shard_batch(n: int, batch: LearnerBatch, step: int, kl_coef: float) -> list[tuple[tuple, dict]]:
    """Rank r trains on the r-th equal shard of the batch (whole prompt groups: ``LearnerBatch.shard`` refuses a cut one)."""
    return [((batch.shard(rank, n), step, kl_coef), {}) for rank in range(n)]


def average_stats(results: list[dict]) -> dict:
    """Statistics averaged over ranks; the token count is the whole batch's, the longest response the longest of all."""
    stats = {key: sum(r[key] for r in results) / len(results) for key in results[0]}
    stats["response_tokens"] *= len(results)
    stats["response_length_max"] = max(r["response_length_max"] for r in results)
    return stats


class DeepSpeedRank:
    """What every rank of a DeepSpeed learner role does before it trains: rank 0 names the rendezvous, then all
    join one torch.distributed group on this node's address (``LearnerWorker`` for PPO, ``SFTWorker`` for SFT)."""

    def __init__(self, learner: LearnerConfig, rank: int, world_size: int):
        self.learner_cfg, self.rank, self.world_size = learner, rank, world_size

    @dispatch(to_first, first)
    def rendezvous(self) -> tuple[str, int]:
        """The address Ray gives this node (127.0.0.1 on a local Ray) and a free port on it, never all interfaces."""
        address = ray.util.get_node_ip_address()
        return address, free_port(address)

    def join_group(self, address: str, port: int) -> None:
        learner = self.learner_cfg
        # The driver forwards its DS_ACCELERATOR (cpu under `make`); a GPU rank must not inherit it.
        os.environ["DS_ACCELERATOR"] = "cuda" if learner.use_gpu else "cpu"
        if not learner.use_gpu:
            torch.set_num_threads(max(1, round(learner.cpus_per_worker)))
        init_default_group("nccl" if learner.use_gpu else "gloo", address, port, self.rank, self.world_size)


class LearnerWorker(DeepSpeedRank):
    def __init__(self, cfg: RLConfig, rank: int, world_size: int):
        super().__init__(cfg.learner, rank, world_size)
        self.cfg = cfg
        self.learner: PPOLearner | None = None
        self.group = None  # the weight-sync group, on rank 0 only

    @staticmethod
    def arguments(cfg: RLConfig):
        """The constructor arguments of rank r of the learner role."""
        return lambda rank: (cfg, rank, cfg.learner.num_workers)

    def setup(self, address: str, port: int) -> None:
        self.join_group(address, port)
        self.learner = PPOLearner(self.cfg, self.rank, self.world_size)

    @dispatch(shard_batch, average_stats, timed=True)
    def train(self, batch: LearnerBatch, step: int, kl_coef: float) -> tuple[dict, float]:
        return timed(self.learner.train, batch, step, kl_coef)

    @dispatch(gather=first, timed=True)
    def policy_weights(self) -> tuple[dict[str, torch.Tensor] | None, float]:
        return timed(self.learner.policy_weights)

    @dispatch(to_first)
    def join_sync_group(self, address: str, port: int, world_size: int, backend: str) -> None:
        self.group = open_group(address, port, 0, world_size, backend)

    @dispatch(gather=first)
    def weights_layout(self) -> Layout | None:
        return self.learner.weights_layout()

    @dispatch(gather=first, timed=True)
    def broadcast_weights(self) -> tuple[None, float]:
        return timed(self.learner.broadcast_weights, self.group)

    def save(self, path: str) -> None:
        self.learner.save(path)

    def load(self, path: str) -> None:
        self.learner.load(path)

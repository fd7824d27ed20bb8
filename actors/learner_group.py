"""LearnerGroup: W DeepSpeed ranks of ``uprlhf.rl.learner.PPOLearner`` in one placement group.

Each rank is an actor on its own bundle; rank 0 names the rendezvous address,
then all ranks join one torch.distributed group (gloo on CPU, NCCL on GPU). One
call on the group fans out to every rank and gathers the result, so the driver's
loop reads like one process.
"""

from __future__ import annotations

import os
import socket

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import timed
from uprlhf.config import RLConfig
from uprlhf.rl.learner import LearnerBatch, PPOLearner
from uprlhf.rl.weight_sync import Layout, open_group


@ray.remote
class LearnerWorker:
    def __init__(self, cfg: RLConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.learner: PPOLearner | None = None
        self.group = None  # the weight-sync group, on rank 0 only

    def rendezvous(self) -> tuple[str, int]:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, address: str, port: int) -> None:
        import torch.distributed as dist

        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
            MASTER_ADDR=address, MASTER_PORT=str(port),
        )
        # The driver forwards its DS_ACCELERATOR (cpu under `make`); a GPU rank must not inherit it.
        os.environ["DS_ACCELERATOR"] = "cuda" if self.cfg.learner.use_gpu else "cpu"
        if not self.cfg.learner.use_gpu:
            torch.set_num_threads(max(1, round(self.cfg.learner.cpus_per_worker)))
        dist.init_process_group("nccl" if self.cfg.learner.use_gpu else "gloo", rank=self.rank, world_size=self.world_size)
        self.learner = PPOLearner(self.cfg, self.rank, self.world_size)

    def train(self, batch: LearnerBatch, step: int, kl_coef: float) -> tuple[dict, float]:
        return timed(self.learner.train, batch, step, kl_coef)

    def policy_weights(self) -> tuple[dict[str, torch.Tensor] | None, float]:
        return timed(self.learner.policy_weights)

    def join_sync_group(self, address: str, port: int, world_size: int, backend: str) -> None:
        self.group = open_group(address, port, 0, world_size, backend)

    def weights_layout(self) -> Layout | None:
        return self.learner.weights_layout()

    def broadcast_weights(self) -> tuple[None, float]:
        return timed(self.learner.broadcast_weights, self.group)

    def save(self, path: str) -> None:
        self.learner.save(path)

    def load(self, path: str) -> None:
        self.learner.load(path)


class LearnerGroup:
    def __init__(self, cfg: RLConfig, pg: PlacementGroup, first_bundle: int):
        w = cfg.learner.num_workers
        self.workers = [
            LearnerWorker.options(
                num_cpus=cfg.learner.cpus_per_worker,
                num_gpus=1 if cfg.learner.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + rank),
            ).remote(cfg, rank, w)
            for rank in range(w)
        ]
        address, port = ray.get(self.workers[0].rendezvous.remote())
        ray.get([worker.setup.remote(address, port) for worker in self.workers])

    def train(self, batch: LearnerBatch, step: int, kl_coef: float) -> tuple[dict, float]:
        """One PPO update on every rank's shard; statistics averaged over ranks, compute time of the slowest."""
        w = len(self.workers)
        results = ray.get([worker.train.remote(batch.shard(rank, w), step, kl_coef) for rank, worker in enumerate(self.workers)])
        stats = {key: sum(r[0][key] for r in results) / w for key in results[0][0]}
        stats["response_tokens"] *= w
        return stats, max(r[1] for r in results)

    def policy_weights(self) -> tuple[dict[str, torch.Tensor], float]:
        results = ray.get([worker.policy_weights.remote() for worker in self.workers])
        return results[0][0], max(r[1] for r in results)

    def weights_layout(self) -> Layout:
        return ray.get([worker.weights_layout.remote() for worker in self.workers])[0]

    def broadcast_weights(self) -> list[ray.ObjectRef]:
        """Start the broadcast on every rank (rank 0 sends); the receivers must be called alongside."""
        return [worker.broadcast_weights.remote() for worker in self.workers]

    def save(self, path: str) -> None:
        ray.get([worker.save.remote(path) for worker in self.workers])

    def load(self, path: str) -> None:
        ray.get([worker.load.remote(path) for worker in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)

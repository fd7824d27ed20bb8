"""SFTWorker: one DeepSpeed rank of ``uprlhf.sft.trainer.SFTTrainer``; the SFT learner role is W of them.

Each rank holds the encoded examples and draws its own share of a step from the step
number (``step_indices``), so one ``train_step(step)`` call on the group is the whole
step and a resumed run redraws exactly the batches it would have.
"""

from __future__ import annotations

from actors import timed
from actors.group import dispatch, first
from actors.learner import DeepSpeedRank
from uprlhf.sft.config import SFTConfig
from uprlhf.sft.data import step_indices
from uprlhf.sft.trainer import SFTTrainer


def mean_step_stats(results: list[dict]) -> dict:
    """One step's figures over ranks: the token-weighted loss, every rank's tokens, rank 0's learning rate."""
    tokens = sum(r["response_tokens"] for r in results)
    loss = sum(r["loss"] * r["response_tokens"] for r in results) / max(tokens, 1.0)
    return {"loss": loss, "response_tokens": tokens, "lr": results[0]["lr"]}


class SFTWorker(DeepSpeedRank):
    def __init__(self, cfg: SFTConfig, rank: int, world_size: int, examples: list[dict], total_steps: int):
        super().__init__(cfg.learner, rank, world_size)
        self.cfg, self.examples, self.total_steps = cfg, examples, total_steps
        self.trainer: SFTTrainer | None = None

    @staticmethod
    def arguments(cfg: SFTConfig, examples, total_steps: int):
        """The constructor arguments of rank r (``examples``: an object-store reference every rank resolves)."""
        return lambda rank: (cfg, rank, cfg.learner.num_workers, examples, total_steps)

    def setup(self, address: str, port: int) -> None:
        self.join_group(address, port)
        self.trainer = SFTTrainer(self.cfg, self.rank, self.world_size, self.total_steps)

    @dispatch(gather=mean_step_stats, timed=True)
    def train_step(self, step: int) -> tuple[dict, float]:
        rows = step_indices(len(self.examples), step, self.cfg.batch_size, self.rank, self.world_size, self.cfg.seed)
        return timed(self.trainer.train_step, [self.examples[i] for i in rows])

    @dispatch(gather=first)
    def eval_loss(self, examples: list[dict]) -> float | None:
        """The mean response-token loss of the held-out examples. Every rank scores all of them: under ZeRO-3 a
        forward is collective, so the ranks must run the same batches; the set is small."""
        total, tokens = self.trainer.eval_loss(examples, self.cfg.batch_size)
        return total / tokens if tokens else None

    def save(self, path: str) -> None:
        self.trainer.save(path)

    def load(self, path: str) -> None:
        self.trainer.load(path)

    def export(self, path: str) -> None:
        self.trainer.export(path)

"""SelectorActor: a Ray role over ``uprlhf.selection.Selector``, refining the ensemble beside the PPO loop."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from actors import timed
from actors.group import dispatch, first
from uprlhf.config import SelectorConfig
from uprlhf.selection.labelers import build_labeler
from uprlhf.selection.selector import SelectionRound, Selector


class SelectorActor:
    def __init__(
        self, cfg: SelectorConfig, out: str, checkpoints: list[str], validation: dict[str, tuple[list[str], list[str]]],
        max_length: int, device: str = "cpu",
    ):
        torch.set_num_threads(cfg.threads)
        self.selector = Selector(
            cfg, build_labeler(cfg.labeler, Path(out)), out=out, checkpoints=[Path(p) for p in checkpoints],
            validation=validation, max_length=max_length, device=device,
        )

    @dispatch(gather=first, timed=True)
    def run(self, rows: pa.Table, checkpoint: str, version: int) -> tuple[SelectionRound | None, float]:
        """A round over ``rows`` (the replay rows since the last round); None when there are none yet."""
        if not len(rows):
            return None, 0.0
        through = pc.max(rows["step"]).as_py()
        return timed(self.selector.run, rows, checkpoint, version, through)

"""Every artifact a job reads or writes, named once: where it lives under a data or output folder.

Jobs, sweeps and tests build these paths from here instead of by hand, so a layout
change is one edit and a default (``DATA_DIR/rl_prompts`` in any data format,
``OUTPUT_DIR/checkpoints/<kind>/final``) means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# The file endings a data file may have (DESIGN §4); a saved ``datasets`` folder has none.
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class DataPaths:
    """The files ``jobs.prepare_data`` writes into a data folder (as Parquet), and how readers find them.

    The properties name what ``jobs.prepare_data`` writes; a reader uses ``find``,
    which takes a data folder in any canonical format (``rl_prompts.jsonl``,
    ``reward_test.csv``, a saved ``datasets`` folder ``ood/``, ...).
    """

    root: Path

    def candidates(self, stem: str) -> list[Path]:
        """Where the data called ``stem`` may be: ``STEM.parquet``, ``.jsonl``, ``.json``, ``.csv`` or a folder ``STEM``."""
        return [self.root / f"{stem}{suffix}" for suffix in DATA_SUFFIXES] + [self.root / stem]

    def find(self, stem: str) -> Path:
        """The one file (or saved ``datasets`` folder) of ``stem`` in the folder; a DataError if none or several."""
        from uprlhf.data.loaders import DataError

        if not self.root.is_dir():
            raise DataError([f"{self.root}: no such data folder (looked for {stem})"])
        *files, folder = self.candidates(stem)
        found = [p for p in files if p.is_file()] + ([folder] if folder.is_dir() else [])
        if not found:
            expected = ", ".join(p.name for p in files)
            raise DataError([f"{self.root}: no {stem} data; expected one of {expected} or a saved datasets folder {stem}/"])
        if len(found) > 1:
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
            raise DataError([f"{self.root}: several {stem} data files ({names}); keep one"])
        return found[0]

    @property
    def sft_prompts(self) -> Path:
        return self.root / "sft_prompts.parquet"

    @property
    def reward_train(self) -> Path:
        return self.root / "reward_train.parquet"

    @property
    def reward_test(self) -> Path:
        return self.root / "reward_test.parquet"

    @property
    def rl_prompts(self) -> Path:
        return self.root / "rl_prompts.parquet"

    @property
    def ood(self) -> Path:
        return self.root / "ood.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


@dataclass(frozen=True)
class RunPaths:
    """One job's output folder (DESIGN §4): resolved config, metrics, summary, checkpoints, replay."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def final_eval(self) -> Path:
        return self.root / "final_eval.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    @property
    def data(self) -> DataPaths:
        """The default data folder of a run: OUTPUT_DIR/data."""
        return DataPaths(self.root / "data")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        """Points at the newest complete PPO checkpoint."""
        return self.checkpoints / "latest.json"

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def reward_checkpoint(self, kind: str) -> Path:
        """The final ensemble of ``kind`` as ``jobs.train_reward`` saves it."""
        return self.checkpoints / kind / "final"

    def reward_checkpoints(self, kind: str) -> Path:
        """The folder of ``kind``'s training checkpoints (ckpt_*, final)."""
        return self.checkpoints / kind


def data_paths(data_dir: str | None, out: Path) -> DataPaths:
    """The configured data folder, else OUTPUT_DIR/data."""
    return DataPaths(Path(data_dir)) if data_dir else RunPaths(out).data

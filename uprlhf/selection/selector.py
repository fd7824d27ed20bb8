"""The selector: replay rows in, a refined ensemble version out (select → relabel → project → refine → publish).

Plain Python over a pyarrow table of replay rows, so the Ray actor, the offline
``jobs.refine`` and the tests share it. Influence is measured at the
reward-training checkpoints (LESS's warm-up checkpoints, with their Adam moments);
the member rewards used for the quantile projection come from the ensemble being
refined, re-scored on the candidates, so rows scored by older versions do not mix scales.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from transformers import AutoTokenizer

from uprlhf.atomic import atomic_write, fsync_directory
from uprlhf.selection.config import SelectorConfig
from uprlhf.data.loaders import DEFAULT_SUBTASK
from uprlhf.reward.ensembles import RewardEnsemble
from uprlhf.selection.labelers import Labeler
from uprlhf.reward.evaluation import score_texts
from uprlhf.reward.training import TOKENIZER_DIR
from uprlhf.selection.influence import InfluenceRanker
from uprlhf.selection.refine import refine_ensemble
from uprlhf.selection.strategies import STRATEGIES, Budget
from uprlhf.selection.targets import quantile_targets
from uprlhf.seeds import derive_seed

VERSION_DIR = "v{:04d}"


@dataclass
class SelectionRound:
    """What one round did; the driver publishes ``checkpoint`` as ``version``."""

    version: int
    checkpoint: str
    through_step: int
    strategy: str
    candidates: int
    selected: int
    labelled: int
    label_counts: dict[str, int]
    labeler_stats: dict[str, int]
    refine_losses: list[float]
    seconds: float
    selected_ids: list[str] = field(default_factory=list)
    adam_normalized: bool | None = None

    def record(self) -> dict:
        return asdict(self)


def validation_sets(rows: list[dict], per_subtask: int, seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """Chosen responses of held-out pairs, grouped by subtask, at most ``per_subtask`` each (seeded draw)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("subtask") or DEFAULT_SUBTASK, []).append(row)
    out = {}
    for name, group in sorted(groups.items()):
        picked = random.Random(seed).sample(group, min(per_subtask, len(group)))
        out[name] = ([r["prompt"] for r in picked], [r["chosen"] for r in picked])
    return out


def influence_checkpoints(final_checkpoint: str | Path) -> list[Path]:
    """The training checkpoints beside a ``final`` ensemble folder (``ckpt_*``), oldest first; else the folder itself."""
    final = Path(final_checkpoint)
    found = sorted(final.parent.glob("ckpt_*"), key=lambda p: int(p.name.split("_")[1]))
    return found or [final]


def row_ids(table: pa.Table) -> list[str]:
    """"step-sample": unique in a run's replay buffer, and what a human labeler sees."""
    return [f"{s}-{i}" for s, i in zip(table["step"].to_pylist(), table["sample"].to_pylist())]


class Selector:
    """One object per run: the labeler, the validation set and the influence ranker outlive the rounds."""

    def __init__(
        self,
        cfg: SelectorConfig,
        labeler: Labeler,
        *,
        out: str | Path,
        checkpoints: list[Path],
        validation: dict[str, tuple[list[str], list[str]]],
        max_length: int,
        device: str = "cpu",
        ranker: InfluenceRanker | None = None,
    ):
        STRATEGIES.check(cfg.strategy)  # "off" is a config value, not a strategy to run
        self.cfg, self.labeler, self.max_length = cfg, labeler, max_length
        self.device = torch.device(device)
        self.out = Path(out)
        self.checkpoints, self.validation = checkpoints, validation
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoints[-1] / TOKENIZER_DIR)
        self._ranker = ranker  # shareable: its validation gradients depend only on checkpoints and validation set

    @property
    def ranker(self) -> InfluenceRanker:
        """Built on first use: its validation gradients cost a pass per checkpoint."""
        if self._ranker is None:
            self._ranker = InfluenceRanker(
                self.checkpoints, self.tokenizer, self.validation,
                dim=self.cfg.projection_dim, seed=self.cfg.projection_seed, adam_eps=self.cfg.adam_eps, max_length=self.max_length,
                aggregation=self.cfg.subtask_aggregation, device=self.device,
            )
        return self._ranker

    def select(self, table: pa.Table, round_seed: int) -> list[int]:
        """Indices of the rows to label, by the configured strategy at the configured budget."""
        prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()
        variance = torch.tensor(table["reward_std"].to_pylist()).square()
        budget = Budget.of(len(table), self.cfg.gamma, self.cfg.eta)

        def influence(indices: list[int]):
            return self.ranker.scores([prompts[i] for i in indices], [responses[i] for i in indices])

        gen = torch.Generator().manual_seed(round_seed)
        return STRATEGIES.get(self.cfg.strategy)(variance, budget, influence, gen)

    def run(self, table: pa.Table, checkpoint: str | Path, version: int, through_step: int) -> SelectionRound:
        """One round on ``table`` (the candidate rows) starting from ensemble ``checkpoint`` (``version``)."""
        started = time.perf_counter()
        round_seed = derive_seed(self.cfg.seed, "selection round", version)
        chosen = self.select(table, round_seed)
        prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()
        ids = row_ids(table)
        self.labeler.calibrate(prompts, responses)
        labels = self.labeler.label([ids[i] for i in chosen], [prompts[i] for i in chosen], [responses[i] for i in chosen])
        kept = [(i, label) for i, label in zip(chosen, labels) if label is not None]
        ensemble = RewardEnsemble.load(checkpoint).to(self.device)
        losses: list[float] = []
        if kept:
            current = score_texts(ensemble, self.tokenizer, prompts, responses, max_length=self.max_length)
            rows = [i for i, _ in kept]
            targets = quantile_targets(
                torch.tensor([label for _, label in kept]), current[rows], self.cfg.noise_std,
                reference=current, generator=torch.Generator().manual_seed(round_seed),
            )
            losses = refine_ensemble(
                ensemble, self.tokenizer, [prompts[i] for i in rows], [responses[i] for i in rows], targets,
                epochs=self.cfg.epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size, max_length=self.max_length, seed=round_seed,
            )
        new_version = version + 1 if kept else version  # nothing labelled: nothing to publish
        path = self.publish(ensemble, new_version) if kept else Path(checkpoint)
        counts = {str(j): sum(1 for _, label in kept if label == j) for j in range(1, 6)}
        result = SelectionRound(
            version=new_version, checkpoint=str(path), through_step=through_step, strategy=self.cfg.strategy,
            candidates=len(table), selected=len(chosen), labelled=len(kept), label_counts=counts,
            labeler_stats=dict(self.labeler.stats), refine_losses=losses, seconds=time.perf_counter() - started,
            selected_ids=[ids[i] for i in chosen],
            adam_normalized=self._ranker.adam_normalized if self._ranker else None,
        )
        log = self.out / "selections.jsonl"
        before = log.read_text(encoding="utf-8") if log.exists() else ""
        atomic_write(log, lambda f: f.write(before + json.dumps(result.record()) + "\n"), binary=False)
        return result

    def publish(self, ensemble: RewardEnsemble, version: int) -> Path:
        """Save the refined ensemble as ``ensembles/vNNNN`` (weights, manifest, tokenizer), all or nothing."""
        root = self.out / "ensembles"
        root.mkdir(parents=True, exist_ok=True)
        target = root / VERSION_DIR.format(version)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}-"))
        ensemble.cpu().save(staging)
        self.tokenizer.save_pretrained(staging / TOKENIZER_DIR)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        fsync_directory(root)
        return target

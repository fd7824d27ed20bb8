"""One sweep trial: a whole PPO run inside the placement group Tune reserved for it.

The group is the run's own placement plan (``actors.placement.rl_plan``), so a trial holds
every CPU and GPU its rollout workers, scorer and learner ranks will take before any of
them starts, and concurrent trials cannot oversubscribe the cluster. The trial hands the
run this group explicitly (``run_ppo(..., adopt=group)``), and the plan checks it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.placement import rl_plan, trial_bundles
from jobs.common import read_json, read_records, setup_logging
from jobs.drivers.ppo import run_ppo
from tune.config import SweepConfig
from tune.space import trial_config
from uprlhf.config import RLConfig

REPORTED = ("gold", "gold_train", "kl", "reward_mean", "uncertainty")


def trial_plan(cfg: RLConfig, driver_cpus: float) -> list[dict[str, float]]:
    """The trial's bundles: the run's placement plan, with the driver's CPUs added to bundle 0 (see ``trial_bundles``)."""
    return trial_bundles(rl_plan(cfg), driver_cpus)


def trial_totals(cfg: RLConfig, driver_cpus: float) -> dict[str, float]:
    """CPUs and GPUs one trial holds."""
    plan = trial_plan(cfg, driver_cpus)
    return {resource: sum(b.get(resource, 0.0) for b in plan) for resource in ("CPU", "GPU")}


@dataclass
class Trials:
    """What every trial of a sweep shares: its config, output folder and data."""

    cfg: SweepConfig
    out: Path
    data_dir: Path | None

    def config(self, params: dict[str, Any]) -> RLConfig:
        return trial_config(self.cfg, params, self.out, self.data_dir)

    def resources(self, params: dict[str, Any]):
        """Tune's resource request for a trial (a trial may sweep its own worker counts)."""
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([{}, *trial_plan(self.config(params), self.cfg.resources.driver_cpus)])


def run_trial(params: dict[str, Any], trials: Trials) -> None:
    """The trainable: a PPO run in OUTPUT_DIR/trials/<trial> (its config.yaml says what ran), each step reported to Tune.

    Reported: ``step`` (the step just finished; ``ppo.steps`` for the final evaluation),
    ``gold`` (the latest held-out gold evaluation, carried forward between evaluations),
    ``gold_train``, ``kl``, ``reward_mean``, ``uncertainty``. A restored sweep restarts an
    unfinished trial here and ``run_ppo`` resumes it from its last checkpoint.
    """
    from ray import tune as ray_tune
    from ray.util import get_current_placement_group

    setup_logging("ppo")  # the trial's process logs as the run it is
    name = ray_tune.get_context().get_trial_name()
    cfg = trials.config(params)
    out = trials.out / "trials" / name
    out.mkdir(parents=True, exist_ok=True)
    with exit_as_error():
        run_ppo(cfg, out, name=name, adopt=get_current_placement_group(), on_record=GoldCarrier(carried_gold(out), ray_tune.report))
    final = read_records(out)[-1]  # the final evaluation, as a record at step = ppo.steps
    ray_tune.report({"step": cfg.ppo.steps, **{k: final[k] for k in REPORTED if k in final}})


class TrialFailed(RuntimeError):
    """A trial that stopped with an exit (``fail``): the message says why, for the trial table."""


@contextmanager
def exit_as_error() -> Iterator[None]:
    """An exit inside a trial becomes an error that says why: Tune then records the reason, not just 'exit code 2'."""
    try:
        yield
    except SystemExit as err:
        message = getattr(err, "message", None) or f"exit code {err.code}"
        raise TrialFailed(message) from None


class GoldCarrier:
    """Reports each step to Tune with the latest held-out gold carried forward between evaluations."""

    def __init__(self, gold: float | None, report):
        self.gold, self.report = gold, report

    def __call__(self, record: dict) -> None:
        self.gold = record.get("gold", self.gold)
        self.report({"step": record["step"], **{k: record[k] for k in REPORTED if k in record}, "gold": self.gold})


def carried_gold(out: Path) -> float | None:
    """The latest gold evaluation a resumed run keeps (``run_ppo`` redoes the steps after its checkpoint)."""
    done = read_json(out / "checkpoints" / "latest.json").get("step", -1)
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    golds = [r["gold"] for r in records if r["step"] <= done and "gold" in r]
    return golds[-1] if golds else None

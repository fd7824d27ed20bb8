"""One sweep trial: a whole ``jobs.ppo`` run inside the placement group Tune reserved for it.

The group is the run's own placement plan (``jobs.ppo.bundles``), so a trial holds every
CPU and GPU its rollout workers, scorer and learner ranks will take before any of them
starts, and concurrent trials cannot oversubscribe the cluster. ``jobs.ppo.reserve``
hands the run this group instead of asking for a second one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import ppo
from jobs.common import read_json
from tune.config import SweepConfig
from tune.space import trial_config
from uprlhf.config import RLConfig

REPORTED = ("gold", "gold_train", "kl", "reward_mean", "uncertainty")


def trial_plan(cfg: RLConfig, driver_cpus: float) -> list[dict[str, float]]:
    """The trial's bundles: the run's placement plan, with the driver's CPUs added to bundle 0.

    Tune starts the trainable (the run's driver) in bundle 0. Given an empty head bundle it
    reserves exactly these bundles, so bundle i of the trial's group is bundle i of
    ``jobs.ppo.bundles`` (rollout 0..R-1, scorer R, learners R+1.., whatever comes next)
    and the driver's share rides in bundle 0 beside rollout worker 0, which claims only its own.
    """
    plan = [dict(bundle) for bundle in ppo.bundles(cfg)]
    plan[0]["CPU"] = plan[0].get("CPU", 0.0) + driver_cpus
    return plan


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
    unfinished trial here and ``jobs.ppo.run`` resumes it from its last checkpoint.
    """
    from ray import tune as ray_tune

    name = ray_tune.get_context().get_trial_name()
    cfg = trials.config(params)
    out = trials.out / "trials" / name
    out.mkdir(parents=True, exist_ok=True)
    gold = carried_gold(out)

    def on_record(record: dict) -> None:
        nonlocal gold
        gold = record.get("gold", gold)
        ray_tune.report({"step": record["step"], **{k: record[k] for k in REPORTED if k in record}, "gold": gold})

    ppo.run(cfg, out, name=name, on_record=on_record)
    final = ppo.read_records(out)[-1]  # the final evaluation, as a record at step = ppo.steps
    ray_tune.report({"step": cfg.ppo.steps, **{k: final[k] for k in REPORTED if k in final}})


def carried_gold(out: Path) -> float | None:
    """The latest gold evaluation a resumed run keeps (``jobs.ppo.run`` redoes the steps after its checkpoint)."""
    done = read_json(out / "checkpoints" / "latest.json").get("step", -1)
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    golds = [r["gold"] for r in records if r["step"] <= done and "gold" in r]
    return golds[-1] if golds else None

"""A study (``run_study``): arms × seeds of one PPO setup, each (arm, seed) cell a Ray Tune trial.

Plan: data, once (DIR/data) → each reward ensemble the arms use, once (DIR/reward/<variant>,
every kind the arms of that variant run against) → Tune: one PPO run per cell
(DIR/cells/<arm>-seed<seed>) inside the placement group Tune reserved for it (its own
``rl_plan`` plus the driver's CPUs), as many at once as the cluster holds → the
aggregation over seeds (``uprlhf.studies.aggregate``) → DIR/study.json, study.md,
curves.png. Killed and started again on the same DIR, the study resumes
(``Tuner.restore``): finished cells are kept, unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from actors.placement import rl_plan, trial_bundles
from jobs.common import atomic_write_text, fail, hold_folder, log, read_json, read_records, setup_logging, start_ray, write_json
from jobs.drivers.ppo import run_ppo
from jobs.drivers.prepare_data import build as prepare_data
from jobs.drivers.train_reward import run_train_reward
from uprlhf.config import ConfigError, RLConfig, TrainRewardConfig, build, parse_override, set_dotted
from uprlhf.studies.aggregate import aggregate, cell_figures, decide, markdown, matched_kl
from uprlhf.studies.config import StudyConfig

EXPERIMENT = "tune"  # Tune's experiment folder under DIR: the restore point
# The RL config's fields that name files or folders (a model name that is no path is left alone).
FILE_FIELDS = ("prompts", "data_dir", "reward_checkpoint", "policy.model.name_or_path", "selector.validation")


def cell_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


class Cells:
    """What every cell of a study shares: its config, output folder and data; a cell's PPO config from (arm, seed)."""

    def __init__(self, cfg: StudyConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.data_dir = out / "data" if cfg.data is not None else None
        self.overrides = {arm: [parse_override(o) for o in overrides] for arm, overrides in cfg.arms.items()}
        self.configs: dict[tuple[str, int], RLConfig] = {}

    def built(self) -> None:
        """Every cell's config, validated here in the driver; the trials read them, never the files they name."""
        self.configs = {(arm, seed): self.config(arm, seed) for arm in self.cfg.arms for seed in self.cfg.seeds}

    def reward_overrides(self, arm: str) -> dict[str, Any]:
        return {key.partition(".")[2]: value for key, value in self.overrides[arm] if key.startswith("reward.")}

    def variant(self, arm: str) -> str:
        """The folder (under DIR/reward) of the ensemble the arm runs against."""
        return ",".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(self.reward_overrides(arm).items())) or "shared"

    def reward_config(self, arm: str, kinds: list[str]) -> TrainRewardConfig:
        tree = self.cfg.reward.model_dump(mode="json")
        tree["kinds"] = kinds
        if tree["data_dir"] is None:
            tree["data_dir"] = str(self.data_dir)
        for path, value in self.reward_overrides(arm).items():
            set_dotted(tree, path, value)
        return build(TrainRewardConfig, tree, f"arms.{arm} (reward)")

    def config(self, arm: str, seed: int) -> RLConfig:
        """The cell's PPO run: the base run, the arm's rl.* overrides, the seed, the shared data and ensemble.

        Relative file paths are taken from the folder the study was started in (a Tune
        trial runs in its own folder), so they are made absolute here, in the driver.
        """
        tree = self.cfg.rl.model_dump(mode="json")
        for key, value in self.overrides[arm]:
            if key.startswith("rl."):
                set_dotted(tree, key.partition(".")[2], value)
        tree["seed"] = seed
        for path in FILE_FIELDS:
            *parents, leaf = path.split(".")
            node = tree
            for key in parents:
                node = node.get(key) or {}
            if isinstance(node.get(leaf), str) and Path(node[leaf]).exists():
                node[leaf] = str(Path(node[leaf]).resolve())
        if self.data_dir is not None and self.cfg.rl.prompts is None and self.cfg.rl.data_dir is None:
            tree["data_dir"] = str(self.data_dir)
        if self.cfg.reward is not None:
            kind = build(RLConfig, tree, f"arms.{arm}").reward_kind
            tree["reward_checkpoint"] = str(self.out / "reward" / self.variant(arm) / "checkpoints" / kind / "final")
            tree["reward_k"] = self.reward_config(arm, [kind]).ensemble_for(kind).k
        return build(RLConfig, tree, f"arms.{arm} seed {seed}")

    def resources(self, params: dict[str, Any]):
        from ray.tune import PlacementGroupFactory

        plan = rl_plan(self.configs[params["arm"], params["seed"]])
        return PlacementGroupFactory([{}, *trial_bundles(plan, self.cfg.driver_cpus)])


def check_inputs(cfg: StudyConfig, cells: Cells) -> None:
    """Every cell's config and every ensemble's training config, validated before anything runs."""
    problems = []
    for arm in cfg.arms:
        try:
            kind = cells.config(arm, cfg.seeds[0]).reward_kind
            if cfg.reward is not None:
                cells.reward_config(arm, [kind])
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(problems))
    cells.built()


def build_shared(cfg: StudyConfig, cells: Cells) -> None:
    """Data once; each ensemble variant once, with every kind its arms use (jobs.train_reward skips finished kinds)."""
    if cfg.data is not None:
        prepare_data(cfg.data, cells.data_dir)
    if cfg.reward is None:
        return
    kinds: dict[str, tuple[str, list[str]]] = {}
    for arm in cfg.arms:
        kind = cells.config(arm, cfg.seeds[0]).reward_kind
        _, used = kinds.setdefault(cells.variant(arm), (arm, []))
        if kind not in used:
            used.append(kind)
    for n, (variant, (arm, used)) in enumerate(kinds.items(), 1):
        log.info(f"reward ensemble {variant} ({n}/{len(kinds)}): {', '.join(used)}")
        run_train_reward(cells.reward_config(arm, used), cells.out / "reward" / variant)


def run_cell(params: dict[str, Any], cells: Cells) -> None:
    """The trainable: one cell's PPO run in the placement group Tune reserved, its final gold reported."""
    from ray import tune as ray_tune
    from ray.util import get_current_placement_group

    setup_logging("ppo")
    name = cell_name(params["arm"], params["seed"])
    out = cells.out / "cells" / name
    out.mkdir(parents=True, exist_ok=True)
    summary = run_ppo(cells.configs[params["arm"], params["seed"]], out, name=name, adopt=get_current_placement_group())
    ray_tune.report({"gold_final": summary.get("gold_final")})


def concurrency(cfg: StudyConfig, cells: Cells) -> int:
    """Cells at once: as set, or as many as the cluster's CPUs and GPUs hold (the largest cell decides)."""
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    total = {r: ray.cluster_resources().get(r, 0.0) for r in ("CPU", "GPU")}
    fits = []
    for arm in cfg.arms:
        bundles = trial_bundles(rl_plan(cells.configs[arm, cfg.seeds[0]]), cfg.driver_cpus)
        need = {r: sum(b.get(r, 0.0) for b in bundles) for r in total}
        fits += [int((total[r] + 1e-9) // need[r]) for r in need if need[r] > 0]
    if min(fits) < 1:
        fail(f"a cell needs more than the cluster's {total['CPU']:g} CPU and {total['GPU']:g} GPU; lower the rl worker counts")
    return min(fits)


def trial_cell_name(trial) -> str:
    """A Tune trial is named after its cell, in the trial table and its folder."""
    return cell_name(trial.config["arm"], trial.config["seed"])


def make_tuner(cfg: StudyConfig, cells: Cells, max_concurrent: int):
    """A new Tuner over the grid arm × seed, or the one a killed study left in DIR/tune."""
    from ray import tune as ray_tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_cell, cells=cells), cells.resources)
    path = cells.out / EXPERIMENT
    if ray_tune.Tuner.can_restore(path):
        log.info(f"resuming the study in {path}")
        return ray_tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return ray_tune.Tuner(
        trainable,
        param_space={"arm": ray_tune.grid_search(list(cfg.arms)), "seed": ray_tune.grid_search(list(cfg.seeds))},
        tune_config=ray_tune.TuneConfig(
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent),
            trial_name_creator=trial_cell_name,
            trial_dirname_creator=trial_cell_name,
        ),
        run_config=ray_tune.RunConfig(
            name=EXPERIMENT, storage_path=str(cells.out), verbose=0, failure_config=ray_tune.FailureConfig(max_failures=1)
        ),
    )


def curve(records: list[dict]) -> list[tuple[float, float]]:
    """A cell's (KL, gold) at each gold evaluation, the final one included."""
    return [(r["gold_kl"], r["gold"]) for r in records if "gold" in r and r.get("gold_kl") is not None]


def collect(cfg: StudyConfig, out: Path) -> tuple[dict, dict, dict]:
    """Per (arm, seed): the cell's figures, its (KL, gold) curve and its records; a missing cell ends the study."""
    summaries, curves, records = {}, {}, {}
    missing = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            folder = out / "cells" / cell_name(arm, seed)
            summary = read_json(folder / "summary.json")
            if not summary:
                missing.append(cell_name(arm, seed))
                continue
            summaries.setdefault(arm, {})[seed] = summary
            records.setdefault(arm, {})[seed] = read_records(folder)
            curves.setdefault(arm, {})[seed] = curve(records[arm][seed])
    if missing:
        fail(f"cells without a summary (failed; see {out / EXPERIMENT}): {', '.join(missing)}", 1)
    kl = matched_kl(curves)
    base = summaries[cfg.baseline]
    figures = {
        arm: {seed: cell_figures(summaries[arm][seed], curves[arm][seed], kl, base[seed].get("gold_per_prompt_final"))
              for seed in cfg.seeds}
        for arm in cfg.arms
    }
    return figures, curves, {"matched_kl": kl}


def plot_curves(curves: dict, path: Path) -> None:
    """Gold against KL per arm: the mean over seeds at each evaluation, a band of ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, seeds in curves.items():
        length = min(len(points) for points in seeds.values())
        kls = np.array([[k for k, _ in points[:length]] for points in seeds.values()])
        golds = np.array([[g for _, g in points[:length]] for points in seeds.values()])
        mean, std = golds.mean(0), golds.std(0, ddof=1) if len(golds) > 1 else np.zeros(length)
        line, = ax.plot(kls.mean(0), mean, marker="o", label=f"{arm} (n={len(golds)})")
        ax.fill_between(kls.mean(0), mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("KL to the reference (mean over seeds)")
    ax.set_ylabel("gold reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(cfg: StudyConfig, out: Path) -> dict:
    """Shared work → every cell through Tune → study.json, study.md and curves.png in ``out``."""
    started = time.perf_counter()
    cells = Cells(cfg, out)
    check_inputs(cfg, cells)
    hold_folder(out, cfg, "study", "study_state.json")
    start_ray()
    build_shared(cfg, cells)
    make_tuner(cfg, cells, concurrency(cfg, cells)).fit()
    figures, curves, extra = collect(cfg, out)
    aggregated = aggregate(figures, cfg.baseline)
    claims = [decide(claim, aggregated) for claim in cfg.claims]
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "jobs.study", *sys.argv[1:]])
    study = {**aggregated, **extra, "claims": claims, "cells": figures, "command": command,
             "wall_seconds": time.perf_counter() - started}
    write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", markdown(aggregated, claims, command))
    plot_curves(curves, out / "curves.png")
    for claim in claims:
        log.info(f"{claim['verdict']}: {claim['text']}")
    return study

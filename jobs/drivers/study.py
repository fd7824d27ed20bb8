"""A study (``run_study``): arms × seeds of one job, each (arm, seed) cell one run in DIR/cells/<arm>-seed<seed>.

Plan: data, once (DIR/data) → for ppo and best_of_n cells, each reward ensemble the arms
use, once (DIR/reward/<variant>, every kind the arms of that variant score with) → the cells:
- ppo and best_of_n: Ray Tune trials, each inside the placement group Tune reserved for it
  (its own ``rl_plan`` or ``sampling_plan`` plus the driver's CPUs), as many at once as the
  cluster holds; best-of-n cells of one seed share their samples (DIR/samples), so arms
  that rank differently are compared on the same responses;
- reward: one Ray Train run per cell (one kind, the cell's seed), one after another, since
  Ray Train spreads each over the cluster itself;
- bandit: paper 002's numpy simulation, in the driver;
→ the aggregation over seeds (``uprlhf.studies.aggregate``) → DIR/study.json, study.md and,
for ppo and best_of_n, curves.png (gold), for ppo also uncertainty.png (u against KL).
Killed and started again on the same DIR, the study resumes: finished cells are kept
(Tune's ``Tuner.restore``; a trained kind is skipped), unfinished PPO cells resume from
their checkpoints.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.placement import rl_plan, sampling_plan, trial_bundles
from jobs.common import atomic_write_text, fail, hold_folder, log, read_json, read_records, setup_logging, start_ray, write_json
from jobs.drivers.best_of_n import run_best_of_n
from jobs.drivers.ppo import run_ppo
from jobs.drivers.prepare_data import build as prepare_data
from jobs.drivers.train_reward import pair_budget_problem, run_train_reward
from uprlhf.config import BestOfNConfig, ConfigError, RLConfig, TrainRewardConfig, build, parse_override, set_dotted
from uprlhf.data.loaders import DataError
from uprlhf.paths import RunPaths
from uprlhf.registry import Registry
from uprlhf.rl.gold_metrics import UNCERTAINTY_DIAGNOSTICS
from uprlhf.rl.replay import read_replay, replay_diagnostics
from uprlhf.studies.aggregate import aggregate, cell_figures, decide, markdown, matched_kl
from uprlhf.studies.bandit import simulate
from uprlhf.studies.config import BEST_OF_N_FIGURES, CELL_JOBS, BanditStudyConfig, StudyConfig

EXPERIMENT = "tune"  # Tune's experiment folder under DIR: the restore point
# The RL config's fields that name files or folders (a model name that is no path is left alone).
FILE_FIELDS = ("prompts", "data_dir", "reward_checkpoint", "policy.model.name_or_path", "selector.validation")


def cell_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


class Cells:
    """What every cell of a study shares: its config, output folder and data; a cell's config from (arm, seed).

    A cell's config is the job's own: an RLConfig (ppo), a TrainRewardConfig of one kind
    (reward), a BestOfNConfig (best_of_n) or a BanditStudyConfig (bandit).
    """

    def __init__(self, cfg: StudyConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.data_dir = out / "data" if cfg.data is not None else None
        self.overrides = {arm: [parse_override(o) for o in overrides] for arm, overrides in cfg.arms.items()}
        self.configs: dict[tuple[str, int], Any] = {}

    def built(self) -> None:
        """Every cell's config, validated here in the driver; the trials read them, never the files they name."""
        self.configs = {(arm, seed): self.config(arm, seed) for arm in self.cfg.arms for seed in self.cfg.seeds}

    def folder(self, arm: str, seed: int) -> Path:
        return self.out / "cells" / cell_name(arm, seed)

    def section_overrides(self, arm: str, section: str) -> dict[str, Any]:
        return {key.partition(".")[2]: value for key, value in self.overrides[arm] if key.partition(".")[0] == section}

    def variant(self, arm: str) -> str:
        """The folder (under DIR/reward) of the ensemble the arm runs against."""
        overrides = self.section_overrides(arm, "reward")
        return ",".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(overrides.items())) or "shared"

    def reward_config(self, arm: str, kinds: list[str] | None = None) -> TrainRewardConfig:
        """The ensemble training with the arm's reward.* overrides; ``kinds`` replaces the kinds it trains."""
        tree = self.cfg.reward.model_dump(mode="json")
        if tree["data_dir"] is None:
            tree["data_dir"] = str(self.data_dir)
        for path, value in self.section_overrides(arm, "reward").items():
            set_dotted(tree, path, value)
        if kinds is not None:
            tree["kinds"] = kinds
        return build(TrainRewardConfig, tree, f"arms.{arm} (reward)")

    @property
    def job(self) -> CellJob:
        return STUDY_JOBS.get(self.cfg.job)

    def config(self, arm: str, seed: int) -> Any:
        return self.job.config(self, arm, seed)

    def sampling_config(self, arm: str, seed: int, section: str, schema: type) -> Any:
        """A PPO or best-of-n cell: the base section, the arm's overrides, the seed, the shared data and ensemble.

        Relative file paths are taken from the folder the study was started in (a Tune
        trial runs in its own folder), so they are made absolute here, in the driver.
        """
        base = getattr(self.cfg, section)
        tree = base.model_dump(mode="json")
        for path, value in self.section_overrides(arm, section).items():
            set_dotted(tree, path, value)
        tree["seed"] = seed
        for path in self.cfg.seed_fields:
            set_dotted(tree, path.partition(".")[2], seed)
        for path in FILE_FIELDS:
            *parents, leaf = path.split(".")
            node = tree
            for key in parents:
                node = node.get(key) or {}
            if isinstance(node.get(leaf), str) and Path(node[leaf]).exists():
                node[leaf] = str(Path(node[leaf]).resolve())
        if self.data_dir is not None and base.prompts is None and base.data_dir is None:
            tree["data_dir"] = str(self.data_dir)
        if self.cfg.reward is not None:
            kind = tree["reward_kind"]  # its K follows from the ensemble training, so K is set before validating
            tree["reward_checkpoint"] = str(self.out / "reward" / self.variant(arm) / "checkpoints" / kind / "final")
            tree["reward_k"] = self.reward_config(arm, [kind]).ensemble_for(kind).k
        return build(schema, tree, f"arms.{arm} seed {seed}")

    def reward_cell(self, arm: str, seed: int) -> TrainRewardConfig:
        """An ensemble-training cell: one kind, trained with the cell's seed on the shared data."""
        cfg = self.reward_config(arm)
        if len(cfg.kinds) != 1:
            raise ConfigError(f"arms.{arm}: a reward study's cell trains one kind, got reward.kinds={cfg.kinds}; "
                              f"set one per arm, e.g. reward.kinds=[{cfg.kinds[0]}]")
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})

    def bandit_cell(self, arm: str, seed: int) -> BanditStudyConfig:
        tree = self.cfg.bandit.model_dump(mode="json")
        for path, value in self.section_overrides(arm, "bandit").items():
            set_dotted(tree, path, value)
        return build(BanditStudyConfig, tree, f"arms.{arm}")

    def kind(self, arm: str) -> str:
        """The ensemble kind the arm's cells score with (ppo, best_of_n) or train (reward)."""
        if self.job.kind is None:
            raise ValueError(f"a {self.cfg.job} study's cells use no reward ensemble")
        return self.job.kind(self.configs.get((arm, self.cfg.seeds[0])) or self.config(arm, self.cfg.seeds[0]))

    def plan(self, arm: str, seed: int):
        """The placement plan of a Tune cell: a PPO run's or a best-of-n run's."""
        if self.job.plan is None:
            raise ValueError(f"a {self.cfg.job} study's cells run in the driver, not in placement groups of their own")
        return self.job.plan(self.configs[arm, seed])

    def resources(self, params: dict[str, Any]):
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([{}, *trial_bundles(self.plan(params["arm"], params["seed"]), self.cfg.driver_cpus)])


def check_inputs(cfg: StudyConfig, cells: Cells) -> None:
    """Every cell's config (its ensemble training's too) and, for PPO, its penalty against the ensemble it will
    score with (a K, a member), validated before anything runs; every problem of every cell in one error."""
    problems = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            try:
                config = cells.config(arm, seed)
            except ConfigError as err:
                problems.append(str(err))
                continue
            if cells.job.in_tune and cfg.reward is not None:
                penalties = config.penalties if cfg.job == "best_of_n" else [config.penalty]
                problems += [f"arms.{arm} seed {seed}: {line}" for penalty in penalties
                             for line in penalty.ensemble_problems(config.reward_k, config.reward_kind)]
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    cells.built()


def build_shared(cfg: StudyConfig, cells: Cells) -> None:
    """Data once; each ensemble variant once, with every kind its arms use (jobs.train_reward skips finished kinds)."""
    if cfg.data is not None:
        prepare_data(cfg.data, cells.data_dir)
    if cfg.job == "reward":  # a pair budget past the data stops the study here, not at its first cell that asks
        problems = {pair_budget_problem(config, Path(config.data_dir)) for config in cells.configs.values()} - {None}
        if problems:
            raise DataError(sorted(problems))
    if cfg.reward is None or not cells.job.in_tune:
        return
    kinds: dict[str, tuple[str, list[str]]] = {}
    for arm in cfg.arms:
        kind = cells.kind(arm)
        _, used = kinds.setdefault(cells.variant(arm), (arm, []))
        if kind not in used:
            used.append(kind)
    for n, (variant, (arm, used)) in enumerate(kinds.items(), 1):
        log.info(f"reward ensemble {variant} ({n}/{len(kinds)}): {', '.join(used)}")
        run_train_reward(cells.reward_config(arm, used), cells.out / "reward" / variant)


def run_cell(params: dict[str, Any], cells: Cells) -> None:
    """The trainable: one cell's run in the placement group Tune reserved."""
    from ray import tune as ray_tune
    from ray.util import get_current_placement_group

    arm, seed = params["arm"], params["seed"]
    out = cells.folder(arm, seed)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(cells.cfg.job)
    ray_tune.report(cells.job.run(cells, arm, seed, out, get_current_placement_group()))


def run_in_driver(cells: Cells) -> None:
    """Reward and bandit cells, one after another (a cell's run keeps what it finished before)."""
    for n, (arm, seed) in enumerate(cells.configs, 1):
        log.info(f"cell {cell_name(arm, seed)} ({n}/{len(cells.configs)})")
        cells.job.run(cells, arm, seed, cells.folder(arm, seed), None)


def run_ppo_cell(cells: Cells, arm: str, seed: int, out: Path, group) -> dict:
    summary = run_ppo(cells.configs[arm, seed], out, name=cell_name(arm, seed), adopt=group)
    return {"gold_final": summary.get("gold_final")}


def run_best_of_n_cell(cells: Cells, arm: str, seed: int, out: Path, group) -> dict:
    run_best_of_n(cells.configs[arm, seed], out, adopt=group, samples_dir=cells.out / "samples")
    return {"done": 1}


def run_reward_cell(cells: Cells, arm: str, seed: int, out: Path, group) -> dict:
    """jobs.train_reward skips a kind already trained with the same settings and data: a killed study resumes."""
    run_train_reward(cells.configs[arm, seed], out)
    return {"done": 1}


def run_bandit_cell(cells: Cells, arm: str, seed: int, out: Path, group) -> dict:
    if not (out / "summary.json").exists():
        bandit = cells.configs[arm, seed]
        result = simulate(bandit, seed)
        own = result[bandit.policy]
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "summary.json", {"policy": bandit.policy, "reference_return": result["reference_return"],
                                          "return_mean": own["mean"], "return_std": own["std"],
                                          "p_below_reference": own["p_below_reference"]})
    return {"done": 1}


def concurrency(cfg: StudyConfig, cells: Cells) -> int:
    """Cells at once: as set, or as many as the cluster's CPUs and GPUs hold (the largest cell decides)."""
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    total = {r: ray.cluster_resources().get(r, 0.0) for r in ("CPU", "GPU")}
    fits = []
    for arm in cfg.arms:
        bundles = trial_bundles(cells.plan(arm, cfg.seeds[0]), cfg.driver_cpus)
        need = {r: sum(b.get(r, 0.0) for b in bundles) for r in total}
        fits += [int((total[r] + 1e-9) // need[r]) for r in need if need[r] > 0]
    if min(fits) < 1:
        fail(f"a cell needs more than the cluster's {total['CPU']:g} CPU and {total['GPU']:g} GPU; lower the {cfg.job} worker counts")
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


def cell_summaries(cfg: StudyConfig, cells: Cells) -> dict:
    """Per (arm, seed) the cell's summary.json; a missing cell ends the study."""
    summaries, missing = {}, []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            summary = read_json(cells.folder(arm, seed) / "summary.json")
            if summary:
                summaries.setdefault(arm, {})[seed] = summary
            else:
                missing.append(cell_name(arm, seed))
    if missing:
        fail(f"cells without a summary (failed; see {cells.out / EXPERIMENT} or the log): {', '.join(missing)}", 1)
    return summaries


def step_uncertainty(records: list[dict], steps: int) -> list[tuple[float, float]]:
    """A cell's (KL, u) at each PPO step; the final evaluation's record (step = steps) repeats the last step's."""
    return [(r["kl"], r["uncertainty"]) for r in records if r["step"] < steps and r.get("uncertainty") is not None]


def cell_diagnostics(folder: Path) -> dict:
    """Whether the cell's u saw its own errors, read from its replay buffer (so cells from before the figures have them)."""
    replay = RunPaths(folder).replay
    if not replay.is_dir():
        return dict.fromkeys(UNCERTAINTY_DIAGNOSTICS)
    return replay_diagnostics(read_replay(replay))


def ppo_figures(cells: Cells, summaries: dict) -> tuple[dict, dict, dict]:
    """Per cell its summary's figures, the gold at the KL every cell reached, the win rate against the baseline's
    cell and the rank correlation of u with KL over its steps; plots curves.png (gold) and uncertainty.png (u)."""
    cfg = cells.cfg
    records = {(arm, seed): read_records(cells.folder(arm, seed)) for arm in cfg.arms for seed in cfg.seeds}
    curves = {arm: {seed: curve(records[arm, seed]) for seed in cfg.seeds} for arm in cfg.arms}
    steps = {arm: {seed: step_uncertainty(records[arm, seed], cells.configs[arm, seed].ppo.steps) for seed in cfg.seeds}
             for arm in cfg.arms}
    kl = matched_kl(curves)
    base = summaries[cfg.baseline]
    figures = {
        arm: {seed: {**cell_figures(summaries[arm][seed], curves[arm][seed], kl, base[seed].get("gold_per_prompt_final"),
                                    steps[arm][seed], cfg.metrics),
                     **cell_diagnostics(cells.folder(arm, seed))}
              for seed in cfg.seeds}
        for arm in cfg.arms
    }
    kl_axis = "KL to the reference (mean over seeds)"
    plots = {"curves.png": Plot(curves, kl_axis), "uncertainty.png": Plot(steps, kl_axis, ylabel="ensemble std u")}
    return figures, plots, {"matched_kl": kl}


def best_of_n_figures(cells: Cells, summaries: dict) -> tuple[dict, dict, dict]:
    """Per cell the ranked response's gold, proxy and u at each n; plots curves.png (gold against n)."""
    figures, curves = {}, {}
    for (arm, seed), config in cells.configs.items():
        named = summaries[arm][seed]["best_of_n"][config.penalties[0].name]
        rows = {n: named[str(n)] for n in sorted(config.n)}  # summary.json is written with sorted keys: "16" before "2"
        figures.setdefault(arm, {})[seed] = {f"{f}_n{n}": row[f] for n, row in rows.items() for f in BEST_OF_N_FIGURES}
        curves.setdefault(arm, {})[seed] = [(float(n), row["gold"]) for n, row in rows.items()]
    return figures, {"curves.png": Plot(curves, "n (best of n samples per prompt)", log_x=True)}, {}


def reward_figures(cells: Cells, summaries: dict) -> tuple[dict, dict, dict]:
    """Per cell the trained kind's held-out figures."""
    figures = {arm: {seed: {m: summaries[arm][seed]["kinds"][cells.kind(arm)].get(m) for m in cells.cfg.metrics}
                     for seed in cells.cfg.seeds} for arm in cells.cfg.arms}
    return figures, {}, {}


def bandit_figures(cells: Cells, summaries: dict) -> tuple[dict, dict, dict]:
    figures = {arm: {seed: {m: summaries[arm][seed][m] for m in cells.cfg.metrics} for seed in cells.cfg.seeds}
               for arm in cells.cfg.arms}
    return figures, {}, {}


@dataclass(frozen=True)
class Plot:
    """One figure of a study: per arm and seed a curve of (x, y) points, and its axes."""

    curves: dict
    xlabel: str
    log_x: bool = False
    ylabel: str = "gold reward"


def plot_curves(plot: Plot, path: Path) -> None:
    """Per arm the mean over seeds at each point and a band of ± one std (gold or u against KL, or gold against n)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, seeds in plot.curves.items():
        length = min(len(points) for points in seeds.values())
        kls = np.array([[k for k, _ in points[:length]] for points in seeds.values()])
        golds = np.array([[g for _, g in points[:length]] for points in seeds.values()])
        mean, std = golds.mean(0), golds.std(0, ddof=1) if len(golds) > 1 else np.zeros(length)
        line, = ax.plot(kls.mean(0), mean, marker="o", label=f"{arm} (n={len(golds)})")
        ax.fill_between(kls.mean(0), mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(plot.xlabel)
    if plot.log_x:
        ax.set_xscale("log", base=2)
    ax.set_ylabel(plot.ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(cfg: StudyConfig, out: Path) -> dict:
    """Shared work → every cell (Tune trials or in the driver) → study.json, study.md and the job's plots in ``out``."""
    started = time.perf_counter()
    cells = Cells(cfg, out)
    check_inputs(cfg, cells)
    hold_folder(out, cfg, "study", "study_state.json")
    if cells.job.needs_ray:
        start_ray()
    build_shared(cfg, cells)
    if cells.job.in_tune:
        make_tuner(cfg, cells, concurrency(cfg, cells)).fit()
    else:
        run_in_driver(cells)
    figures, plots, extra = cells.job.figures(cells, cell_summaries(cfg, cells))
    aggregated = aggregate(figures, cfg.baseline, cfg.metrics)
    claims = [decide(claim, aggregated, figures) for claim in cfg.claims]
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "jobs.study", *sys.argv[1:]])
    study = {**aggregated, **extra, "claims": claims, "cells": figures, "command": command,
             "wall_seconds": time.perf_counter() - started}
    write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", markdown(aggregated, claims, command))
    for name, plot in plots.items():
        plot_curves(plot, out / name)
    for claim in claims:
        log.info(f"{claim['verdict']}: {claim['text']}")
    return study


@dataclass(frozen=True)
class CellJob:
    """How a study builds, runs and reads the cells of one job (``StudyConfig.job``)."""

    config: Callable[[Cells, str, int], Any]
    """(cells, arm, seed) → the cell's own job config, validated in the driver."""
    run: Callable[[Cells, str, int, Path, Any], dict]
    """(cells, arm, seed, folder, placement group or None) → what a Tune trial reports."""
    figures: Callable[[Cells, dict], tuple[dict, dict, dict]]
    """(cells, per arm and seed the cell's summary.json) → per cell its figures, the plots by file name, study extras."""
    plan: Callable[[Any], Any] | None = None
    """The cell's placement plan, for a job whose cells are Ray Tune trials; None: cells run in the driver
    (a reward cell is a Ray Train run that spreads over the cluster itself, a bandit cell a numpy simulation)."""
    kind: Callable[[Any], str] | None = None
    """Cell config → the ensemble kind it scores with or trains; None: no ensemble."""
    needs_ray: bool = True
    """False: the cells run in the driver without a Ray cluster (the bandit's numpy simulation)."""

    @property
    def in_tune(self) -> bool:
        return self.plan is not None


STUDY_JOBS: Registry[CellJob] = Registry("study job")
STUDY_JOBS.add("ppo", CellJob(
    config=lambda cells, arm, seed: cells.sampling_config(arm, seed, "rl", RLConfig), run=run_ppo_cell,
    figures=ppo_figures, plan=rl_plan, kind=lambda config: config.reward_kind))
STUDY_JOBS.add("reward", CellJob(config=Cells.reward_cell, run=run_reward_cell, figures=reward_figures,
                                 kind=lambda config: config.kinds[0]))
STUDY_JOBS.add("best_of_n", CellJob(
    config=lambda cells, arm, seed: cells.sampling_config(arm, seed, "best_of_n", BestOfNConfig), run=run_best_of_n_cell,
    figures=best_of_n_figures, plan=sampling_plan, kind=lambda config: config.reward_kind))
STUDY_JOBS.add("bandit", CellJob(config=Cells.bandit_cell, run=run_bandit_cell, figures=bandit_figures, needs_ray=False))
if set(STUDY_JOBS) != set(CELL_JOBS):
    raise ImportError(f"study jobs {sorted(STUDY_JOBS)} and the config's CELL_JOBS {sorted(CELL_JOBS)} differ")

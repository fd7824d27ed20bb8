"""Ray Tune over whole PPO runs: each trial is a ``jobs.ppo`` run holding its own placement group.

    python -m tune.sweep --config tune/configs/tiny.yaml [dotted.key=value ...] [--output-dir DIR]

Plan: data, once (DIR/data) → reward ensemble, once, or once per combination of swept
ensemble parameters (DIR/reward/<variant>) → Tune: one ``jobs.ppo`` run per trial
(DIR/trials/<trial>), each reserving every bundle of its placement plan plus its
driver's CPUs, as many at once as the cluster holds, ASHA on the gold reward → a live
table while it runs → DIR/results.csv, results.md, pareto.png, best.yaml (a ``jobs.ppo``
config as it is) and summary.json. Killed and started again on the same DIR, the sweep
resumes (``Tuner.restore``): finished trials are kept, unfinished ones resume from their
own checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path

from jobs.drivers.prepare_data import build as prepare_data
from jobs.drivers.train_reward import run_train_reward
from jobs.common import fail, hold_folder, log, parse, start_ray, write_json
from tune.config import SweepConfig
from tune.monitor import LiveTable, ResourcePeak
from tune.results import best_row, pareto_front, plot_front, trial_row, write_best, write_tables
from tune.space import SEARCHERS, ensemble_key, ensemble_variants, param_space, reward_config
from tune.trial import Trials, run_trial, trial_totals
from uprlhf.config import RLConfig, load_config

EXPERIMENT = "tune"  # Tune's experiment folder under DIR: the restore point


def trial_name(trial) -> str:
    """Trial names label the trial's folder, its row and its dashboard gauges."""
    return f"trial_{trial.trial_id}"


def check_resumable(cfg: SweepConfig, out: Path) -> None:
    """A DIR holds one sweep: started again with another config, stop instead of mixing trials."""
    hold_folder(out, cfg, "sweep", "sweep.json")


def build_data(cfg: SweepConfig, out: Path) -> Path | None:
    if not cfg.needs_data:
        return None
    prepare_data(cfg.data, out / "data")
    return out / "data"


def train_ensembles(cfg: SweepConfig, out: Path, data_dir: Path | None) -> None:
    """Each ensemble variant trained once, before any trial (jobs.train_reward skips finished ones)."""
    if cfg.reward is None:
        return
    variants = ensemble_variants(cfg)
    for n, overrides in enumerate(variants, 1):
        log.info(f"reward ensemble {ensemble_key(overrides)} ({n}/{len(variants)})")
        run_train_reward(reward_config(cfg, overrides, data_dir), out / "reward" / ensemble_key(overrides))


def concurrency(cfg: SweepConfig, total: dict[str, float]) -> int:
    """Trials at once: as set, or as many as the cluster's CPUs and GPUs hold."""
    need = trial_totals(cfg.rl, cfg.resources.driver_cpus)
    log.info(f"each trial holds {need['CPU']:g} CPU and {need['GPU']:g} GPU; the cluster has "
             f"{total['CPU']:g} CPU and {total['GPU']:g} GPU")
    if cfg.resources.max_concurrent:
        return cfg.resources.max_concurrent
    fits = [int((total[r] + 1e-9) // need[r]) for r in need if need[r] > 0]
    if min(fits) < 1:
        fail(f"a trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU but the cluster has {total['CPU']:g} and "
             f"{total['GPU']:g}; lower the rl worker counts or cpus, or set resources.max_concurrent on an autoscaling cluster")
    return min(fits)


def scheduler(cfg: SweepConfig):
    """ASHA on the gold reward over PPO steps (the ``step`` every trial reports), or first in, first out."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = cfg.asha
    if not asha.enabled:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", metric=asha.metric, mode="max", max_t=cfg.rl.ppo.steps,
                         grace_period=asha.grace_period, reduction_factor=asha.reduction_factor)


def make_tuner(cfg: SweepConfig, out: Path, trials: Trials, max_concurrent: int):
    """A new Tuner, or the one a killed sweep left in DIR/tune."""
    from ray import tune as ray_tune

    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, trials=trials), trials.resources)
    path = out / EXPERIMENT
    if ray_tune.Tuner.can_restore(path):
        log.info(f"resuming the sweep in {path}")
        return ray_tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return ray_tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=ray_tune.TuneConfig(
            search_alg=SEARCHERS[cfg.search.algorithm](cfg, max_concurrent),
            scheduler=scheduler(cfg),
            num_samples=cfg.search.num_samples,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=ray_tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out),
            callbacks=[LiveTable(list(cfg.space))],
            verbose=0,
            failure_config=ray_tune.FailureConfig(max_failures=0),
        ),
    )


def collect(grid, cfg: SweepConfig, out: Path) -> list[dict]:
    """One row per trial of the result grid, in trial order."""
    rows = []
    for result in grid:
        name = Path(result.path).name
        config_path = out / "trials" / name / "config.yaml"
        config = load_config(RLConfig, config_path) if config_path.exists() else None
        error = str(result.error) if result.error else None
        rows.append(trial_row(name, dict(result.config), dict(result.metrics or {}), error, config, cfg.rl.ppo.steps))
    return sorted(rows, key=lambda r: r["trial"])


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(SweepConfig, __doc__, argv)
    check_resumable(cfg, out)
    started = time.perf_counter()
    start_ray()
    with ResourcePeak() as peak:
        data_dir = build_data(cfg, out)
        train_ensembles(cfg, out, data_dir)
        trials = Trials(cfg, out, data_dir)
        max_concurrent = concurrency(cfg, peak.total)
        grid = make_tuner(cfg, out, trials, max_concurrent).fit()
    rows = collect(grid, cfg, out)
    if not rows:
        fail("the sweep ran no trial")
    write_tables(rows, out)
    front = pareto_front(rows)
    plot_front(rows, front, out / "pareto.png")
    best, plain = best_row(rows), best_row(rows, penalty="mean")
    if best is not None:
        write_best(best, out / "trials" / best["trial"], out / "best.yaml")
    need = trial_totals(cfg.rl, cfg.resources.driver_cpus)
    summary = {
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"].startswith("stopped") for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "wall_seconds": time.perf_counter() - started,
        "best": best,
        "best_config": str(out / "best.yaml") if best else None,
        "plain_ppo": plain,
        "pareto_front": front,
        "max_concurrent": max_concurrent,
        "trial_cpus": need["CPU"],
        "trial_gpus": need["GPU"],
        "peak_cpus_in_use": peak.in_use("CPU"),
        "cpus_available": peak.total["CPU"],
        "peak_gpus_in_use": peak.in_use("GPU"),
        "gpus_available": peak.total["GPU"],
    }
    write_json(out / "summary.json", summary)
    print((out / "results.md").read_text(), flush=True)
    if best is None:
        fail(f"no trial completed; see {out / 'results.md'}")
    versus = f"; plain PPO (mean) best {plain['trial']}: gold {plain['gold']:.4f} at KL {plain['kl']:.4f}" if plain else ""
    log.info(f"{len(rows)} trials in {summary['wall_seconds'] / 60:.1f} min; best {best['trial']} ({best['penalty']}): "
             f"gold {best['gold']:.4f} at KL {best['kl']:.4f}{versus}; peak {summary['peak_cpus_in_use']:g} of "
             f"{summary['cpus_available']:g} CPUs in use; {out / 'best.yaml'}")


if __name__ == "__main__":
    main()

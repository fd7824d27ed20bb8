"""The main job: Steps 1-3 end to end on one output folder.

    python -m jobs.pipeline --config jobs/configs/demo.yaml --output-dir DIR

prepare data (DIR/data, cached per config) → train and evaluate the reward
ensembles of every configured kind (DIR/checkpoints, the ensemble table) → one PPO
run per configured penalty, all from the same policy and ensemble
(DIR/rl/<penalty>; with ``selector.strategy`` set, each refines its ensemble as it
trains) → gold evaluation → DIR/report.html with the overoptimisation
plots and DIR/summary.json (``penalties.<name>.gold_final`` …). Started again on
the same DIR, every stage resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from jobs.common import exit_on_error, fail, log, parse, read_json, read_records, write_config, write_json
from jobs.drivers.ppo import run_ppo
from jobs.drivers.prepare_data import build as prepare_data
from jobs.drivers.train_reward import run_train_reward
from uprlhf.config import PipelineConfig
from uprlhf.paths import RunPaths


class Progress:
    """One line per stage with the time spent and an ETA for the rest of the pipeline."""

    def __init__(self, stages: list[tuple[str, float]]):
        self.stages = stages  # (name, expected share of the total time)
        self.started = time.perf_counter()
        self.done = 0.0

    def finished(self, name: str) -> None:
        share = dict(self.stages)[name]
        self.done += share
        elapsed = time.perf_counter() - self.started
        eta = elapsed * (1 - self.done) / self.done if self.done else float("nan")
        log.info("%s done; %.1f min so far, about %.1f min to go", name, elapsed / 60, eta / 60)


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(PipelineConfig, __doc__, argv)
    if cfg.rl.base.reward_kind not in cfg.reward.kinds:
        fail(f"rl.base.reward_kind={cfg.rl.base.reward_kind!r} is not trained here; reward.kinds={cfg.reward.kinds}")
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    with exit_on_error():
        run_pipeline(cfg, out)


def run_pipeline(cfg: PipelineConfig, out: Path) -> None:
    """Data → reward ensembles → one PPO run per penalty → report; every stage resumes where it stopped."""
    from uprlhf.report import summarize, write_report

    names = [p.name for p in cfg.rl.penalties]
    # Rough shares of the demo's time, for the ETA: data, reward models, then the PPO runs.
    progress = Progress([("data", 0.1), ("reward", 0.15)] + [(f"rl/{n}", 0.75 / len(names)) for n in names])
    started = time.perf_counter()
    manifest = prepare_data(cfg.data, out / "data")
    progress.finished("data")
    reward_summary = run_train_reward(cfg.reward.replace(data_dir=str(out / "data")), out)
    progress.finished("reward")

    runs, penalties = {}, {}
    for penalty in cfg.rl.penalties:
        rl_cfg = cfg.rl.base.replace(
            penalty=penalty,
            data_dir=str(out / "data"),
            reward_checkpoint=str(RunPaths(out).reward_checkpoint(cfg.rl.base.reward_kind)),
            reward_k=cfg.reward.ensemble.k,
            selector=cfg.selector,
        )
        rl_out = out / "rl" / penalty.name
        rl_out.mkdir(parents=True, exist_ok=True)
        penalties[penalty.name] = run_ppo(rl_cfg, rl_out, name=penalty.name)
        runs[penalty.name] = read_records(rl_out)
        progress.finished(f"rl/{penalty.name}")

    figures = summarize(runs)
    for name in penalties:
        penalties[name].update(figures[name])
    summary = {
        **read_json(out / "summary.json"),
        **reward_summary,
        "data": manifest,
        "penalties": penalties,
        "pipeline_seconds": time.perf_counter() - started,
    }
    write_json(out / "summary.json", summary)
    table = (out / "ensemble_table.md").read_text() if (out / "ensemble_table.md").exists() else ""
    report = write_report(
        out, runs, figures, title="uprlhf: PPO against a reward ensemble", extra_markdown_tables={"Reward ensembles": table}
    )
    log.info("penalties:\n%s", penalty_table(figures))
    log.info("done in %.1f min; report: %s", summary["pipeline_seconds"] / 60, report)


def penalty_table(figures: dict[str, dict]) -> str:
    keys = ("gold_at_matched_kl", "gold_final", "gold_best", "kl_final", "uncertainty_mean", "alarm_first_step", "gold_peak_step")
    lines = ["| penalty | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, row in figures.items():
        cells = ["–" if row.get(k) is None else f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

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

from jobs import ppo, prepare_data, train_reward
from jobs.common import fail, parse, read_json, write_json
from uprlhf.config import PipelineConfig


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
        print(f"[pipeline] {name} done; {elapsed / 60:.1f} min so far, about {eta / 60:.1f} min to go", flush=True)


def main(argv: list[str] | None = None) -> None:
    from uprlhf.report import summarize, write_report

    cfg, out = parse(PipelineConfig, __doc__, argv)
    if cfg.rl.base.reward_kind not in cfg.reward.kinds:
        fail(f"rl.base.reward_kind={cfg.rl.base.reward_kind!r} is not trained here; reward.kinds={cfg.reward.kinds}")
    names = [p.name for p in cfg.rl.penalties]
    # Rough shares of the demo's time, for the ETA: data, reward models, then the PPO runs.
    progress = Progress([("data", 0.1), ("reward", 0.15)] + [(f"rl/{n}", 0.75 / len(names)) for n in names])
    started = time.perf_counter()
    manifest = prepare_data.build(cfg.data, out / "data")
    progress.finished("data")
    reward_summary = train_reward.run(cfg.reward.model_copy(update={"data_dir": str(out / "data")}), out)
    progress.finished("reward")

    runs, penalties = {}, {}
    for penalty in cfg.rl.penalties:
        rl_cfg = cfg.rl.base.model_copy(
            update={
                "penalty": penalty,
                "data_dir": str(out / "data"),
                "reward_checkpoint": str(out / "checkpoints" / cfg.rl.base.reward_kind / "final"),
                "reward_k": cfg.reward.ensemble.k,
                "selector": cfg.selector,
            }
        )
        rl_out = out / "rl" / penalty.name
        rl_out.mkdir(parents=True, exist_ok=True)
        penalties[penalty.name] = ppo.run(rl_cfg, rl_out, name=penalty.name)
        runs[penalty.name] = ppo.read_records(rl_out)
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
    print(penalty_table(figures), flush=True)
    print(f"[pipeline] done in {summary['pipeline_seconds'] / 60:.1f} min; report: {report}", flush=True)


def penalty_table(figures: dict[str, dict]) -> str:
    keys = ("gold_at_matched_kl", "gold_final", "gold_best", "kl_final", "uncertainty_mean", "alarm_first_step", "gold_peak_step")
    lines = ["| penalty | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, row in figures.items():
        cells = ["–" if row.get(k) is None else f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

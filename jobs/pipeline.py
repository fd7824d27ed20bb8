"""The main job: Steps 1-3 end to end on one output folder.

    python -m jobs.pipeline --config jobs/configs/demo.yaml --output-dir DIR

prepare data (DIR/data, cached per config) → with an ``sft`` section, fine-tune the
policy on the data's SFT examples (DIR/sft; the PPO runs start from and regularise
towards DIR/sft/policy) → train and evaluate the reward
ensembles of every configured kind (DIR/checkpoints, the ensemble table) → one PPO
run per configured penalty, all from the same policy and ensemble
(DIR/rl/<penalty>; with ``selector.strategy`` set, each refines its ensemble as it
trains) → gold evaluation → DIR/report.html with the overoptimisation
plots and DIR/summary.json (``penalties.<name>.gold_final`` …). Started again on
the same DIR, every stage resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from jobs.common import exit_on_error, fail, log, parse, read_json, read_records, write_config, write_json
from jobs.drivers.ppo import run_ppo
from jobs.drivers.prepare_data import build as prepare_data
from jobs.drivers.sft import run_sft
from jobs.drivers.train_reward import run_train_reward
from uprlhf.config import ConfigError, PipelineConfig, RLConfig, build
from uprlhf.paths import RunPaths
from uprlhf.sft.trainer import POLICY_DIR


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
    problems = feasibility_problems(cfg)
    if problems:
        fail("\n".join(problems))  # before any stage runs, so no minutes go into data a later stage cannot use
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    with exit_on_error():
        run_pipeline(cfg, out)


def stage_configs(cfg: PipelineConfig, out: Path) -> dict[str, RLConfig]:
    """The PPO config of each penalty run, as the pipeline runs it (validated here: ConfigError if one is bad)."""
    configs = {}
    base = cfg.rl.base.model_dump(mode="json")
    if cfg.sft is not None:  # π_SFT is both the starting policy and the reference
        base["policy"]["model"]["name_or_path"] = str(out / "sft" / POLICY_DIR)
    for penalty in cfg.rl.penalties:
        tree = {
            **base,
            "penalty": penalty.model_dump(mode="json"),
            "data_dir": str(out / "data"),
            "reward_checkpoint": str(RunPaths(out).reward_checkpoint(cfg.rl.base.reward_kind)),
            "reward_k": cfg.reward.ensemble_for(cfg.rl.base.reward_kind).k,
            "selector": cfg.selector.model_dump(mode="json"),
        }
        configs[penalty.name] = build(RLConfig, tree, f"rl.base with penalty {penalty.name}")
    return configs


def feasibility_problems(cfg: PipelineConfig) -> list[str]:
    """Why a later stage could not run, found before the first one starts (one line each; empty when all can).

    The data stage's split gives the prompt counts the later stages need: enough reward
    pairs to train on, RL prompts for the held-out evaluation and the PPO batches. The
    reward kind PPO runs against must be trained here, every penalty's PPO config must
    hold, and the LoRA targets must name modules of the models (checked on the meta device).
    """
    from uprlhf.data.sentiment import split_prompts

    problems = []
    data, base = cfg.data, cfg.rl.base
    if base.reward_kind not in cfg.reward.kinds:
        problems.append(f"rl.base.reward_kind={base.reward_kind!r} is not trained here; reward.kinds={cfg.reward.kinds}")
    sizes = {name: len(part) for name, part in split_prompts([str(i) for i in range(data.n_prompts)], data.split).items()}
    made = f"data.n_prompts={data.n_prompts} with data.split={list(data.split)}"
    n_reward = sizes["reward"]
    if n_reward < 2:
        problems.append(f"{made} gives {n_reward} reward prompt(s); reward training needs at least 2")
    else:
        n_test = min(n_reward - 1, max(1, round(n_reward * data.reward_test_fraction)))
        most_pairs = (n_reward - n_test) * math.comb(data.completions_per_prompt, 2)
        if most_pairs < 2:
            problems.append(
                f"{made} gives at most {most_pairs} reward training pair(s) ({n_reward - n_test} prompts, "
                f"data.completions_per_prompt={data.completions_per_prompt}); reward training needs at least 2"
            )
    if base.prompts is None:  # the PPO runs read the data stage's RL prompts
        n_rl = sizes["rl"]
        if n_rl <= base.eval_prompts:
            problems.append(
                f"{made} gives {n_rl} RL prompts, which leave none for training after rl.base.eval_prompts={base.eval_prompts}; "
                "raise data.n_prompts or lower rl.base.eval_prompts"
            )
        elif n_rl - base.eval_prompts < base.ppo.batch_size // base.ppo.samples_per_prompt:
            problems.append(
                f"{made} gives {n_rl} RL prompts: {n_rl - base.eval_prompts} for training after rl.base.eval_prompts="
                f"{base.eval_prompts}, fewer than the {base.ppo.batch_size // base.ppo.samples_per_prompt} prompts a step samples "
                f"(rl.base.ppo.batch_size={base.ppo.batch_size} / samples_per_prompt={base.ppo.samples_per_prompt}; "
                "a batch would repeat prompts)"
            )
    try:
        stage_configs(cfg, Path("OUTPUT_DIR"))
    except ConfigError as err:
        problems.append(str(err))
    problems += model_problems(cfg)
    return problems


def model_problems(cfg: PipelineConfig) -> list[str]:
    """LoRA targets of the policy and of the reward backbone that name no module of the model."""
    from jobs.drivers.train_reward import lora_problems
    from uprlhf.models import lora_target_problem

    problems = []
    policy = cfg.rl.base.policy
    checks = [("reward.backbone", lambda: lora_problems(cfg.reward, prefix="reward."))]
    if policy.lora_rank is not None:
        field = "rl.base.policy.lora_target_modules"
        checks.append(("rl.base.policy.model", lambda: [p for p in [lora_target_problem(policy.model, policy.lora_target_modules, field)] if p]))
    for where, check in checks:
        try:
            problems += check()
        except (OSError, ValueError) as err:
            problems.append(f"{where}: cannot read the model's config ({' '.join(str(err).split())[:200]})")
    return problems


def run_pipeline(cfg: PipelineConfig, out: Path) -> None:
    """Data → reward ensembles → one PPO run per penalty → report; every stage resumes where it stopped."""
    from uprlhf.report import summarize, write_report

    names = [p.name for p in cfg.rl.penalties]
    # Rough shares of the demo's time, for the ETA: data, reward models, then the PPO runs.
    sft_share = 0.1 if cfg.sft is not None else 0.0
    progress = Progress([("data", 0.1), ("sft", sft_share), ("reward", 0.15)] + [(f"rl/{n}", (0.75 - sft_share) / len(names)) for n in names])
    started = time.perf_counter()
    manifest = prepare_data(cfg.data, out / "data")
    progress.finished("data")
    sft_summary = None
    if cfg.sft is not None:
        sft_summary = run_sft(cfg.sft.replace(data_dir=str(out / "data")), out / "sft")
        progress.finished("sft")
    reward_summary = run_train_reward(cfg.reward.replace(data_dir=str(out / "data")), out)
    progress.finished("reward")

    runs, penalties = {}, {}
    rl_configs = stage_configs(cfg, out)
    for penalty in cfg.rl.penalties:
        rl_cfg = rl_configs[penalty.name]
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
        "sft": sft_summary,
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

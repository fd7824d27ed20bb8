"""Is the policy's drift novel to the reward data? Distance of PPO runs' samples from the reward pairs.

    python -m jobs.novelty --output-dir DIR data_dir=runs/demo/data \\
        reward_checkpoint=runs/demo/checkpoints/linear/final "runs=[runs/s12/cells/mean_loss-seed0, ...]"

No Ray: one process reads the runs' replay buffers. For each novelty space
(``uprlhf.rl.novelty.NOVELTY_SPACES``): the reward pairs' responses are the reference → the
space's OOD AUROC (held-out pair responses against ood.parquet: does it see odd text at all?)
→ per run, each sample's novelty through ``uncertainty_diagnostics`` in u's place, beside the
run's own u → DIR/novelty.json (per run, and mean ± std over the runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jobs.common import exit_on_error, log, parse, write_config, write_json
from uprlhf.config import ConfigError, NoveltyConfig
from uprlhf.data.loaders import load_preferences, load_responses
from uprlhf.paths import DataPaths
from uprlhf.reward.ensembles import MANIFEST
from uprlhf.reward.metrics import ood_auroc
from uprlhf.rl.gold_metrics import UNCERTAINTY_DIAGNOSTICS, uncertainty_diagnostics
from uprlhf.rl.novelty import NOVELTY_SPACES, novelty_scorer
from uprlhf.rl.replay import read_replay, replay_arrays


def check_inputs(cfg: NoveltyConfig) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The reward data and every run's scored samples, or one clear error before any model loads."""
    data = DataPaths(Path(cfg.data_dir))
    reference = {
        "train": load_preferences(data.find("reward_train")).rows,
        "test": load_preferences(data.find("reward_test")).rows,
        "ood": load_responses(data.find("ood")).rows,
    }
    if not (Path(cfg.reward_checkpoint) / MANIFEST).is_file():
        raise ConfigError(f"reward_checkpoint: no {MANIFEST} in {cfg.reward_checkpoint} (a jobs.train_reward checkpoint folder)")
    runs = {}
    for i, run in enumerate(cfg.runs):
        try:
            table = read_replay(Path(run) / "replay")
        except FileNotFoundError as err:
            raise ConfigError(f"runs[{i}]: {err} (a PPO run folder)") from None
        arrays = replay_arrays(table)
        if arrays["row"].size < 3:
            raise ConfigError(f"runs[{i}]: {run} has {arrays['row'].size} replay rows with a gold; at least 3 are needed")
        rows = table.select(["prompt", "response"]).take(arrays["row"])
        runs[run] = {**arrays, "prompt": rows["prompt"].to_pylist(), "response": rows["response"].to_pylist()}
    return reference, runs


def spread(per_run: dict[str, dict], measure: str) -> dict[str, list[float | None]]:
    """[mean, std] over the runs of each diagnostic of ``measure`` (None where a run has no value)."""
    out = {}
    for key in UNCERTAINTY_DIAGNOSTICS:
        values = [r[measure][key] for r in per_run.values() if r[measure][key] is not None]
        out[key] = [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None] if values else [None, None]
    return out


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(NoveltyConfig, __doc__, argv)
    with exit_on_error():
        reference, runs = check_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)

    train, test = reference["train"], reference["test"]
    per_run = {run: {"ensemble_u": uncertainty_diagnostics(r["uncertainty"], r["kl"], r["proxy"], r["gold"])} for run, r in runs.items()}
    spaces = {}
    for space in cfg.spaces:
        log.info("space %s: embedding %d reference responses", space, 2 * len(train))
        embed = NOVELTY_SPACES.get(space)(cfg)
        novelty = novelty_scorer(embed([r["prompt"] for r in train] * 2, [r["chosen"] for r in train] + [r["rejected"] for r in train]))
        held_out = novelty(embed([r["prompt"] for r in test] * 2, [r["chosen"] for r in test] + [r["rejected"] for r in test]))
        odd = novelty(embed([r["prompt"] for r in reference["ood"]], [r["response"] for r in reference["ood"]]))
        spaces[space] = {"ood_auroc": ood_auroc(held_out, odd)}
        for run, r in runs.items():
            per_run[run][space] = uncertainty_diagnostics(novelty(embed(r["prompt"], r["response"])), r["kl"], r["proxy"], r["gold"])
        log.info("space %s: OOD AUROC %.3f, hacked-sample AUROC %.3f over %d runs", space, spaces[space]["ood_auroc"],
                 spread(per_run, space)["u_hacked_auroc"][0], len(runs))
    summary = {measure: spread(per_run, measure) for measure in ["ensemble_u", *cfg.spaces]}
    for measure, figures in summary.items():
        log.info("%-16s %s", measure, "  ".join(f"{k} {m:.3f} ± {s:.3f}" if s is not None else f"{k} {m}" for k, (m, s) in figures.items()))
    write_json(out / "novelty.json", {"spaces": spaces, "summary": summary, "runs": per_run})


if __name__ == "__main__":
    main()

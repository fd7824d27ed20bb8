"""Is the policy's drift novel to the reward data? Distance of PPO runs' samples from the reward pairs.

    python -m jobs.novelty --output-dir DIR "runs=[runs/s12/cells/mean_loss-seed0, runs/s12/cells/mean_loss-seed1]"

No Ray: one process reads the runs' replay buffers; the runs' own configs name the reward data,
the ensemble and the policy, and must agree on them. For each novelty space
(``uprlhf.rl.novelty.NOVELTY_SPACES``): both responses of every reward_train pair are the
reference → the space's OOD AUROC (the held-out pairs' responses against ood: does it see odd
text at all?) → per run, each sample's novelty through ``uncertainty_diagnostics`` in u's place,
beside the run's own u → DIR/novelty.json (per run, and mean ± std over the runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jobs.common import exit_on_error, log, parse, write_config, write_json
from jobs.drivers.inputs import reward_checkpoint_of
from uprlhf.config import ConfigError, NoveltyConfig, RLConfig, load_config
from uprlhf.data.loaders import load_preferences, load_responses
from uprlhf.paths import DataPaths, data_paths
from uprlhf.reward.ensembles import MANIFEST, kinds_with_head_inputs
from uprlhf.reward.metrics import ood_auroc
from uprlhf.reward.training import TOKENIZER_DIR
from uprlhf.rl.gold_metrics import UNCERTAINTY_DIAGNOSTICS, uncertainty_diagnostics
from uprlhf.rl.novelty import NOVELTY_SPACES, NoveltySources, novelty_scorer
from uprlhf.rl.replay import read_replay, replay_arrays

OUTPUT = "novelty.json"


def read_run(i: int, run: Path) -> tuple[RLConfig, dict]:
    """A run's config and its scored samples that have a gold; a ConfigError naming ``runs[i]`` otherwise."""
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"runs[{i}]: no config.yaml in {run} (a jobs.ppo output folder)")
    try:
        run_cfg = load_config(RLConfig, run / "config.yaml")
        table = read_replay(run / "replay")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        raise ConfigError(f"runs[{i}]: {err}") from None
    arrays = replay_arrays(table)
    if arrays["row"].size < 3:
        raise ConfigError(f"runs[{i}]: {run / 'replay'} has {arrays['row'].size} rows with a gold; at least 3 are needed")
    rows = table.select(["prompt", "response"]).take(arrays["row"])
    return run_cfg, {**arrays, "prompt": rows["prompt"].to_pylist(), "response": rows["response"].to_pylist()}


def check_inputs(cfg: NoveltyConfig) -> tuple[NoveltySources, dict[str, list[dict]], dict[str, dict]]:
    """The runs' shared reward data, checkpoint and policy, and every run's samples, or one clear error before
    any model loads."""
    runs, shared = {}, None
    for i, run in enumerate(cfg.runs):
        run_cfg, runs[run] = read_run(i, Path(run))
        these = {
            "data_dir": data_paths(run_cfg.data_dir, Path(run)).root.resolve(),
            "reward_checkpoint": reward_checkpoint_of(run_cfg, Path(run)).resolve(),
            "reward_max_length": run_cfg.reward_max_length,
            "policy.model": run_cfg.policy.model,
        }
        for field, value in (shared or {}).items():
            if these[field] != value:
                raise ConfigError(f"runs[{i}]: its {field} is {these[field]}, runs[0]'s {value}; one novelty job measures "
                                  "runs of one reward data, ensemble and policy")
        shared = shared or these
    data = DataPaths(shared["data_dir"])
    reference = {
        "train": load_preferences(data.find("reward_train")).rows,
        "test": load_preferences(data.find("reward_test")).rows,
        "ood": load_responses(data.find("ood")).rows,
    }
    checkpoint = shared["reward_checkpoint"]
    if not (checkpoint / MANIFEST).is_file():
        raise ConfigError(f"runs[0]: its reward checkpoint {checkpoint} has no {MANIFEST} (a jobs.train_reward checkpoint folder)")
    kind = json.loads((checkpoint / MANIFEST).read_text())["kind"]
    if "reward_heads" in cfg.spaces and kind not in kinds_with_head_inputs():
        raise ConfigError(f"spaces: 'reward_heads' needs an ensemble whose members are heads on one layer "
                          f"({', '.join(kinds_with_head_inputs())}); {checkpoint} is kind {kind!r}")
    if "reward_heads" in cfg.spaces and not (checkpoint / TOKENIZER_DIR).is_dir():
        raise ConfigError(f"runs[0]: its reward checkpoint {checkpoint} has no {TOKENIZER_DIR}/ (space reward_heads reads it)")
    sources = NoveltySources(checkpoint, shared["reward_max_length"], shared["policy.model"], cfg.batch_size)
    return sources, reference, runs


def both_responses(pairs: list[dict]) -> tuple[list[str], list[str]]:
    """(prompts, responses) of every pair's chosen then every pair's rejected response."""
    return [r["prompt"] for r in pairs] * 2, [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs]


def spread(per_run: dict[str, dict], measure: str) -> dict[str, list[float | None]]:
    """[mean, std] over the runs of each diagnostic of ``measure`` (None where no run has a value)."""
    out = {}
    for key in UNCERTAINTY_DIAGNOSTICS:
        values = [r[measure][key] for r in per_run.values() if r[measure][key] is not None]
        out[key] = [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None] if values else [None, None]
    return out


def shown(figure: list[float | None]) -> str:
    mean, std = figure
    return "—" if mean is None else f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(NoveltyConfig, __doc__, argv)
    with exit_on_error():
        sources, reference, runs = check_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT).unlink(missing_ok=True)  # a result beside this config is this config's, or none
    write_config(out, cfg)

    train, test, odd_rows = reference["train"], reference["test"], reference["ood"]
    per_run = {run: {"ensemble_u": uncertainty_diagnostics(r["uncertainty"], r["kl"], r["proxy"], r["gold"])} for run, r in runs.items()}
    spaces = {}
    for space in cfg.spaces:
        log.info("space %s: embedding %d reference responses", space, 2 * len(train))
        embed = NOVELTY_SPACES.get(space)(sources)
        novelty = novelty_scorer(embed(*both_responses(train)))
        held_out = novelty(embed(*both_responses(test)))
        odd = novelty(embed([r["prompt"] for r in odd_rows], [r["response"] for r in odd_rows]))
        spaces[space] = {"ood_auroc": ood_auroc(held_out, odd)}
        for run, r in runs.items():
            per_run[run][space] = uncertainty_diagnostics(novelty(embed(r["prompt"], r["response"])), r["kl"], r["proxy"], r["gold"])
        log.info("space %s: OOD AUROC %.3f, hacked-sample AUROC %s over %d runs", space, spaces[space]["ood_auroc"],
                 shown(spread(per_run, space)["u_hacked_auroc"]), len(runs))
    summary = {measure: spread(per_run, measure) for measure in ["ensemble_u", *cfg.spaces]}
    for measure, figures in summary.items():
        log.info("%-16s %s", measure, "  ".join(f"{key} {shown(figure)}" for key, figure in figures.items()))
    write_json(out / OUTPUT, {"reward_checkpoint": str(sources.reward_checkpoint), "spaces": spaces, "summary": summary, "runs": per_run})


if __name__ == "__main__":
    main()

"""Offline reward refinement on a finished PPO run, strategy against strategy at one labelling budget.

    python -m jobs.refine --config jobs/configs/refine.yaml --output-dir DIR run_dir=runs/demo/rl/mean

Inputs, all checked before any model loads: the run's config.yaml and replay
buffer, its reward ensemble and training checkpoints, the held-out pairs. Then,
for each seed and strategy: select from the replay rows not held out → relabel
(the configured expert) → quantile targets → refine → DIR/seed_S/STRATEGY/ensembles/v0001.
Each refined ensemble, and the unrefined one ('none'), is measured by accuracy
and ECE on held-out pairs (the half of the reward test pairs that influence did
not see; the other half is its validation set) and on gold-labelled pairs of
held-out policy samples,
by the gold reward of the best-of-n policy it ranks, and (``retrain=true``) by the
gold reward of a PPO policy trained against it (DIR/seed_S/STRATEGY/rl). The
table of means and spreads over seeds goes to DIR/refine_table.md and
DIR/summary.json (``strategies.<name>.<figure>``); with retraining, DIR/report.html
adds the PPO curves of every policy.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import torch

from jobs.common import atomic_write_text, exit_on_error, fail, log, parse, read_json, read_records, write_config, write_json
from jobs.drivers.inputs import reward_checkpoint_of, rl_inputs
from jobs.drivers.ppo import run_ppo
from uprlhf.config import ConfigError, RefineConfig, RLConfig, build, load_config, parse_override, set_dotted
from uprlhf.data.loaders import DataError, load_preferences
from uprlhf.paths import data_paths
from uprlhf.reward.ensembles import MANIFEST
from uprlhf.rl.replay import read_replay
from uprlhf.seeds import derive_seed

BASELINE = "none"


def check_run(cfg: RefineConfig) -> tuple[RLConfig, Path]:
    """The run's own config, resolved as it ran, and its reward checkpoint; one message for what is missing."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.yaml").exists() or not (run_dir / "replay").is_dir():
        fail(f"run_dir={run_dir}: not a jobs.ppo output folder (needs config.yaml and replay/)")
    try:
        run_cfg = load_config(RLConfig, run_dir / "config.yaml")
    except ConfigError as err:
        fail(str(err))
    return run_cfg, reward_checkpoint_of(run_cfg, run_dir)


def holdout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(candidates, held out): a fixed draw, the same for every seed and strategy."""
    order = list(range(n))
    random.Random(0).shuffle(order)
    cut = max(2, round(n * fraction))
    return sorted(order[cut:]), sorted(order[:cut])


def best_of_n_samples(run_cfg: RLConfig, prompts: list[str], n: int) -> tuple[list[str], list[str], list[float]]:
    """n samples of the run's base policy for each prompt, with their gold rewards (drawn once, shared by every ranker)."""
    from uprlhf.data.gold import get_gold_scorer
    from uprlhf.rl.rollout import make_rollout_engine

    torch.set_num_threads(run_cfg.rollout.torch_threads or 2)
    engine = make_rollout_engine(run_cfg.policy.replace(lora_rank=None), run_cfg.rollout)
    flat = [p for p in prompts for _ in range(n)]
    responses = []
    for start in range(0, len(flat), 64):
        responses += engine.generate(flat[start : start + 64], derive_seed(run_cfg.seed, "best-of-n", start)).responses
    return flat, responses, get_gold_scorer(run_cfg.gold).score(flat, responses)


def measure(checkpoint: Path, pairs: dict[str, list[dict]], bon: tuple | None, n: int, max_length: int) -> dict:
    """Accuracy and ECE per pair set, and the gold of the best-of-n policy this ensemble ranks."""
    from transformers import AutoTokenizer

    from uprlhf.rl.best_of_n import best_of_n
    from uprlhf.reward.ensembles import RewardEnsemble
    from uprlhf.reward.evaluation import pair_figures, score_texts
    from uprlhf.reward.training import TOKENIZER_DIR

    ensemble = RewardEnsemble.load(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR)
    figures = {}
    for name, rows in pairs.items():
        for key, value in pair_figures(ensemble, tokenizer, rows, max_length=max_length).items():
            figures[f"{name}_{key}"] = value
    if bon is not None:
        flat, responses, gold = bon
        members = score_texts(ensemble, tokenizer, flat, responses, max_length=max_length)
        p = len(flat) // n
        result = best_of_n(members.reshape(p, n, -1), torch.tensor(gold).reshape(p, n), [n], "mean", {})[n]
        figures["best_of_n_gold"] = result["gold"]
    return figures


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def format_table(strategies: dict[str, dict]) -> str:
    keys = sorted({k for row in strategies.values() for k in row})
    lines = ["| strategy | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, row in strategies.items():
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" if k in row else "–" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from uprlhf.selection.selector import influence_checkpoints, validation_sets

    cfg, out = parse(RefineConfig, __doc__, argv)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    run_cfg, checkpoint = check_run(cfg)
    try:
        table = read_replay(Path(cfg.run_dir) / "replay")
        test_path = (
            Path(cfg.selector.validation)
            if cfg.selector.validation
            else data_paths(run_cfg.data_dir, Path(cfg.run_dir)).find("reward_test")
        )
        test_pairs = load_preferences(test_path).rows
    except (DataError, FileNotFoundError) as err:
        fail(str(err))
    if len(test_pairs) < 4:
        fail(f"{test_path}: {len(test_pairs)} pairs; refinement needs at least 4 (half guide influence, half measure)")
    # Influence is guided by one half of the held-out pairs and the ensembles are measured on the other.
    validation = validation_sets(test_pairs[0::2], cfg.selector.validation_per_subtask, 0)
    checkpoints = influence_checkpoints(checkpoint)
    missing = [str(c) for c in checkpoints if not (c / MANIFEST).exists()]
    if missing:
        fail(f"not reward ensemble checkpoints (no {MANIFEST}): {', '.join(missing)}")
    if table.num_rows < 8:
        fail(f"{cfg.run_dir}/replay: {table.num_rows} rows; refinement needs at least 8")
    with exit_on_error():
        prompts = rl_inputs(run_cfg, Path(cfg.run_dir)).eval_prompts[-cfg.best_of_n_prompts :]
        if cfg.retrain:
            retrain_config(run_cfg, cfg.retrain_overrides, checkpoint, cfg.seeds[0])  # a bad override fails here, not hours in
        run_strategies(cfg, out, run_cfg, checkpoint, table, test_pairs, validation, checkpoints, prompts)


def run_strategies(cfg: RefineConfig, out: Path, run_cfg: RLConfig, checkpoint: Path, table, test_pairs: list[dict],
                   validation: dict, checkpoints: list[Path], prompts: list[str]) -> None:
    """Every strategy (and the unrefined ensemble) at one budget, for each seed; the table and summary."""
    from uprlhf.reward.evaluation import gold_pairs
    from uprlhf.selection.influence import InfluenceRanker
    from uprlhf.selection.labelers import build_labeler
    from uprlhf.selection.selector import Selector

    candidates, held_out = holdout_split(table.num_rows, cfg.holdout_fraction)
    rows = table.take(candidates)
    kept = table.take(held_out)
    pairs = {
        "heldout_pairs": test_pairs[1::2],
        "policy_samples": gold_pairs(kept["prompt"].to_pylist(), kept["response"].to_pylist(), kept["gold"].to_pylist()),
    }
    log.info("%d candidate rows, %d held out (%d gold pairs); strategies %s × seeds %s",
             len(candidates), len(held_out), len(pairs["policy_samples"]), cfg.strategies, cfg.seeds)
    bon = None
    if cfg.best_of_n:
        log.info("sampling %d responses for each of %d held-out prompts", cfg.best_of_n, len(prompts))
        bon = best_of_n_samples(run_cfg, prompts, cfg.best_of_n)

    ranker = None
    if {"ugda", "influence"} & set(cfg.strategies):
        from transformers import AutoTokenizer

        from uprlhf.reward.training import TOKENIZER_DIR

        ranker = InfluenceRanker(
            checkpoints, AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR), validation,
            dim=cfg.selector.projection_dim, seed=cfg.selector.projection_seed, adam_eps=cfg.selector.adam_eps,
            max_length=run_cfg.reward_max_length, aggregation=cfg.selector.subtask_aggregation,
        )
    results: dict[str, list[dict]] = {}
    for seed in cfg.seeds:
        for strategy in [BASELINE, *cfg.strategies]:
            where = out / f"seed_{seed}" / strategy
            done = read_json(where / "figures.json")
            if not done:
                where.mkdir(parents=True, exist_ok=True)
                refined, selection = checkpoint, {}
                if strategy != BASELINE:
                    sel_cfg = cfg.selector.replace(strategy=strategy, seed=seed)
                    selector = Selector(sel_cfg, build_labeler(sel_cfg.labeler, where), out=where, checkpoints=checkpoints,
                                        validation=validation, max_length=run_cfg.reward_max_length, ranker=ranker)
                    result = selector.run(rows, checkpoint, version=0, through_step=max(rows["step"].to_pylist()))
                    refined = Path(result.checkpoint)
                    selection = {"labelled": result.labelled, "selection_seconds": result.seconds}
                done = {**selection, **measure(refined, pairs, bon, cfg.best_of_n, run_cfg.reward_max_length)}
                if cfg.retrain:
                    done.update(retrain(run_cfg, cfg.retrain_overrides, refined, seed, where / "rl"))
                write_json(where / "figures.json", done)
            log.info("seed %d %s: %s", seed, strategy, ", ".join(f"{k} {v:.3f}" for k, v in done.items()))
            results.setdefault(strategy, []).append(done)

    strategies = {
        name: {key: spread([r[key] for r in runs if key in r]) for key in dict.fromkeys(k for r in runs for k in r)}
        for name, runs in results.items()
    }
    table_md = format_table(strategies)
    atomic_write_text(out / "refine_table.md", table_md + "\n")
    write_json(out / "summary.json", {
        "run_dir": cfg.run_dir, "seeds": cfg.seeds, "candidates": len(candidates), "held_out": len(held_out),
        "budget": results[cfg.strategies[0]][0].get("labelled"), "strategies": strategies,
    })
    if cfg.retrain:
        from uprlhf.report import summarize, write_report

        runs = {f"{name} seed {seed}": read_records(out / f"seed_{seed}" / name / "rl")
                for seed in cfg.seeds for name in [BASELINE, *cfg.strategies]}
        write_report(out, runs, summarize(runs), title="uprlhf: PPO against refined reward ensembles",
                     extra_markdown_tables={"Refinement strategies at one labelling budget (mean ± std over seeds)": table_md})
    log.info("strategies:\n%s", table_md)


def retrain_config(run_cfg: RLConfig, overrides: list[str], checkpoint: Path, seed: int) -> RLConfig:
    """The run's own config with the overrides, against ``checkpoint``, without a selector (ConfigError if they are bad)."""
    tree = run_cfg.model_dump(mode="json")
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    tree.update(reward_checkpoint=str(checkpoint), seed=seed, selector={"strategy": "off"})
    return build(RLConfig, tree, "retrain_overrides")


def retrain(run_cfg: RLConfig, overrides: list[str], checkpoint: Path, seed: int, out: Path) -> dict:
    """A fresh PPO run against ``checkpoint``; its final gold."""
    out.mkdir(parents=True, exist_ok=True)
    summary = run_ppo(retrain_config(run_cfg, overrides, checkpoint, seed), out, name=f"{out.parent.name}-seed{seed}")
    return {"retrain_gold_final": summary["gold_final"], "retrain_kl_final": summary["kl_final"]}


if __name__ == "__main__":
    main()

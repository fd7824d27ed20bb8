"""The data stage (``build``): the embedded sentiment task (DESIGN §5) as Parquet files; ``python -m jobs.prepare_data`` is its command line.

Review openings → 20/40/40 split of prompts (SFT / reward / RL) → the policy's own
completions for the reward prompts (and, with ``sft_completions_per_prompt``, the gold-best of
its completions per SFT prompt as ``sft.parquet``; with ``drift_policies``, completions of policies
trained against a proxy for the training prompts) → gold scores → every pair of completions of a
prompt (except pairs with an empty or identical response, counted in the manifest) labelled by a Bradley–Terry draw with label noise → held-out pairs by
prompt → out-of-distribution responses. Writes DIR/data/ once per config: a second
run with the same config finds ``manifest.json`` and does nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from jobs.common import log, read_json, write_json
from uprlhf.config import PrepareDataConfig, fingerprint
from uprlhf.data.loaders import DataError, write_parquet
from uprlhf.data.gold import GOLD_REVISION, GOLD_SCORERS, get_gold_scorer
from uprlhf.data import sentiment
from uprlhf.seeds import derive_seed


def build(cfg: PrepareDataConfig, data_dir: Path) -> dict:
    """Write the task's files into ``data_dir`` (atomically, as one folder); returns the manifest."""
    manifest_path = data_dir / "manifest.json"
    if cfg.drift_policies:  # checked before the key below reads their weights; no model library loads otherwise
        from uprlhf.models import adapter_problem

        problems = [f"drift_policies.{i} = {path!r}: {problem}"
                    for i, path in enumerate(cfg.drift_policies) if (problem := adapter_problem(path, cfg.policy))]
        if problems:
            raise DataError(problems)
    key = f"{fingerprint(cfg)}-gold{GOLD_REVISION}"
    for path in cfg.drift_policies:  # the adapters' weights, not only their paths, decide the data
        key += "-" + hashlib.sha256((Path(path) / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    model_revision = GOLD_SCORERS.get(cfg.gold).model_revision
    if model_revision is not None:  # a learned gold's labels change with its fit
        key += f"-{cfg.gold}{model_revision}"
    if read_json(manifest_path).get("fingerprint") == key:
        log.info("%s already matches this config; nothing to do", data_dir)
        return read_json(manifest_path)
    reviews = Path(cfg.reviews_file) if cfg.reviews_file else sentiment.reviews_dir() / sentiment.MOVIE_REVIEWS_FILE
    off_task = Path(cfg.off_task_file) if cfg.off_task_file else sentiment.reviews_dir() / sentiment.NEWS_FILE
    try:
        openings = sentiment.make_prompts(
            sentiment.load_snippets(reviews), cfg.n_prompts, min_words=cfg.min_words, max_words=cfg.max_words, seed=cfg.seed
        )
        off_task_sentences = sentiment.load_snippets(off_task)
    except (ValueError, FileNotFoundError) as err:
        raise DataError([str(err)]) from None
    splits = sentiment.split_prompts(openings, cfg.split, seed=cfg.seed)
    if len(splits["reward"]) < 2:
        raise DataError([f"n_prompts={cfg.n_prompts} with split {cfg.split} leaves {len(splits['reward'])} reward prompt(s); need at least 2"])

    from uprlhf.rl.generation import sample_completions
    from uprlhf.models import load_adapted_policy, load_policy, load_tokenizer

    started = time.perf_counter()
    policy, tokenizer = load_policy(cfg.policy), load_tokenizer(cfg.policy)

    def sample(model, prompts: list[str], n: int, what: str, seed: int) -> list[list[str]]:
        with tqdm(total=len(prompts) * n, desc=f"[prepare_data] sampling {what}", unit="seq") as bar:
            return sample_completions(
                model,
                tokenizer,
                [sentiment.chat_prompt(p) for p in prompts],
                n=n,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                batch_size=cfg.generation_batch_size,
                seed=seed,
                decode_weights=cfg.decode_weights,
                progress=lambda done: bar.update(done - bar.n),
            )

    reward_prompts = splits["reward"]
    rng = random.Random(cfg.seed)
    n_test = min(len(reward_prompts) - 1, max(1, round(len(reward_prompts) * cfg.reward_test_fraction)))
    test_prompts = set(rng.sample(reward_prompts, n_test))
    train_prompts = [p for p in reward_prompts if p not in test_prompts]
    completions = sample(policy, reward_prompts, cfg.completions_per_prompt, "completions", cfg.seed)
    sft_completions = (
        sample(policy, splits["sft"], cfg.sft_completions_per_prompt, "SFT completions", derive_seed(cfg.seed, "sft completions"))
        if cfg.sft_completions_per_prompt else []
    )
    del policy
    sources = [("policy", reward_prompts, completions)]
    for i, adapter in enumerate(cfg.drift_policies):
        drifted = load_adapted_policy(cfg.policy, adapter)
        drift_seed = derive_seed(cfg.seed, f"drift policy {i}")
        sources.append((f"drift{i}", train_prompts, sample(drifted, train_prompts, cfg.completions_per_prompt, f"drift policy {i}", drift_seed)))
        del drifted

    gold = get_gold_scorer(cfg.gold)
    second = get_gold_scorer("textblob" if cfg.gold == "vader" else "vader")
    flat = [(source, p, c) for source, prompts, per_prompt in sources for p, cs in zip(prompts, per_prompt) for c in cs]
    flat_prompts = [p for _, p, _ in flat]
    flat_responses = [c for _, _, c in flat]
    gold_scores = gold.score(flat_prompts, flat_responses)
    second_scores = second.score(flat_prompts, flat_responses)
    samples = [
        {"id": f"s{i}", "source": source, "prompt": p, "response": r, "gold": g, f"gold_{second.name}": g2}
        for i, ((source, p, r), g, g2) in enumerate(zip(flat, gold_scores, second_scores))
    ]
    sft_examples = gold_best(splits["sft"], sft_completions, gold) if sft_completions else []

    by_prompt: dict[str, list[dict]] = {}
    for sample_row in samples:
        by_prompt.setdefault(sample_row["prompt"], []).append(sample_row)
    # Pairs with a drifted completion draw their labels from a stream of their own, so the base policy's pairs
    # are labelled as they would be without drift policies.
    drift_rng = random.Random(derive_seed(cfg.seed, "drift pairs"))
    pairs = {"reward_train": [], "reward_test": []}
    unusable = {"identical": 0, "empty": 0}
    drift_pairs = 0
    for prompt in reward_prompts:
        for sa, sb in itertools.combinations(by_prompt[prompt], 2):
            if not sa["response"] or not sb["response"]:
                unusable["empty"] += 1
                continue
            if sa["response"] == sb["response"]:
                unusable["identical"] += 1
                continue
            base_pair = sa["source"] == sb["source"] == "policy"
            a_wins = sentiment.bradley_terry_preference(
                sa["gold"], sb["gold"], temperature=cfg.bt_temperature, label_noise=cfg.label_noise,
                rng=rng if base_pair else drift_rng,
            )
            drift_pairs += not base_pair
            win, lose = (sa, sb) if a_wins else (sb, sa)
            split = "reward_test" if prompt in test_prompts else "reward_train"
            pairs[split].append(
                {
                    "id": f"{win['id']}>{lose['id']}",
                    "prompt": prompt,
                    "chosen": win["response"],
                    "rejected": lose["response"],
                    "gold_chosen": win["gold"],
                    "gold_rejected": lose["gold"],
                }
            )
    on_task = [s["response"] for s in samples if s["prompt"] in test_prompts]
    test_list = sorted(test_prompts)
    ood = [
        {"id": f"ood{i}", "prompt": test_list[i % len(test_list)], "response": text, "kind": sentiment.OOD_KINDS[i % len(sentiment.OOD_KINDS)]}
        for i, text in enumerate(sentiment.ood_responses(on_task, off_task_sentences, cfg.n_ood, seed=cfg.seed))
    ]

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=data_dir.parent, prefix=".data-"))
    try:
        write_parquet([{"id": f"sft{i}", "prompt": p} for i, p in enumerate(splits["sft"])], staging / "sft_prompts.parquet")
        write_parquet([{"id": f"rl{i}", "prompt": p} for i, p in enumerate(splits["rl"])], staging / "rl_prompts.parquet")
        write_parquet(samples, staging / "samples.parquet")
        if sft_examples:
            write_parquet(sft_examples, staging / "sft.parquet")
        for name, rows in pairs.items():
            write_parquet(rows, staging / f"{name}.parquet")
        write_parquet(ood, staging / "ood.parquet")
        manifest = {
            "fingerprint": key,
            "counts": {
                "prompts": {k: len(v) for k, v in splits.items()},
                "samples": len(samples),
                "drift_samples": sum(s["source"] != "policy" for s in samples),
                "drift_pairs": drift_pairs,
                "sft_examples": len(sft_examples),
                "sft_prompts_without_example": len(splits["sft"]) - len(sft_examples) if sft_completions else 0,
                "reward_train": len(pairs["reward_train"]),
                "reward_test": len(pairs["reward_test"]),
                "ood": len(ood),
                "pairs_not_used": unusable,
            },
            "gold": cfg.gold,
            "gold_mean": sum(gold_scores) / len(gold_scores),
            "seconds": time.perf_counter() - started,
        }
        write_json(staging / "manifest.json", manifest)
        shutil.rmtree(data_dir, ignore_errors=True)
        staging.rename(data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s: %s", data_dir, manifest["counts"])
    return manifest


def gold_best(prompts: list[str], completions: list[list[str]], gold) -> list[dict]:
    """The SFT example of each prompt: its completion the gold scores highest (empty ones never win)."""
    flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
    scores = iter(gold.score(flat_prompts, [c for cs in completions for c in cs]))
    examples = []
    for i, (prompt, candidates) in enumerate(zip(prompts, completions)):
        scored = [(next(scores), c) for c in candidates]
        usable = [(g, c) for g, c in scored if c.strip()]
        if usable:
            g, best = max(usable, key=lambda pair: pair[0])
            examples.append({"id": f"sft{i}", "prompt": prompt, "response": best, "gold": g})
    return examples

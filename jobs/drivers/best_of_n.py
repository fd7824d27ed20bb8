"""Best-of-n (``run_best_of_n``): max(n) samples per held-out prompt, ranked by each penalty; ``jobs.best_of_n`` is its command line.

Placement: R rollout workers and one reward scorer in one placement group (a Tune trial's,
under ``jobs.study``). The loop: max(n) samples per prompt (or the ones an earlier run with
the same sampler, prompts and seed left in ``samples_dir``) → member rewards (ensemble) and
gold → for each penalty and n, the best of the first n samples per prompt →
DIR/summary.json (``best_of_n.<penalty>.<n>``) and DIR/best_of_n.png.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from jobs.common import log, read_json, start_ray, write_json
from jobs.drivers.inputs import sampling_inputs
from uprlhf.config import BestOfNConfig


def samples_key(cfg: BestOfNConfig, prompts: list[str]) -> str:
    """What decides the samples: the sampler, its generation settings, the prompts, max(n) and the seed."""
    what = {"policy": cfg.policy.replace(lora_rank=None).model_dump(mode="json"), "rollout": cfg.rollout.model_dump(mode="json"),
            "prompts": prompts, "n": max(cfg.n), "seed": cfg.seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_best_of_n(cfg: BestOfNConfig, out: Path, *, adopt=None, samples_dir: Path | None = None) -> dict:
    """Placement plan → rollout and scorer groups → max(n) samples per prompt → best-of-n per penalty.

    ``adopt``: a placement group reserved for the plan (a Tune trial's). ``samples_dir``: where
    samples are kept by what decides them (``samples_key``), so runs that differ only in how
    they rank (ensemble, penalty) sample once and are compared on the same responses.
    """
    from actors.placement import sampling_plan, threads_for
    from actors.reward_scorer import RewardScorer
    from actors.rollout_worker import RolloutWorker
    from uprlhf.data.gold import get_gold_scorer
    from uprlhf.rl.best_of_n import best_of_n

    inputs = sampling_inputs(cfg, out)
    prompts = inputs.prompts[-cfg.n_prompts :]
    n_max = max(cfg.n)
    flat = [p for p in prompts for _ in range(n_max)]
    cached = samples_dir / f"{samples_key(cfg, prompts)}.json" if samples_dir else None
    start_ray()
    placement = sampling_plan(cfg).reserve("uprlhf-best-of-n", adopt=adopt)
    try:
        scorer = placement.group("scorer", RewardScorer, (
            str(inputs.reward_checkpoint), 0, cfg.policy, cfg.reward_max_length, cfg.rollout.temperature,
            threads_for(cfg.scorer_cpus, cfg.scorer_threads), "cuda" if cfg.scorer_gpus > 0 else "cpu", (),
            cfg.reward_normalise,
        ))
        responses = read_json(cached).get("responses") if cached else None
        if responses is None:
            sampler = cfg.policy.replace(lora_rank=None)  # best-of-n samples the base policy itself
            rollout = placement.group("rollout", RolloutWorker, (sampler, cfg.rollout, threads_for(cfg.rollout.cpus_per_worker, cfg.rollout.torch_threads)))
            log.info("sampling %d responses for each of %d prompts on %d worker(s)", n_max, len(prompts), len(rollout))
            responses = rollout.generate(flat, cfg.seed)[0].responses
            rollout.kill()
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_json(cached, {"responses": responses})
        else:
            log.info("%d responses for each of %d prompts from %s", n_max, len(prompts), cached)
        members, _ = scorer.member_rewards(flat, responses)
        gold = torch.tensor(get_gold_scorer(cfg.gold).score(flat, responses))
        members = members.reshape(len(prompts), n_max, -1)
        gold = gold.reshape(len(prompts), n_max)
        results = {
            p.name: {str(n): row for n, row in best_of_n(members, gold, cfg.n, p.name, p.coefficients).items()}
            for p in cfg.penalties
        }
        summary = {"best_of_n": results, "prompts": len(prompts), "samples_per_prompt": n_max}
        write_json(out / "summary.json", summary)
        plot(results, out / "best_of_n.png")
        for name, rows in results.items():
            log.info("%s: %s", name, ", ".join(f"n={n} gold {row['gold']:.3f} proxy {row['proxy']:.3f}" for n, row in rows.items()))
        scorer.kill()
        return summary
    finally:
        placement.release()


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    gold_ax, proxy_ax = fig.subplots(1, 2)
    for name, rows in results.items():
        kl = [row["kl"] for row in rows.values()]
        gold_ax.plot(kl, [row["gold"] for row in rows.values()], marker="o", label=name)
        proxy_ax.plot(kl, [row["proxy"] for row in rows.values()], marker="o", label=name)
    for ax, what in ((gold_ax, "gold reward"), (proxy_ax, "proxy reward (ensemble mean)")):
        ax.set_xlabel("KL(best-of-n ‖ policy) = log n − (n−1)/n [nats]")
        ax.set_ylabel(what)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


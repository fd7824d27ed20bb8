"""Best-of-n sampling ranked by uncertainty penalties: gold against KL without any training.

    python -m jobs.best_of_n --config jobs/configs/best_of_n.yaml --output-dir DIR "n=[1,4,16]"

Placement: R rollout workers and one reward scorer in one placement group. The
loop: max(n) samples per held-out prompt → member rewards (ensemble) and gold →
for each penalty and n, the best of the first n samples per prompt →
DIR/summary.json (``best_of_n.<penalty>.<n>``) and DIR/best_of_n.png.
"""

from __future__ import annotations

from pathlib import Path

import torch

from jobs.common import fail, parse, start_ray, write_json
from jobs.ppo import reserve, rollout_actor, sample_and_score_inputs, sampling_bundles, scorer_actor, split
from uprlhf.config import BestOfNConfig
from uprlhf.data.loaders import DataError


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(BestOfNConfig, __doc__, argv)
    try:
        prompts, checkpoint, _ = sample_and_score_inputs(cfg, out)
    except DataError as err:
        fail(str(err))
    prompts = prompts[-cfg.n_prompts :]
    import ray
    from ray.util.placement_group import remove_placement_group

    from uprlhf.rl.best_of_n import best_of_n
    from uprlhf.data.gold import get_gold_scorer

    start_ray()
    # --- placement plan --------------------------------------------------------
    r = cfg.rollout.num_workers
    pg = reserve(sampling_bundles(cfg), "uprlhf-best-of-n")
    sampler = cfg.policy.model_copy(update={"lora_rank": None})  # best-of-n samples the base policy itself
    workers = [rollout_actor(cfg, pg, i, sampler) for i in range(r)]
    scorer = scorer_actor(cfg, pg, r, str(checkpoint), 0)

    # --- the loop ------------------------------------------------------------------
    n_max = max(cfg.n)
    flat = [p for p in prompts for _ in range(n_max)]
    parts = split(flat, r)
    print(f"[best_of_n] sampling {n_max} responses for each of {len(prompts)} prompts on {r} worker(s)", flush=True)
    batches = ray.get([w.generate.remote(part, cfg.seed * 1000 + i) for i, (w, part) in enumerate(zip(workers, parts)) if part])
    responses = [text for batch, _ in batches for text in batch.responses]
    members, _ = ray.get(scorer.member_rewards.remote(flat, responses))
    gold = torch.tensor(get_gold_scorer(cfg.gold).score(flat, responses))
    members = members.reshape(len(prompts), n_max, -1)
    gold = gold.reshape(len(prompts), n_max)
    results = {
        p.name: {str(n): row for n, row in best_of_n(members, gold, cfg.n, p.name, p.coefficients).items()}
        for p in cfg.penalties
    }
    write_json(out / "summary.json", {"best_of_n": results, "prompts": len(prompts), "samples_per_prompt": n_max})
    plot(results, out / "best_of_n.png")
    for name, rows in results.items():
        print(f"[best_of_n] {name}: " + ", ".join(f"n={n} gold {row['gold']:.3f} proxy {row['proxy']:.3f}" for n, row in rows.items()), flush=True)
    for handle in [*workers, scorer]:
        ray.kill(handle)
    remove_placement_group(pg)


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


if __name__ == "__main__":
    main()

"""Best-of-n sampling ranked by uncertainty penalties: gold against KL without any training.

    python -m jobs.best_of_n --config jobs/configs/best_of_n.yaml --output-dir DIR "n=[1,4,16]"

Placement: R rollout workers and one reward scorer in one placement group. The
loop: max(n) samples per held-out prompt → member rewards (ensemble) and gold →
for each penalty and n, the best of the first n samples per prompt →
DIR/summary.json (``best_of_n.<penalty>.<n>``) and DIR/best_of_n.png.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from jobs.common import fail, parse, start_ray, write_json
from uprlhf.config import BestOfNConfig


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse(BestOfNConfig, __doc__, argv)
    prompts, checkpoint = check_inputs(cfg, out)
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.reward_scorer import RewardScorer
    from actors.rollout_worker import RolloutWorker
    from jobs.ppo import reserve
    from uprlhf.best_of_n import best_of_n
    from uprlhf.gold import get_gold_scorer

    start_ray()
    # --- placement plan --------------------------------------------------------
    r = cfg.rollout.num_workers
    rollout_bundle = {k: v for k, v in {"CPU": cfg.rollout.cpus_per_worker, "GPU": cfg.rollout.gpus_per_worker}.items() if v}
    pg = reserve([rollout_bundle] * r + [{"CPU": cfg.scorer_cpus}], "uprlhf-best-of-n")
    workers = [
        RolloutWorker.options(
            num_cpus=cfg.rollout.cpus_per_worker, num_gpus=cfg.rollout.gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(cfg.policy.model_copy(update={"lora_rank": None}), cfg.rollout, cfg.rollout.torch_threads or math.ceil(cfg.rollout.cpus_per_worker))
        for i in range(r)
    ]
    scorer = RewardScorer.options(
        num_cpus=cfg.scorer_cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
    ).remote(str(checkpoint), 0, cfg.policy, cfg.reward_max_length, cfg.rollout.temperature, cfg.scorer_threads or math.ceil(cfg.scorer_cpus))

    # --- the loop ------------------------------------------------------------------
    n_max = max(cfg.n)
    flat = [p for p in prompts for _ in range(n_max)]
    size = -(-len(flat) // r)
    parts = [flat[i * size : (i + 1) * size] for i in range(r)]
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


def check_inputs(cfg: BestOfNConfig, out: Path) -> tuple[list[str], Path]:
    from transformers import AutoConfig

    from uprlhf.data import DataError, load_prompts
    from uprlhf.models import load_tokenizer, resolve
    from uprlhf.rollout import check_prompt_lengths
    from uprlhf.scoring import check_reward_checkpoint

    data_dir = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    path = Path(cfg.prompts) if cfg.prompts else data_dir / "rl_prompts.parquet"
    checkpoint = Path(cfg.reward_checkpoint) if cfg.reward_checkpoint else out / "checkpoints" / cfg.reward_kind / "final"
    problems = check_reward_checkpoint(checkpoint, cfg.reward_kind, cfg.reward_k)
    prompts: list[str] = []
    try:
        prompts = [row["prompt"] for row in load_prompts(path).rows][-cfg.n_prompts :]
    except (DataError, FileNotFoundError) as err:
        problems.append(str(err))
    if prompts:
        limit = getattr(AutoConfig.from_pretrained(resolve(cfg.policy.model.name_or_path)), "max_position_embeddings", None)
        problems += check_prompt_lengths(prompts, cfg.policy, cfg.rollout, load_tokenizer(cfg.policy.model), limit, str(path))
    if problems:
        fail("\n".join(problems))
    return prompts, checkpoint


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

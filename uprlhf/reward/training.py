"""The reward-ensemble training loop, one per data-parallel rank (no Ray here).

``jobs.train_reward`` runs ``train_ensemble`` inside Ray Train workers; the loop
walks the ensemble's phases, wraps each in a DeepSpeed engine over the process
group the caller set up, and hands checkpoints (weights, Adam moments, mean
learning rate) to a callback, which the selector's influence step reads later.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from uprlhf.jit import interpreter_tools_first
from uprlhf.reward.config import TrainConfig
from uprlhf.reward.ensembles import PairBatch, RewardEnsemble
from uprlhf.seeds import derive_seed

MOMENTS_FILE = "optimizer_moments.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class EncodedPairs:
    """Token ids of (prompt, chosen) and (prompt, rejected), unpadded, one entry per pair."""

    chosen: list[dict[str, list[int]]]
    rejected: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.chosen)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> list[dict[str, list[int]]]:
    enc = tokenizer(prompts, responses, truncation=True, max_length=max_length)
    return [{key: enc[key][i] for key in enc} for i in range(len(prompts))]


def encode_pairs(tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_length: int) -> EncodedPairs:
    prompts = [r["prompt"] for r in rows]
    return EncodedPairs(
        encode_texts(tokenizer, prompts, [r["chosen"] for r in rows], max_length),
        encode_texts(tokenizer, prompts, [r["rejected"] for r in rows], max_length),
    )


def collate(tokenizer: PreTrainedTokenizerBase, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    return dict(tokenizer.pad(items, return_tensors="pt"))


def on_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


@dataclass
class Checkpoint:
    """What the loop hands out at each checkpoint; ``write`` lays it out in a folder."""

    ensemble: RewardEnsemble
    tokenizer: PreTrainedTokenizerBase
    phase: str
    step: int
    mean_lr: float
    moments: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # train_seconds and parameter counts so far

    def write(self, path: str | Path) -> dict:
        path = Path(path)
        self.ensemble.save(path)
        self.tokenizer.save_pretrained(path / TOKENIZER_DIR)  # a checkpoint scores text on its own
        if self.moments:
            save_file({k: v.contiguous() for k, v in self.moments.items()}, str(path / MOMENTS_FILE))
        return {
            "phase": self.phase,
            "step": self.step,
            "mean_lr": self.mean_lr,
            "has_moments": bool(self.moments),
            **self.stats,
        }


EngineFactory = Callable[[torch.nn.Module, torch.optim.Optimizer, object], object]


def bootstrap_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Poisson(1) counts per pair and member: the online bootstrap of each member's data."""
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.ones(n, k), generator=gen)


def shard_indices(n: int, rank: int, world: int, seed: int) -> list[int]:
    """This rank's share of a seeded shuffle; padded by wrapping so every rank runs the same steps."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    total = math.ceil(n / world) * world
    order += order[: total - n]
    return order[rank::world]


def pair_budget(n: int, budget: int | None, seed: int) -> list[int]:
    """The training pairs kept under a budget of ``budget`` pairs (None: all ``n``), in their file order.

    A seeded draw, nested: at one seed a smaller budget keeps a subset of what a larger one
    keeps, so arms of a data-budget ablation differ in the amount of data only.
    """
    if budget is None or budget >= n:
        return list(range(n))
    order = list(range(n))
    random.Random(derive_seed(seed, "pair budget")).shuffle(order)
    return sorted(order[:budget])


def split_warmup(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(derive_seed(seed, "warmup split")).shuffle(order)
    cut = min(n - 1, max(1, int(round(n * fraction))))
    return order[:cut], order[cut:]


def _moments(engine_optimizer: torch.optim.Optimizer, ensemble: RewardEnsemble) -> dict[str, torch.Tensor]:
    """Adam first and second moments of trainable parameters, keyed ``name.exp_avg[_sq]``.

    Available when the optimiser holds per-parameter state (ZeRO stage 0); ZeRO 1-3
    keep flat partitions instead, and then no moments are saved.
    """
    state = getattr(engine_optimizer, "state", {})
    out = {}
    for name, p in ensemble.named_parameters():
        entry = state.get(p) if p.requires_grad else None
        if entry and "exp_avg" in entry:
            out[f"{name}.exp_avg"] = entry["exp_avg"].detach().clone()
            out[f"{name}.exp_avg_sq"] = entry["exp_avg_sq"].detach().clone()
    return out


def train_ensemble(
    ensemble: RewardEnsemble,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    cfg: TrainConfig,
    *,
    warmup_fraction: float,
    bootstrap: bool,
    rank: int,
    world_size: int,
    make_engine: EngineFactory,
    on_checkpoint: Callable[[Checkpoint], None],
    log: Callable[[dict], None] = lambda record: None,
) -> dict:
    """Train every phase of ``ensemble`` on this rank's share of ``rows``; returns the final stats."""
    torch.manual_seed(derive_seed(cfg.seed, "rank", rank))
    pairs = encode_pairs(tokenizer, rows, cfg.max_length)
    weights = bootstrap_weights(len(rows), ensemble.k, cfg.seed) if bootstrap else None
    warmup_idx, rest_idx = split_warmup(len(rows), warmup_fraction, cfg.seed)
    slices = {"all": list(range(len(rows))), "warmup": warmup_idx, "rest": rest_idx}
    phases = ensemble.phases()
    empty = [p.name for p in phases if not slices[p.data]]
    if empty:
        raise ValueError(f"{len(rows)} training pairs leave no data for phase(s) {empty}; need at least 2")
    started = time.perf_counter()
    trained: set[int] = set()
    history: list[dict] = []  # every phase's records until the next checkpoint takes them
    ensemble.train()
    with ensemble.per_member():  # the LoRA kinds run each member on its own: gradients need that
        for phase_no, phase in enumerate(phases):
            is_last = phase_no == len(phases) - 1
            groups = phase.prepare()
            trained |= {id(p) for g in groups for p in g["params"]}
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
            data = slices[phase.data]
            streams = ensemble.k if phase.per_member_batches else 1
            shards = [shard_indices(len(data), rank, world_size, derive_seed(cfg.seed, "member stream", s)) for s in range(streams)]
            steps_per_epoch = math.ceil(len(shards[0]) / cfg.batch_size)
            total = steps_per_epoch * cfg.epochs
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(1, total))
            engine = make_engine(ensemble, optimizer, scheduler)
            device = next(ensemble.parameters()).device  # where the engine put the model (a GPU rank's GPU)
            marks = {round(total * (c + 1) / cfg.checkpoints) for c in range(cfg.checkpoints)} if is_last else set()
            lr_sum, lr_n = 0.0, 0
            for step in range(1, total + 1):
                lo = ((step - 1) % steps_per_epoch) * cfg.batch_size
                batches = []
                for shard in shards:
                    idx = [data[i] for i in shard[lo : lo + cfg.batch_size]]
                    batches.append(
                        PairBatch(
                            on_device(collate(tokenizer, [pairs.chosen[i] for i in idx]), device),
                            on_device(collate(tokenizer, [pairs.rejected[i] for i in idx]), device),
                            None if weights is None else weights[idx].to(device),
                            tokenizer.pad_token_id or 0,
                        )
                    )
                loss = phase.loss(batches)
                engine.backward(loss)
                engine.step()
                lr = optimizer.param_groups[-1]["lr"]
                lr_sum, lr_n = lr_sum + lr, lr_n + 1
                record = {"phase": phase.name, "step": step, "steps": total, "loss": loss.item(), "lr": lr}
                history.append(record)
                log(record)
                if step in marks:
                    stats = {
                        "train_seconds": time.perf_counter() - started,
                        "trainable_params": sum(p.numel() for p in ensemble.parameters() if id(p) in trained),
                        "member_params": ensemble.member_parameter_count(),
                    }
                    moments = _moments(optimizer, ensemble)
                    on_checkpoint(Checkpoint(ensemble, tokenizer, phase.name, step, lr_sum / lr_n, moments, history, stats))
                    lr_sum, lr_n, history = 0.0, 0, []
    ensemble.eval()
    return stats


def deepspeed_engine(zero_stage: int, micro_batch: int, grad_clip: float = 1.0) -> EngineFactory:
    """A factory wrapping model + torch optimiser in DeepSpeed over the existing process group.

    A torch optimiser is passed in (not a DeepSpeed "optimizer" block) so nothing is
    JIT-compiled per run; ``zero_allow_untested_optimizer`` lets ZeRO take it.
    """

    def make(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> object:
        interpreter_tools_first()
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        return engine

    return make


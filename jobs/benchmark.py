"""Micro-benchmarks of the system's hot paths, one named benchmark per run.

    python -m jobs.benchmark scoring [--config FILE] [--output-dir DIR] [dotted.key=value ...]
    python -m jobs.benchmark rl [--output-dir DIR] [dotted.key=value ...]
    python -m jobs.benchmark selection [--output-dir DIR] [dotted.key=value ...]

``scoring`` times ensemble scoring of ``pairs`` synthetic (prompt, response) pairs
with K members for every ensemble kind the default shape builds (all but ``multi_backbone``, which needs a
second backbone) against one single reward model, all in one
process and on the same pre-tokenised batches, after one untimed pass of every
candidate over every batch (the first pass over a new shape sets up kernels). The
LoRA kinds are timed twice: the fused forward (all K members in one batch, peft's
per-row ``adapter_names``; with ``lora_top_layers`` the frozen lower layers run
once for all members) and the sequential way (K passes, one member each). Repeats
are interleaved round-robin over the candidates so machine noise falls on all of
them alike; each candidate's figure is its median. Only forward passes are timed
(eval mode, inference_mode).

``rl`` runs ``steps`` PPO steps of ``jobs.ppo`` (rollout worker, scorer, learner
group, replay buffer on a local Ray) on the embedded policy against an ensemble
of ``k`` MiniLM members (untrained: weights do not change the cost), and reports
seconds per stage, the share of step time spent in Ray itself (per stage: wall
time seen by the driver minus the compute time measured inside the actors —
scheduling, serialisation, object transfer, ``ray.get`` waits), and generated
tokens per second of the whole step. The first step is a warm-up and is not
counted. Then, in the same run, TRL's PPO on the same policy, prompts, batch,
response length and threads (``trl_tokens_per_second`` in ``jobs.drivers.trl_baseline``,
the ``bench`` extra), fine-tuning the whole policy and, like for like, training our
policy's LoRA; ``summary.json`` holds ``stage_seconds``, ``ray_overhead_fraction``,
``tokens_per_second``, ``trl_tokens_per_second``, ``speedup_vs_trl``,
``trl_lora_tokens_per_second`` and ``speedup_vs_trl_lora``.
For each name in ``decode_weights`` (default ``int8``, ``bfloat16``) our loop runs again with
``rollout.decode_weights`` set to it, and ``summary.json`` gains ``decode_weights.<name>`` (its
generation tokens/s, ``speedup_vs_float32``, its own bound from the weight bytes a decode step
reads at that precision and the fraction of both bounds).

``selection`` times the selector's influence step on the MiniLM reward LoRAs (K
members, adapters on the top layers, as in the demo) on CPU: candidates per second
through per-sample gradients, Adam normalisation and the Rademacher projection at
each of ``dims``, over ``checkpoints`` checkpoints (validation gradients are
computed before the clock starts); then the whole UGDA selection (variance filter,
influence ranking at the first of ``dims``) of a ``buffer_rows``-row buffer.
Untrained adapters (B drawn at random, synthetic Adam moments): values do not
change the cost. ``summary.json`` holds ``candidates_per_second.<d>`` and
``seconds_for_10k`` (scaled from ``buffer_rows`` when it is not 10,000).

DIR gets ``config.yaml``, ``metrics.jsonl`` (one line per timed repeat),
``summary.json`` (``seconds.<candidate>``, ``ratio_vs_single.<kind>``,
``fused_vs_sequential.<kind>``, ``targets``) and ``benchmark_table.md``.

``scoring`` and ``rl`` also measure the machine's limits in the same run, in the
benchmark's own process before the timed work (never beside it): the matmul peak at
each stage's torch thread count and the memory read bandwidth (``uprlhf.perf.limits``,
which also states the FLOP counting convention). Each stage is reported against its
bound: generation tokens/s against memory bandwidth ÷ weight bytes per decode step ×
batch, the PPO update's and scoring's FLOP/s against the matmul peak (the update's
times the learner ranks, which run side by side). ``summary.json`` gains ``limits``
(``matmul_flops_per_s.<threads>``, ``memory_bytes_per_s``, ``threads.<stage>``,
``bounds.<stage>``, ``units.<stage>``), ``work.<stage>`` (tokens or FLOPs),
``achieved.<stage>`` and ``fraction_of_limit.<stage>``: stages ``generation``,
``update``, ``scoring`` for ``rl``; for ``scoring``, ``scoring.<candidate>``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import Field, model_validator

from jobs.common import atomic_write_text, fail, log, parse, write_config, write_json
from uprlhf.config import EnsembleKind, ModelConfig, Section, default_kinds
from uprlhf.data.config import DecodeWeightsName
from uprlhf.perf.limits import (
    decode_weight_bytes,
    forward_flops,
    fraction_of_limit,
    generation_bound,
    lora_params,
    matmul_params,
    measure_limits,
    output_params,
    scoring_flops,
    update_flops,
    weight_bytes,
)

LORA_KINDS = ("lora", "diverse_lora")
# Targets of the issue: shared-backbone kinds cost at most 1.2x one model; the fused
# LoRA forward at most 0.8x the time of K sequential member passes.
RATIO_TARGETS = {"linear": 1.2, "frozen_heads": 1.2}
FUSED_TARGET = 0.8


def scoring_kinds() -> list[str]:
    """Every ensemble kind the default shape builds but ``single``: the single reward model is the baseline each
    kind is timed against (``multi_backbone`` needs a second backbone, which this benchmark's shape does not name)."""
    return [kind for kind in default_kinds() if kind != "single"]


class ScoringBenchmarkConfig(Section):
    backbone: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:minilm"),
        description="Reward backbone under every candidate (the single model and each ensemble).",
    )
    kinds: list[EnsembleKind] = Field(
        default_factory=scoring_kinds,
        min_length=1,
        description="Ensemble kinds to time against the single model; any kind but 'single' and 'multi_backbone'.",
    )
    pairs: int = Field(1000, ge=1, description="Synthetic (prompt, response) pairs scored per repeat.")
    k: int = Field(5, ge=2, le=64, description="Ensemble members K.")
    batch_size: int = Field(64, ge=1, description="Pairs per forward batch (a fused LoRA batch holds K times as many rows).")
    max_length: int = Field(64, ge=8, description="Tokens per (prompt, response) after truncation.")
    repeats: int = Field(3, ge=1, description="Timed passes over all pairs per candidate; the median is reported.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r of each member (LoRA kinds).")
    lora_top_layers: int | None = Field(
        2,
        ge=1,
        description="Put LoRA only on the top N transformer layers (LoRA kinds; the demo's 2, so the frozen lower "
        "layers run once for all members); null = every layer, where peft's per-row routing is slower fused than K passes.",
    )
    seed: int = Field(0, description="Seed of the synthetic texts and of the ensembles' initialisation.")
    limits_seconds: float = Field(1.0, gt=0, description="Seconds the matmul-peak measurement runs per thread count.")

    @model_validator(mode="after")
    def _kinds_fit_the_shape(self) -> ScoringBenchmarkConfig:
        allowed = scoring_kinds()
        for kind in self.kinds:
            if kind not in allowed:
                raise ValueError(f"kinds: {kind!r} cannot be timed here; allowed: {', '.join(allowed)}")
        return self


BENCHMARKS: dict[str, tuple[type[Section], Callable]] = {}

# Words for synthetic review-style prompts and responses (deterministic per seed).
_SUBJECTS = ["the movie", "this film", "the story", "the sequel", "the director", "the cast", "the soundtrack", "the ending"]
_ASKS = ["what did you think of", "write a short review of", "tell me about", "describe", "give your opinion on", "summarise"]
_ADJ = [
    "great", "dull", "moving", "clumsy", "brilliant", "tedious", "warm", "sharp", "slow", "funny",
    "awkward", "lovely", "bleak", "clever", "uneven", "tender", "loud", "honest", "flat", "vivid",
]
_NOUNS = [
    "plot", "acting", "pacing", "dialogue", "score", "camera work", "script", "lead", "villain", "humour",
    "editing", "costumes", "twist", "finale", "opening", "characters", "setting", "tone", "story", "effects",
]
_VERBS = ["felt", "was", "seemed", "looked", "came across as", "turned out", "stayed", "grew"]
_LINKS = ["and", "but", "while", "although", "because", "so", "yet", "though"]
_ADV = ["really", "quite", "rather", "oddly", "truly", "mostly", "never", "always", "almost", "simply"]


def synthetic_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` review-style prompts (~8 words) and responses (~24 words), the same for a given seed."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        prompts.append(f"{rng.choice(_ASKS)} {rng.choice(_SUBJECTS)} in a few {rng.choice(['words', 'lines', 'sentences'])}?")
        clauses = []
        while sum(len(c.split()) for c in clauses) < 22:
            clauses.append(
                f"the {rng.choice(_NOUNS)} {rng.choice(_VERBS)} {rng.choice(_ADV)} {rng.choice(_ADJ)}"
            )
        body = f" {rng.choice(_LINKS)} ".join(clauses)
        responses.append(f"{rng.choice(_SUBJECTS).capitalize()} is {rng.choice(_ADJ)}: {body}.")
    return prompts, responses


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ensemble_params(kind: EnsembleKind, ensemble) -> tuple[int, int, int]:
    """(shared, per-member, members) matmul parameters of one fused scoring pass: shared ones run once per token.

    LoRA kinds: the adapter-free layers below the split run once for all members,
    the rest of the base plus one member's adapters and head run once per member.
    """
    if kind in LORA_KINDS:
        members = ensemble.member_parameter_count()
        base = matmul_params(ensemble.peft) - members
        split = ensemble._split()
        layers = ensemble.peft.get_base_model().base_model.encoder.layer[:split] if split else []
        lower = sum(matmul_params(layer) for layer in layers)
        return lower, base - lower + members // ensemble.k, ensemble.k
    if kind == "independent":
        return 0, matmul_params(ensemble.members[0]), ensemble.k
    return matmul_params(ensemble.model), 0, 1  # one backbone; the K heads are one K-row matmul


def scoring_candidates(
    cfg: ScoringBenchmarkConfig, batches: list[dict]
) -> tuple[dict[str, Callable[[dict], object]], dict, dict[str, tuple[int, int, int]]]:
    """The models to time, each as ``forward(batch)``; fused-vs-sequential agreement per LoRA kind; and each
    candidate's (shared, per-member, members) matmul parameters, as ``ensemble_params`` counts them."""
    import torch

    from uprlhf.config import EnsembleConfig
    from uprlhf.reward.ensembles import ensemble_class
    from uprlhf.models import load_reward_model

    torch.manual_seed(cfg.seed)
    single = load_reward_model(cfg.backbone, num_labels=1).eval()
    candidates: dict[str, Callable[[dict], object]] = {"single": lambda b, m=single: m(**b).logits}
    params = {"single": (matmul_params(single), 0, 1)}
    agreement: dict[str, float] = {}
    ens_cfg = EnsembleConfig(k=cfg.k, lora_rank=cfg.lora_rank, lora_top_layers=cfg.lora_top_layers)
    for kind in cfg.kinds:
        ens = ensemble_class(kind)(cfg.backbone, ens_cfg, 0.0, 0.0, cfg.seed)
        if kind in LORA_KINDS:
            ens.attach_adapters()
            # Untrained B matrices are zero and every head a copy; give each member its own
            # weights so the fused and sequential outputs can be checked against each other.
            gen = torch.Generator().manual_seed(cfg.seed)
            with torch.no_grad():
                for name, p in ens.peft.named_parameters():
                    if "lora_B" in name or ".modules_to_save." in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        ens.eval()
        candidates[kind] = lambda b, e=ens: e(**b)
        params[kind] = ensemble_params(kind, ens)
        if kind in LORA_KINDS:

            def sequential(b, e=ens):
                outs = []
                for k in range(e.k):
                    e.set_member(k)
                    outs.append(e.peft(**b).logits[:, 0])
                return torch.stack(outs, dim=1)

            candidates[f"{kind}_sequential"] = sequential
            shared, member, k = params[kind]
            params[f"{kind}_sequential"] = (0, shared + member, k)  # every pass runs the whole model
            with torch.inference_mode():
                fused, seq = ens(**batches[0]), sequential(batches[0])
            agreement[kind] = float((fused - seq).abs().max())
    return candidates, agreement, params


def time_candidates(candidates: dict[str, Callable], batches: list[dict], repeats: int, log: Callable[[dict], None]) -> dict[str, list[float]]:
    """Seconds per full pass over ``batches``, ``repeats`` times per candidate, interleaved round-robin."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for forward in candidates.values():  # warm-up over every batch shape: kernel set-up stays untimed
            for batch in batches:
                forward(batch)
        for r in range(repeats):
            for name, forward in candidates.items():
                started = time.perf_counter()
                for batch in batches:
                    forward(batch)
                seconds = time.perf_counter() - started
                times[name].append(seconds)
                log({"repeat": r, "candidate": name, "seconds": seconds})
    return times


def scoring_summary(cfg: ScoringBenchmarkConfig, seconds: dict[str, float]) -> dict:
    """Ratios and targets from the median seconds of each candidate."""
    ratio = {kind: seconds[kind] / seconds["single"] for kind in cfg.kinds}
    fused = {kind: seconds[kind] / seconds[f"{kind}_sequential"] for kind in cfg.kinds if kind in LORA_KINDS}
    targets = {}
    for kind, limit in RATIO_TARGETS.items():
        if kind in ratio:
            targets[f"ratio_vs_single.{kind}"] = {"max": limit, "value": ratio[kind], "met": bool(ratio[kind] <= limit)}
    for kind, value in fused.items():
        targets[f"fused_vs_sequential.{kind}"] = {"max": FUSED_TARGET, "value": value, "met": bool(value <= FUSED_TARGET)}
    return {"seconds": seconds, "ratio_vs_single": ratio, "fused_vs_sequential": fused, "targets": targets}


def scoring_limit_summary(
    machine: dict, threads: int, tokens: int, params: dict[str, tuple[int, int, int]], seconds: dict[str, float]
) -> dict:
    """``limits``, ``work``, ``achieved`` and ``fraction_of_limit`` of every candidate against the matmul peak.

    ``machine`` is what ``measure_limits`` returned; ``tokens`` the real tokens of one pass
    over all pairs; ``params`` each candidate's (shared, per-member, members) parameters.
    """
    bound = machine["matmul_flops_per_s"][str(threads)]
    work = {name: scoring_flops(tokens, *params[name]) for name in seconds}
    achieved = {name: work[name] / seconds[name] for name in seconds}
    return {
        "limits": {**machine, "threads": {"scoring": threads}, "bounds": {"scoring": bound}, "units": {"scoring": "FLOP/s"}},
        "work": {"scoring": work},
        "achieved": {"scoring": achieved},
        "fraction_of_limit": {"scoring": {name: fraction_of_limit(value, bound) for name, value in achieved.items()}},
    }


def limits_line(limits: dict) -> str:
    """The machine's measured limits in one line of the printed report."""
    peaks = ", ".join(f"{v / 1e9:.1f} GFLOP/s on {t} thread(s)" for t, v in limits["matmul_flops_per_s"].items())
    return (
        f"- limits measured in this run: {limits['matmul_dtype']} matmul {peaks}; memory read "
        f"{limits['memory_bytes_per_s'] / 1e9:.1f} GB/s on {limits['memory_threads']} thread(s)"
    )


def format_scoring_table(cfg: ScoringBenchmarkConfig, summary: dict) -> str:
    """One row per candidate: median seconds, ratio vs the single model, fused vs sequential, share of the matmul peak."""
    seconds, fused = summary["seconds"], summary["fused_vs_sequential"]
    achieved, fraction = summary["achieved"]["scoring"], summary["fraction_of_limit"]["scoring"]
    lines = [
        f"Scoring {cfg.pairs} pairs, K = {cfg.k}, batch {cfg.batch_size}, max_length {cfg.max_length}, "
        f"median of {cfg.repeats} ({summary['environment']['threads']} threads, {summary['environment']['device']})",
        "",
        "| candidate | seconds | ratio vs single | fused vs sequential | GFLOP/s | of matmul peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, value in seconds.items():
        fvs = f"{fused[name]:.3f}" if name in fused else "–"
        lines.append(
            f"| {name} | {value:.3f} | {value / seconds['single']:.3f} | {fvs} | {achieved[name] / 1e9:.2f} | {100 * fraction[name]:.1f} % |"
        )
    lines.append("")
    lines.append(limits_line(summary["limits"]))
    for key, target in summary["targets"].items():
        mark = "met" if target["met"] else "NOT met"
        lines.append(f"- {key} = {target['value']:.3f} (target ≤ {target['max']}): {mark}")
    return "\n".join(lines)


def run_scoring(cfg: ScoringBenchmarkConfig, out: Path) -> dict:
    """Time every candidate, print the table, write summary.json and benchmark_table.md."""
    import peft
    import torch
    import transformers

    from uprlhf.models import load_tokenizer
    from uprlhf.reward.training import collate, encode_texts

    threads = _cpus()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(cfg.backbone)
    prompts, responses = synthetic_pairs(cfg.pairs, cfg.seed)
    items = encode_texts(tokenizer, prompts, responses, cfg.max_length)
    batches = [collate(tokenizer, items[i : i + cfg.batch_size]) for i in range(0, len(items), cfg.batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    log.info(
        f"scoring: {cfg.pairs} pairs ({tokens} tokens) in {len(batches)} batches, K={cfg.k}, "
        f"kinds={','.join(cfg.kinds)}, {threads} threads"
    )
    candidates, agreement, params = scoring_candidates(cfg, batches)
    machine = measure_limits([threads], threads, cfg.limits_seconds, getattr(torch, cfg.backbone.dtype))
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")

    def write_repeat(record: dict) -> None:
        with metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        log.info(f"repeat {record['repeat']} {record['candidate']}: {record['seconds']:.3f}s")

    times = time_candidates(candidates, batches, cfg.repeats, write_repeat)
    seconds = {name: _median(values) for name, values in times.items()}
    summary = {
        "benchmark": "scoring",
        **scoring_summary(cfg, seconds),
        "all_seconds": times,
        # Median of the per-repeat ratios: the candidates of one repeat ran back to back, so
        # this pairing is less sensitive to load that drifts between repeats.
        "paired": {
            "ratio_vs_single": {k: _median([a / b for a, b in zip(times[k], times["single"])]) for k in cfg.kinds},
            "fused_vs_sequential": {
                k: _median([a / b for a, b in zip(times[k], times[f"{k}_sequential"])]) for k in cfg.kinds if k in LORA_KINDS
            },
        },
        "fused_max_abs_diff": agreement,
        "tokens": tokens,
        "batches": len(batches),
        "environment": {
            "device": "cpu",
            "threads": threads,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "config": cfg.model_dump(),
    }
    bad = [name for name, value in seconds.items() if not (math.isfinite(value) and value > 0)]
    if bad:
        raise RuntimeError(f"non-positive timings for {', '.join(bad)}; raise pairs or repeats")
    summary.update(scoring_limit_summary(machine, threads, tokens, params, seconds))
    table = format_scoring_table(cfg, summary)
    atomic_write_text(out / "benchmark_table.md", table + "\n")
    write_json(out / "summary.json", summary)
    print(table, flush=True)
    return summary


BENCHMARKS["scoring"] = (ScoringBenchmarkConfig, run_scoring)


class RLBenchmarkConfig(Section):
    policy: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:smollm2"), description="Policy of both PPO loops."
    )
    lora_rank: int | None = Field(16, ge=1, description="LoRA rank of our policy (null: full fine-tuning, as TRL's PPO).")
    backbone: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:minilm"), description="Reward backbone of our ensemble."
    )
    k: int = Field(5, ge=2, le=64, description="Ensemble members K.")
    steps: int = Field(4, ge=2, description="PPO steps of each loop; the first is a warm-up and not counted.")
    batch_size: int = Field(8, ge=2, description="Prompts per step (one response each), for both loops.")
    max_new_tokens: int = Field(24, ge=1, description="Response length limit, for both loops.")
    threads: int = Field(2, ge=1, description="CPU threads for both loops (ours: split over learner ranks).")
    learner_workers: int = Field(2, ge=1, description="Our DeepSpeed learner ranks.")
    trl: bool = Field(True, description="Also time TRL's PPO (needs the bench extra: pip install -e '.[bench]').")
    decode_weights: list[DecodeWeightsName] = Field(
        ["int8", "bfloat16"], description="Also run our loop with each of these rollout.decode_weights and report its "
        "generation beside float32's ([] for none).",
    )
    trl_lora: bool = Field(
        True, description="With trl and lora_rank: also time TRL's PPO training our policy's LoRA (peft_config), the like-for-like ratio."
    )
    overlap: bool = Field(
        True, description="Also run our loop with the rollout worker and one learner rank on a core each (the scorer on "
        "the rest), synchronous and with rl.async_steps=1, and report the overlapped step time over the synchronous one.",
    )
    seed: int = Field(0, description="Seed of prompts and sampling.")
    limits_seconds: float = Field(1.0, gt=0, description="Seconds the matmul-peak measurement runs per thread count.")


def _benchmark_prompts(n: int, seed: int) -> list[str]:
    from uprlhf.data import sentiment

    try:
        snippets = sentiment.load_snippets(sentiment.reviews_dir() / sentiment.MOVIE_REVIEWS_FILE)
        return sentiment.make_prompts(snippets, n, min_words=4, max_words=8, seed=seed)
    except (FileNotFoundError, ValueError):
        return [p.split(".")[0] for p in synthetic_pairs(n, seed)[0]]


def meta_model(cfg: ModelConfig, *, reward_labels: int | None = None):
    """``cfg``'s causal LM (or, with ``reward_labels``, its sequence classifier) on the meta device in its dtype:
    exact sizes without reading or allocating weights (the actors load the real ones)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from uprlhf.models import resolve

    config = AutoConfig.from_pretrained(resolve(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
    auto = AutoModelForCausalLM
    if reward_labels is not None:
        config.num_labels = reward_labels
        auto = AutoModelForSequenceClassification
    with init_empty_weights():
        model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return model.to(getattr(torch, cfg.dtype))


@dataclass(frozen=True)
class PolicySizes:
    """Matmul parameters of the actor-critic, split by where the policy applies them (``uprlhf.perf.limits``)."""

    body: int  # transformer layers: every position of prompt and response
    head: int  # vocabulary projection: only where a response token is predicted (``logits_to_keep``)
    lora: int | None  # LoRA on the body; None: full fine-tuning
    value: int  # value head, on response positions
    weight_bytes: int  # streamed per decode step (the rollout merges the LoRA into the weights)

    @classmethod
    def of(cls, model, lora_rank: int | None, targets: list[str]) -> PolicySizes:
        head = output_params(model)
        return cls(
            body=matmul_params(model) - head,
            head=head,
            lora=None if lora_rank is None else lora_params(model, targets, lora_rank),
            value=model.config.hidden_size + 1,
            weight_bytes=weight_bytes(model),
        )

    def update(self, sequence_tokens: float, response_tokens: float, epochs: int) -> float:
        """The learner's work: one forward without grad (old log-probs and values), then ``epochs`` forward-backward passes."""
        full = self.lora is None
        body = update_flops(self.body + (self.lora or 0), self.body if full else self.lora, sequence_tokens, epochs, 1)
        head = update_flops(self.head + self.value, self.value + (self.head if full else 0), response_tokens, epochs, 1)
        return body + head

    def reference(self, sequence_tokens: float, response_tokens: float) -> float:
        """The scorer's reference log-probs: one forward of the untouched policy."""
        return forward_flops(self.body, sequence_tokens) + forward_flops(self.head, response_tokens)


def rl_stage_threads(rl_cfg) -> dict[str, int]:
    """Torch threads of each stage's actors, set as the actors set them (``threads_for``; ``LearnerWorker.setup``)."""
    from actors.placement import threads_for

    return {
        "generation": threads_for(rl_cfg.rollout.cpus_per_worker, rl_cfg.rollout.torch_threads),
        "update": max(1, round(rl_cfg.learner.cpus_per_worker)),
        "scoring": threads_for(rl_cfg.scorer_cpus, rl_cfg.scorer_threads),
    }


def replay_tokens(table, steps: list[int], reward_tokenizer, reward_max_length: int) -> dict[str, int]:
    """Real tokens of ``steps`` in a replay table: policy sequences (prompt + response), responses, reward-model inputs."""
    from uprlhf.reward.training import encode_texts

    rows = [row for row in table.select(["step", "prompt", "response", "prompt_ids", "response_ids"]).to_pylist() if row["step"] in steps]
    encoded = encode_texts(reward_tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], reward_max_length)
    return {
        "sequence": sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows),
        "response": sum(len(r["response_ids"]) for r in rows),
        "reward": sum(len(e["input_ids"]) for e in encoded),
    }


RL_UNITS = {"generation": "tokens/s", "update": "FLOP/s", "scoring": "FLOP/s"}


def rl_limit_summary(
    machine: dict, threads: dict[str, int], learner_workers: int, batch_size: int, policy_bytes: int,
    work: dict[str, float], seconds: dict[str, float],
) -> dict:
    """``limits``, ``achieved`` and ``fraction_of_limit`` of the three stages.

    ``machine`` is what ``measure_limits`` returned; ``work`` the generated tokens and the
    update's and scoring's FLOPs, ``seconds`` the stages' wall seconds, both summed over
    the timed steps. The learner ranks run side by side, so the update's bound is their
    count times the peak at one rank's threads.
    """
    peak = machine["matmul_flops_per_s"]
    bounds = {
        "generation": generation_bound(machine["memory_bytes_per_s"], policy_bytes, batch_size),
        "update": learner_workers * peak[str(threads["update"])],
        "scoring": peak[str(threads["scoring"])],
    }
    achieved = {stage: work[stage] / seconds[stage] for stage in bounds}
    return {
        "limits": {**machine, "threads": threads, "bounds": bounds, "units": RL_UNITS, "policy_weight_bytes": policy_bytes},
        "achieved": achieved,
        "fraction_of_limit": {stage: fraction_of_limit(achieved[stage], bounds[stage]) for stage in bounds},
    }


def rl_limit_lines(summary: dict, learner_workers: int, batch_size: int) -> list[str]:
    """The printed report's lines on the limits and each stage's share of its bound."""
    limits, achieved, fraction = summary["limits"], summary["achieved"], summary["fraction_of_limit"]
    bounds, threads = limits["bounds"], limits["threads"]
    why = {
        "generation": (f"{achieved['generation']:.1f} tokens/s of {bounds['generation']:.1f} (memory read ÷ "
                       f"{limits['policy_weight_bytes'] / 1e6:.1f} MB of weights per decode step × batch {batch_size})"),
        "update": (f"{achieved['update'] / 1e9:.2f} GFLOP/s of {bounds['update'] / 1e9:.1f} (matmul peak on "
                   f"{threads['update']} thread(s) × {learner_workers} learner ranks)"),
        "scoring": f"{achieved['scoring'] / 1e9:.2f} GFLOP/s of {bounds['scoring'] / 1e9:.1f} (matmul peak on {threads['scoring']} thread(s))",
    }
    return [limits_line(limits), *(f"- {stage}: {why[stage]}: {100 * fraction[stage]:.1f} % of the limit" for stage in why)]


def run_rl(cfg: RLBenchmarkConfig, out: Path) -> dict:
    """Our PPO loop, then TRL's, on the same work; summary.json and a table."""
    import torch

    from uprlhf.config import EnsembleConfig, RLConfig, build
    from uprlhf.data.loaders import write_parquet
    from uprlhf.reward.ensembles import ensemble_class
    from uprlhf.models import load_tokenizer, resolve
    from uprlhf.paths import RunPaths
    from uprlhf.reward.training import TOKENIZER_DIR
    from uprlhf.rl.replay import read_replay
    from uprlhf.data.sentiment import chat_prompt

    if cfg.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            fail("the TRL side needs the bench extra: pip install -e '.[bench]' (or run with trl=false)")
    if cfg.batch_size % cfg.learner_workers:
        fail(f"batch_size={cfg.batch_size} must be a multiple of learner_workers={cfg.learner_workers}")
    prompts = _benchmark_prompts(cfg.batch_size * cfg.steps + 8, cfg.seed)
    write_parquet([{"prompt": p} for p in prompts], out / "prompts.parquet")
    reward = out / "reward"
    if not (reward / "ensemble.json").exists():
        ensemble_class("linear")(cfg.backbone, EnsembleConfig(k=cfg.k), 0.0, 0.0, cfg.seed).save(reward)
        load_tokenizer(cfg.backbone).save_pretrained(reward / TOKENIZER_DIR)
    # Reservations add up to `threads` CPUs: half for the learner ranks, a quarter each for
    # the rollout worker and the scorer (stages run one after another, so each uses all threads).
    share = cfg.threads / 2 / cfg.learner_workers
    rl_cfg = build(RLConfig, {
        "prompts": str(out / "prompts.parquet"),
        "eval_prompts": 8,
        "reward_checkpoint": str(reward),
        "reward_k": cfg.k,
        "policy": {"model": cfg.policy.model_dump(), "lora_rank": cfg.lora_rank},
        "rollout": {"max_new_tokens": cfg.max_new_tokens, "cpus_per_worker": cfg.threads / 4, "torch_threads": cfg.threads},
        "learner": {"num_workers": cfg.learner_workers, "cpus_per_worker": share},
        "scorer_cpus": cfg.threads / 4,
        "scorer_threads": cfg.threads,
        "ppo": {"steps": cfg.steps, "batch_size": cfg.batch_size, "minibatch_size": cfg.batch_size, "epochs": 1},
        "gold_every": 10**6,
        "checkpoint_every": 10**6,
        "seed": cfg.seed,
    })
    threads = rl_stage_threads(rl_cfg)
    policy_meta = meta_model(cfg.policy)
    policy = PolicySizes.of(policy_meta, cfg.lora_rank, rl_cfg.policy.lora_target_modules)
    reward_params = matmul_params(meta_model(cfg.backbone, reward_labels=cfg.k))
    machine = measure_limits(threads.values(), threads["generation"], cfg.limits_seconds, getattr(torch, cfg.policy.dtype))
    run_dir = out / "ours"
    records = timed_run(rl_cfg, run_dir, "benchmark")
    step_seconds = sum(r["step_seconds"] for r in records)
    tokens = sum(r["response_tokens"] for r in records)
    counted = replay_tokens(read_replay(RunPaths(run_dir).replay), [r["step"] for r in records],
                            load_tokenizer(cfg.backbone), rl_cfg.reward_max_length)
    work = {
        "generation": tokens,
        "update": policy.update(counted["sequence"], counted["response"], rl_cfg.ppo.epochs),
        "scoring": policy.reference(counted["sequence"], counted["response"]) + forward_flops(reward_params, counted["reward"]),
    }
    stage_of = {"generation": "generate", "update": "train", "scoring": "score"}
    stage_wall = {stage: sum(r[f"seconds_{s}"] for r in records) for stage, s in stage_of.items()}
    stages = {s: _median([r[f"seconds_{s}"] for r in records]) for s in ("generate", "score", "train", "sync")}
    summary = {
        "benchmark": "rl",
        "stage_seconds": stages,
        "step_seconds": step_seconds / len(records),
        "ray_overhead_fraction": sum(r["ray_overhead_seconds"] for r in records) / step_seconds,
        "tokens_per_second": tokens / step_seconds,
        "generation_tokens_per_second": tokens / sum(r["seconds_generate"] for r in records),
        "timed_steps": len(records),
        "trl_tokens_per_second": None,
        "speedup_vs_trl": None,
        "trl_lora_tokens_per_second": None,
        "speedup_vs_trl_lora": None,
        **rl_limit_summary(machine, threads, cfg.learner_workers, cfg.batch_size, policy.weight_bytes, work, stage_wall),
        "work": {**work, "tokens": counted, "params": {**asdict(policy), "reward": reward_params}},
        "config": cfg.model_dump(),
    }
    summary["decode_weights"] = {}
    for name in cfg.decode_weights:
        low_records = timed_run(rl_cfg.replace(rollout=rl_cfg.rollout.replace(decode_weights=name)), out / f"ours_{name}",
                                f"benchmark-{name}")
        low_tps = sum(r["response_tokens"] for r in low_records) / sum(r["seconds_generate"] for r in low_records)
        low_bytes = decode_weight_bytes(policy_meta, name, rl_cfg.policy.lora_target_modules if cfg.lora_rank else [])
        low_bound = generation_bound(machine["memory_bytes_per_s"], low_bytes, cfg.batch_size)
        summary["decode_weights"][name] = {
            "generation_tokens_per_second": low_tps,
            "step_seconds": sum(r["step_seconds"] for r in low_records) / len(low_records),
            "seconds_generate": _median([r["seconds_generate"] for r in low_records]),
            "weight_bytes": low_bytes,
            "bound": low_bound,
            "fraction_of_limit": fraction_of_limit(low_tps, low_bound),
            "fraction_of_float32_bound": fraction_of_limit(low_tps, summary["limits"]["bounds"]["generation"]),
            "speedup_vs_float32": low_tps / summary["generation_tokens_per_second"],
        }
    if cfg.overlap:
        summary["overlap"] = overlap_comparison(rl_cfg, cfg.threads, out)
    if cfg.trl:
        from jobs.drivers.trl_baseline import trl_tokens_per_second

        def time_trl(lora: dict | None, work: str) -> tuple[dict, float]:
            run = trl_tokens_per_second(
                resolve(cfg.policy.name_or_path), [chat_prompt(p) for p in prompts], batch_size=cfg.batch_size,
                max_new_tokens=cfg.max_new_tokens, steps=cfg.steps, threads=cfg.threads, seed=cfg.seed,
                work_dir=str(out / work), lora=lora,
            )
            timed = slice(1, None)  # the same warm-up step is dropped on both sides
            return run, sum(run["step_tokens"][timed]) / sum(run["step_seconds"][timed])

        trl, trl_tps = time_trl(None, "trl")
        summary.update(trl=trl, trl_tokens_per_second=trl_tps, speedup_vs_trl=summary["tokens_per_second"] / trl_tps)
        if cfg.trl_lora and cfg.lora_rank is not None:
            ours_lora = rl_cfg.policy
            trl_lora, lora_tps = time_trl(
                {"r": ours_lora.lora_rank, "lora_alpha": ours_lora.lora_alpha, "target_modules": ours_lora.lora_target_modules},
                "trl_lora",
            )
            summary.update(trl_lora=trl_lora, trl_lora_tokens_per_second=lora_tps,
                           speedup_vs_trl_lora=summary["tokens_per_second"] / lora_tps)
    lines = [
        f"| stage | seconds (median of {len(records)} steps) |", "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in stages.items()),
        "",
        f"- step: {summary['step_seconds']:.2f} s; Ray overhead {100 * summary['ray_overhead_fraction']:.1f} % of step time (target ≤ 5 %)",
        f"- tokens/s (whole step): ours {summary['tokens_per_second']:.2f}"
        + (f", TRL PPO {summary['trl_tokens_per_second']:.2f}, speed-up {summary['speedup_vs_trl']:.2f}x (target ≥ 1.0, stretch 1.5)" if cfg.trl else ""),
        *([f"- like for like, TRL PPO training the same LoRA: {summary['trl_lora_tokens_per_second']:.2f} tokens/s, "
            f"speed-up {summary['speedup_vs_trl_lora']:.2f}x (target ≥ 1.5)"] if summary["speedup_vs_trl_lora"] else []),
        *rl_limit_lines(summary, cfg.learner_workers, cfg.batch_size),
        *(f"- {name} decoding (rollout.decode_weights={name}): generation {low['generation_tokens_per_second']:.1f} tokens/s, "
          f"{low['speedup_vs_float32']:.2f}x float32's (target ≥ 3); {100 * low['fraction_of_float32_bound']:.1f} % "
          f"of the float32 bound (target ≥ 40 %), {100 * low['fraction_of_limit']:.1f} % of its own "
          f"({low['weight_bytes'] / 1e6:.1f} MB per decode step); step {low['step_seconds']:.2f} s"
          for name, low in summary["decode_weights"].items()),
        *([f"- one-step-off-policy overlap (rl.async_steps=1, rollout and learner on {summary['overlap']['cpus_each']:g} CPU each): "
           f"step {summary['overlap']['async_step_seconds']:.2f} s against {summary['overlap']['sync_step_seconds']:.2f} s "
           f"synchronous, {summary['overlap']['ratio']:.2f}x (target ≤ 0.75)"] if cfg.overlap else []),
    ]
    table = "\n".join(lines)
    atomic_write_text(out / "benchmark_table.md", table + "\n")
    write_json(out / "summary.json", summary)
    print(table, flush=True)
    return summary


def timed_run(rl_cfg, run_dir: Path, name: str) -> list[dict]:
    """One fresh run of our loop in ``run_dir``; its step records without the first (the warm-up)."""
    import shutil

    from jobs.common import read_records
    from jobs.drivers.ppo import run_ppo

    shutil.rmtree(run_dir, ignore_errors=True)
    run_ppo(rl_cfg, run_dir, name=name)
    return [r for r in read_records(run_dir) if "step_seconds" in r][1:]


def overlap_comparison(rl_cfg, threads: int, out: Path) -> dict:
    """The synchronous loop and the one-step-off-policy one, side by side, each stage on its own share of the CPUs.

    Overlap can only pay when generation and the update do not share a core: the rollout
    worker and one learner rank each reserve (and run as many threads as) ``threads * 3/8``
    CPUs, the scorer the remaining quarter; both runs use exactly this placement.
    """
    each = threads * 3 / 8
    split = rl_cfg.replace(
        rollout=rl_cfg.rollout.replace(cpus_per_worker=each, torch_threads=max(1, round(each))),
        learner=rl_cfg.learner.replace(num_workers=1, cpus_per_worker=each),
        scorer_cpus=threads / 4,
    )
    step_seconds = {}
    for name, async_steps in (("sync", 0), ("async", 1)):
        timed = timed_run(split.replace(async_steps=async_steps), out / f"ours_{name}_split", f"benchmark-{name}")
        step_seconds[name] = sum(r["step_seconds"] for r in timed) / len(timed)
    return {
        "cpus_each": each,
        "sync_step_seconds": step_seconds["sync"],
        "async_step_seconds": step_seconds["async"],
        "ratio": step_seconds["async"] / step_seconds["sync"],
    }


BENCHMARKS["rl"] = (RLBenchmarkConfig, run_rl)


class SelectionBenchmarkConfig(Section):
    backbone: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="packaged:minilm"), description="Reward backbone of the LoRA members."
    )
    k: int = Field(5, ge=2, le=64, description="Ensemble members K.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank of each member.")
    lora_top_layers: int | None = Field(2, ge=1, description="LoRA on the top N layers (the demo's setting); null = every layer.")
    dims: list[int] = Field(default_factory=lambda: [1024, 4096, 8192], min_length=1, description="Projection dimensions d to time.")
    candidates: int = Field(64, ge=1, description="Candidates timed per d.")
    checkpoints: int = Field(2, ge=1, description="Reward-training checkpoints the influence is summed over.")
    validation: int = Field(32, ge=1, description="Validation responses (one subtask).")
    buffer_rows: int = Field(10000, ge=4, description="Rows of the synthetic buffer the full UGDA selection runs on (0.5 / 0.5 budget).")
    max_length: int = Field(64, ge=8, description="Tokens per (prompt, response).")
    seed: int = Field(0, description="Seed of texts and weights.")


def selection_checkpoints(cfg: SelectionBenchmarkConfig, root: Path) -> list[Path]:
    """C checkpoints of a MiniLM LoRA ensemble laid out as jobs.train_reward writes them."""
    import torch
    from safetensors.torch import save_file

    from uprlhf.config import EnsembleConfig
    from uprlhf.reward.ensembles import ensemble_class
    from uprlhf.models import load_tokenizer
    from uprlhf.reward.training import MOMENTS_FILE, TOKENIZER_DIR
    from uprlhf.selection.influence import TRAINER_STATE

    ens_cfg = EnsembleConfig(k=cfg.k, lora_rank=cfg.lora_rank, lora_top_layers=cfg.lora_top_layers)
    ensemble = ensemble_class("lora")(cfg.backbone, ens_cfg, 1e-4, 1e-3, cfg.seed)
    ensemble.attach_adapters()
    gen = torch.Generator().manual_seed(cfg.seed)
    paths = []
    for c in range(cfg.checkpoints):
        with torch.no_grad():
            for name, p in ensemble.refinable_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        moments = {}
        for name, p in ensemble.refinable_parameters():
            moments[f"{name}.exp_avg"] = torch.randn(p.shape, generator=gen) * 1e-4
            moments[f"{name}.exp_avg_sq"] = torch.rand(p.shape, generator=gen) * 1e-8
        path = root / f"ckpt_{c}"
        ensemble.save(path)
        load_tokenizer(cfg.backbone).save_pretrained(path / TOKENIZER_DIR)
        save_file(moments, str(path / MOMENTS_FILE))
        write_json(path / TRAINER_STATE, {"mean_lr": 1e-3 * (cfg.checkpoints - c) / cfg.checkpoints, "has_moments": True})
        paths.append(path)
    return paths


def run_selection(cfg: SelectionBenchmarkConfig, out: Path) -> dict:
    import tempfile

    import torch

    threads = _cpus()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-selection-") as root:
        return _time_selection(cfg, out, selection_checkpoints(cfg, Path(root)), threads)


def _time_selection(cfg: SelectionBenchmarkConfig, out: Path, paths: list[Path], threads: int) -> dict:
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer

    from uprlhf.config import SelectorConfig
    from uprlhf.selection.labelers import build_labeler
    from uprlhf.reward.training import TOKENIZER_DIR
    from uprlhf.selection.influence import InfluenceRanker
    from uprlhf.selection.selector import Selector

    tokenizer = AutoTokenizer.from_pretrained(paths[0] / TOKENIZER_DIR)
    prompts, responses = synthetic_pairs(max(cfg.buffer_rows, cfg.candidates + cfg.validation), cfg.seed)
    validation = {"default": (prompts[-cfg.validation :], responses[-cfg.validation :])}
    metrics = out / "metrics.jsonl"
    metrics.write_text("")
    per_second, rankers = {}, {}
    for d in cfg.dims:
        ranker = InfluenceRanker(paths, tokenizer, validation, dim=d, seed=cfg.seed, adam_eps=1e-8, max_length=cfg.max_length)
        ranker.scores(prompts[:2], responses[:2])  # warm-up: kernels and projection blocks
        started = time.perf_counter()
        ranker.scores(prompts[: cfg.candidates], responses[: cfg.candidates])
        seconds = time.perf_counter() - started
        per_second[str(d)] = cfg.candidates / seconds
        rankers[d] = ranker
        record = {"dim": d, "candidates": cfg.candidates, "seconds": seconds, "candidates_per_second": per_second[str(d)]}
        with metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        log.info(f"selection d={d}: {per_second[str(d)]:.2f} candidates/s over {cfg.checkpoints} checkpoints")

    n = cfg.buffer_rows
    gen = torch.Generator().manual_seed(cfg.seed)
    table = pa.table({"step": [i // 64 for i in range(n)], "sample": [i % 64 for i in range(n)], "prompt": prompts[:n],
                      "response": responses[:n], "reward_std": torch.rand(n, generator=gen).tolist()})
    sel_cfg = SelectorConfig(strategy="ugda", projection_dim=cfg.dims[0], seed=cfg.seed)
    selector = Selector(sel_cfg, build_labeler(sel_cfg.labeler, out), out=out, checkpoints=paths, validation=validation,
                        max_length=cfg.max_length, ranker=rankers[cfg.dims[0]])
    log.info(f"selection: UGDA over a {n}-row buffer at d={cfg.dims[0]}")
    started = time.perf_counter()
    chosen = selector.select(table, 0)
    select_seconds = time.perf_counter() - started
    summary = {
        "benchmark": "selection",
        "candidates_per_second": per_second,
        "buffer_rows": n,
        "selected": len(chosen),
        "seconds_to_select": select_seconds,
        "seconds_for_10k": select_seconds * 10000 / n,
        "target_seconds_for_10k": 600,
        "refinable_parameters": rankers[cfg.dims[0]].projector.num_params,
        "environment": {"device": "cpu", "threads": threads, "torch": torch.__version__, "platform": platform.platform()},
        "config": cfg.model_dump(),
    }
    table_md = "\n".join([
        "| d | candidates/s |", "|---|---|", *[f"| {d} | {v:.2f} |" for d, v in per_second.items()],
        "", f"UGDA selection from {n} rows: {select_seconds:.0f} s ({summary['seconds_for_10k']:.0f} s per 10,000; target 600 s)",
    ])
    atomic_write_text(out / "benchmark_table.md", table_md + "\n")
    write_json(out / "summary.json", summary)
    print(table_md, flush=True)
    return summary


BENCHMARKS["selection"] = (SelectionBenchmarkConfig, run_selection)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    allowed = ", ".join(BENCHMARKS)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"benchmarks: {allowed}; `python -m jobs.benchmark NAME --describe` lists its fields")
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        fail(f"name a benchmark first: python -m jobs.benchmark NAME ...; allowed: {allowed}")
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        fail(f"unknown benchmark {name!r}; allowed: {allowed}")
    config_cls, runner = BENCHMARKS[name]
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in rest):
        rest = [*rest, "--output-dir", str(Path("runs") / f"bench-{name}")]
    cfg, out = parse(config_cls, __doc__, rest)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    return runner(cfg, out)


if __name__ == "__main__":
    main()

"""The machine's own limits, measured where the work runs, and what each stage could reach under them.

Two measurements, both best of several repeats after an untimed warm-up (the best run
is the one the machine's noise disturbed least):

- ``measure_matmul_peak``: FLOP/s of square matmuls at a given torch thread count, the
  ceiling of compute-bound stages (the PPO update, scoring).
- ``measure_memory_bandwidth``: bytes/s of a streaming *read* (``sum`` over a tensor far
  larger than the last-level cache), the ceiling of small-batch decoding, which reads
  every weight once per step and writes almost nothing. Only bytes read are counted.

FLOP counting convention (``forward_flops``, ``update_flops``, ``scoring_flops``): a
weight matrix of P parameters costs 2·P FLOPs per token it is applied to (one multiply
and one add per weight) in the forward pass. In the backward pass every matmul the
gradient flows through costs 2·P for the activation gradient — frozen weights included,
since LoRA still back-propagates through them — and a trainable one another 2·P for its
weight gradient: 4·P + 2·T per token for a forward and backward, 6·P for full
fine-tuning (T = P). Only weight matmuls count: attention scores (∝ sequence length,
< 2 % at the benchmarks' ≤ 64-token sequences), norms and activations are left out, and
so is padding: tokens are real (attention-masked) tokens, so work spent on padding
lowers the fraction of the limit instead of raising the FLOP count.

Parameters are counted by ``matmul_params``: every parameter except lookup tables
(token, position, type embeddings); a vocabulary projection counts even when tied to
the input embedding, since it is a matmul.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_matmul_peak(
    threads: int, size: int = 1024, repeats: int = 5, seconds: float = 1.0, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of ``size``×``size`` matmuls on ``threads`` torch threads: best of ``repeats`` runs.

    One untimed matmul sets up kernels and pages; a second one sizes the runs so the
    whole measurement takes about ``seconds`` on any machine. The thread count is restored.
    """
    with _torch_threads(threads):
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.matmul(a, b, out=out)
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        once = time.perf_counter() - started
        iterations = max(1, round(seconds / repeats / max(once, 1e-9)))
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(iterations):
                torch.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 * iterations / best


def measure_memory_bandwidth(threads: int, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s read by ``sum`` over an ``nbytes`` float32 tensor on ``threads`` threads: best of ``repeats``.

    The default, 256 MiB, is several times any last-level cache, so the data come from
    memory; bytes read are counted, not the one float written. The thread count is restored.
    """
    with _torch_threads(threads):
        data = torch.ones(max(1, nbytes // 4), dtype=torch.float32)  # ones, not empty: every page is touched
        data.sum()
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - started)
    return data.numel() * data.element_size() / best


def measure_limits(
    matmul_threads: Iterable[int], memory_threads: int, seconds: float = 1.0, dtype: torch.dtype = torch.float32
) -> dict:
    """The matmul peak at each thread count (keys are strings, as in JSON) and the memory bandwidth."""
    peaks = {str(t): measure_matmul_peak(t, seconds=seconds, dtype=dtype) for t in sorted(set(matmul_threads))}
    return {
        "matmul_flops_per_s": peaks,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "memory_bytes_per_s": measure_memory_bandwidth(memory_threads),
        "memory_threads": memory_threads,
    }


def _matmul_weights(model: nn.Module) -> list[nn.Parameter]:
    """``model``'s parameters (shared ones once) other than lookup tables; a vocabulary projection stays."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        tables.discard(id(head.weight))
    return [p for p in model.parameters() if id(p) not in tables]


def matmul_params(model: nn.Module) -> int:
    """Parameters that multiply a token's activations (works on the meta device)."""
    return sum(p.numel() for p in _matmul_weights(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``matmul_params``: what one decode step streams from memory (numel × element size)."""
    return sum(p.numel() * p.element_size() for p in _matmul_weights(model))


def int8_weight_bytes(model: nn.Module, float_modules: Iterable[str]) -> int:
    """Bytes one decode step streams under ``Int8Decoding``: one per weight of a linear layer, except
    those named ``t`` or ``*.t`` for ``t`` in ``float_modules`` (the LoRA targets), which keep their element size."""
    targets = list(float_modules)
    int8 = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name == t or name.endswith(f".{t}") for t in targets)
    }
    return sum(p.numel() * (1 if id(p) in int8 else p.element_size()) for p in _matmul_weights(model))


def decode_weight_bytes(model: nn.Module, decode_weights: str, float_modules: Iterable[str]) -> int:
    """Bytes one decode step streams with ``rollout.decode_weights`` set to ``decode_weights``: the
    int8 count for 'int8', else every matmul weight at that dtype's size ('float32', 'bfloat16')."""
    if decode_weights == "int8":
        return int8_weight_bytes(model, float_modules)
    return matmul_params(model) * getattr(torch, decode_weights).itemsize


def output_params(model: nn.Module) -> int:
    """Parameters of the vocabulary projection, which the policy applies only where a token is predicted."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return 0 if head is None else sum(p.numel() for p in head.parameters())


def lora_params(model: nn.Module, targets: Iterable[str], rank: int) -> int:
    """Parameters of rank-``rank`` LoRA on every linear module named ``t`` or ``*.t`` (as peft matches them): r·(in + out) each."""
    targets = list(targets)
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    )


def generation_bound(memory_bytes_per_s: float, weight_bytes: int, batch_size: int) -> float:
    """Tokens/s when decoding is bound by memory: each step streams all weights once for the whole batch.

    Reading the KV cache (tens of MB against hundreds for the weights at the benchmarks'
    lengths) and the prefill are left out, so this is an upper bound.
    """
    return memory_bytes_per_s / weight_bytes * batch_size


def forward_flops(params: int, tokens: float) -> float:
    """2·P FLOPs per token: one multiply and one add per weight."""
    return 2.0 * params * tokens


def update_flops(params: int, trainable: int, tokens: float, epochs: int = 1, forwards_without_grad: int = 0) -> float:
    """FLOPs of ``epochs`` forward-and-backward passes, plus ``forwards_without_grad`` forwards, over ``tokens`` tokens.

    Per token: forward 2·P; backward 2·P of activation gradients through every weight
    (frozen ones too) and 2·T of weight gradients for the trainable ones.
    """
    per_epoch = forward_flops(params, tokens) + forward_flops(params, tokens) + forward_flops(trainable, tokens)
    return epochs * per_epoch + forwards_without_grad * forward_flops(params, tokens)


def scoring_flops(tokens: float, shared: int, member: int = 0, members: int = 1) -> float:
    """Forward FLOPs of an ensemble pass: ``shared`` parameters run once, each of ``members`` runs its own ``member``."""
    return forward_flops(shared + members * member, tokens)


def fraction_of_limit(measured: float, bound: float) -> float:
    """``measured`` as a fraction of ``bound`` (1.0: the stage runs at the machine's limit)."""
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"a bound must be positive and finite, got {bound!r}")
    return measured / bound

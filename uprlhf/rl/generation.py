"""Sampling completions from a causal LM with transformers ``generate`` (the CPU backend), and
the lower-precision decoding weights that make it faster on a CPU (``DECODE_WEIGHTS``).

A CPU decode step streams every weight once, so small-batch generation is bound by memory
bandwidth, not FLOPs: int8 weights read a quarter of the bytes, bfloat16 half. ``Bf16Decoding``
casts every floating-point weight to bfloat16 on entering ``decoding()`` (tens of milliseconds
for 135M parameters, so the copy always matches the current weights); it needs bfloat16 matmul
units (AVX-512 BF16, AMX), and even there sped ``generate`` up by only 1.0-1.2x (README, RL
throughput): the GEMMs halve, the rest of a decode step does not. ``Int8Decoding`` keeps an
int8 copy of every plain ``nn.Linear`` (fbgemm dynamic quantization: int8 weights, activations
quantized per call) and swaps the copies in only while ``generate`` runs, so every other
forward (log-probs, training, evaluation) sees the float weights unchanged. It uses
``torch.ao.quantization.quantize_dynamic``, deprecated in favour of torchao, because torchao's
eager int8 configurations are slower than float32 on this CPU path (SmolLM2-135M, batch 8,
1 thread: float32 27.6 tokens/s, torchao int8 weight-only 34.6, torchao int8 dynamic 5.6,
``quantize_dynamic`` 97.2).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from uprlhf.registry import Registry

# How the weights are stored while generate() runs (rollout.decode_weights, data.decode_weights):
# each entry is built as ``entry(model, skip=...)`` and has ``refresh()`` (after a full-weight
# load), ``decoding()`` (the context generate() runs in) and ``exact`` (whether the sampler's
# log-probs are the float32 model's own).
DECODE_WEIGHTS: Registry[type] = Registry("decode weights")


@DECODE_WEIGHTS.register("float32")
class Float32Decoding:
    """The model's own weights: nothing swapped."""

    exact = True

    def __init__(self, model: nn.Module, skip: Callable[[str], bool] = lambda name: False):
        self.model = model

    def refresh(self) -> None:
        """Nothing is copied, so nothing goes stale."""

    def decoding(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@DECODE_WEIGHTS.register("bfloat16")
class Bf16Decoding(Float32Decoding):
    """bfloat16 casts of every floating-point parameter, swapped in for the length of ``decoding()``.

    Every parameter, adapted or not: the activations then stay in bfloat16 from the embedding
    to the logits. ``skip`` is ignored: the cast is made on entry, from the weights as they are.
    """

    exact = False

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        params = [p for p in self.model.parameters() if p.is_floating_point() and p.dtype != torch.bfloat16]
        floats = [p.data for p in params]
        for p in params:
            p.data = p.data.to(torch.bfloat16)
        try:
            yield
        finally:
            for p, data in zip(params, floats):
                p.data = data


def _quantized(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(linear)), {nn.Linear}, dtype=torch.qint8)[0]


@DECODE_WEIGHTS.register("int8")
class Int8Decoding:
    """int8 copies of a model's plain ``nn.Linear`` modules, swapped in for the length of ``decoding()``.

    Modules named by ``skip`` stay float: a LoRA-wrapped projection (its ``base_layer`` and
    ``lora_*`` parts) changes with every policy version, the rest of the model does not, so the
    int8 copies are made once and only ``refresh`` (after a full-weight load) makes them again.
    """

    exact = False

    def __init__(self, model: nn.Module, skip: Callable[[str], bool] = lambda name: False):
        self.model = model
        self.names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not skip(n)]
        self.int8: dict[str, nn.Module] = {}
        self.refresh()

    def refresh(self) -> None:
        """Quantize the float modules' current weights."""
        self.int8 = {n: _quantized(self.model.get_submodule(n)) for n in self.names}

    def _swap(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        previous = {}
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            previous[name] = getattr(owner, child)
            setattr(owner, child, module)
        return previous

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        floats = self._swap(self.int8)
        try:
            yield
        finally:
            self._swap(floats)


def lora_part(name: str) -> bool:
    """A module of a LoRA-wrapped layer (peft names its pieces ``base_layer``, ``lora_A``, ``lora_B``)."""
    return ".base_layer" in name or ".lora_" in name


@torch.inference_mode()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    decode_weights: str = "float32",
    progress: Callable[[int], None] = lambda done: None,
) -> list[list[str]]:
    """``n`` sampled continuations per prompt, decoded without special tokens and stripped;
    ``decode_weights`` names the weights the sampler reads (``DECODE_WEIGHTS``)."""
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    with DECODE_WEIGHTS.get(decode_weights)(model).decoding():
        for start in range(0, len(flat), batch_size):
            enc = tokenizer(flat[start : start + batch_size], return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                do_sample=True,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts.extend(t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
            progress(len(texts))
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

"""Sampling completions from a causal LM with transformers ``generate`` (the CPU backend)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    progress: Callable[[int], None] = lambda done: None,
) -> list[list[str]]:
    """``n`` sampled continuations per prompt, decoded without special tokens and stripped."""
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
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

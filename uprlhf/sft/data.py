"""SFT examples: prompt tokens as the rollouts see them, then the response and end-of-sequence, loss on the response only.

The prompt and the response are tokenized apart, as a rollout produces them (the
template-wrapped prompt, then sampled tokens), so the fine-tuned policy learns the
token sequences it will later sample. Labels are -100 on prompt and padding
tokens, which transformers' causal-LM loss ignores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from uprlhf.data.loaders import DataError
from uprlhf.seeds import derive_seed

IGNORE = -100  # the label transformers' cross-entropy skips


def encode_example(
    tokenizer: PreTrainedTokenizerBase, template: Callable[[str], str], prompt: str, response: str, max_length: int
) -> dict[str, list[int]] | None:
    """Input ids and labels of one example; None when the prompt alone leaves no room for a response token."""
    prompt_ids = tokenizer(template(prompt))["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    response_ids = response_ids[:room]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}


def encode_rows(
    tokenizer: PreTrainedTokenizerBase, template: Callable[[str], str], rows: list[dict], max_length: int, where: str
) -> list[dict[str, list[int]]]:
    """Every row encoded; a DataError names each row whose prompt is too long (before any training starts)."""
    examples, problems = [], []
    for number, row in enumerate(rows, 1):
        example = encode_example(tokenizer, template, row["prompt"], row["response"], max_length)
        if example is None:
            problems.append(
                f"{where}: row {number} (id {row.get('id')}): prompt: {len(tokenizer(template(row['prompt']))['input_ids'])} "
                f"tokens leave no room for a response within max_length={max_length}"
            )
        examples.append(example)
    if problems:
        raise DataError(problems)
    return examples


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on padding)."""
    width = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])

    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
    return {"input_ids": padded("input_ids", pad_id), "attention_mask": mask, "labels": padded("labels", IGNORE)}


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def step_indices(n_examples: int, step: int, batch_size: int, rank: int, world_size: int, seed: int) -> list[int]:
    """Rank ``rank``'s share of global step ``step``: a seeded shuffle per epoch, wrapped so every batch is full.

    A function of the step alone, so a resumed run draws exactly the batches it would have.
    """
    per_epoch = steps_per_epoch(n_examples, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(derive_seed(seed, "sft order", epoch)).shuffle(order)
    order = [order[i % n_examples] for i in range(per_epoch * batch_size)]
    batch = order[position * batch_size : (position + 1) * batch_size]
    return batch[rank::world_size]

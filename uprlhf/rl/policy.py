"""The policy side of RL: prompt formatting, the actor-critic, and per-token log-probs.

A sampled batch is laid out as ``[prompt (left-padded) | response (right-padded)]``
so that every response starts at the same column; ``response_mask`` is 1 on
response tokens up to and including the end-of-sequence token. The learner's
actor-critic and the rollout workers build their policy with the same
``build_policy``, so parameter names match and weights can be synced by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from uprlhf.rl.config import PolicyConfig
from uprlhf.models import load_policy, load_tokenizer
from uprlhf.data.sentiment import chat_prompt
from uprlhf.registry import Registry

# How a prompt row becomes the policy's input (``policy.prompt_template``): ``fn(prompt) -> str``.
PROMPT_TEMPLATES: Registry[Callable[[str], str]] = Registry("prompt template")
PROMPT_TEMPLATES.add("plain", lambda prompt: prompt)
PROMPT_TEMPLATES.add("sentiment_chat", chat_prompt)


@dataclass
class SampledBatch:
    """Responses to a batch of prompts, as token ids and text, with the sampler's log-probs."""

    prompts: list[str]  # the prompt rows as given (what the reward models and the gold see)
    responses: list[str]  # decoded without special tokens
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, T] right-padded with the pad token
    response_mask: Tensor  # [B, T]
    logprobs: Tensor  # [B, T] log π(token) under the sampling policy, 0 on padding
    pad_id: int = 0  # the tokenizer's pad token, so batches from several workers can be joined

    def __len__(self) -> int:
        return len(self.prompts)

    def sequences(self) -> tuple[Tensor, Tensor]:
        """Input ids and attention mask of prompt + response."""
        return (
            torch.cat([self.prompt_ids, self.response_ids], dim=1),
            torch.cat([self.prompt_mask, self.response_mask], dim=1),
        )

    def to(self, device: torch.device | str) -> SampledBatch:
        return SampledBatch(
            self.prompts, self.responses, self.prompt_ids.to(device), self.prompt_mask.to(device),
            self.response_ids.to(device), self.response_mask.to(device), self.logprobs.to(device), self.pad_id,
        )

    def select(self, index: slice | list[int]) -> SampledBatch:
        rows = list(range(len(self)))[index] if isinstance(index, slice) else index
        return SampledBatch(
            prompts=[self.prompts[i] for i in rows],
            responses=[self.responses[i] for i in rows],
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            response_ids=self.response_ids[rows],
            response_mask=self.response_mask[rows],
            logprobs=self.logprobs[rows],
            pad_id=self.pad_id,
        )

    @staticmethod
    def concat(parts: list[SampledBatch], pad_id: int | None = None) -> SampledBatch:
        """Join slices from several rollout workers, re-padding to the longest prompt and response."""
        pad_id = parts[0].pad_id if pad_id is None else pad_id
        p_len = max(p.prompt_ids.shape[1] for p in parts)
        t_len = max(p.response_ids.shape[1] for p in parts)

        def left(t: Tensor, width: int, value: int) -> Tensor:
            return nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        def right(t: Tensor, width: int, value: float) -> Tensor:
            return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return SampledBatch(
            prompts=[x for p in parts for x in p.prompts],
            responses=[x for p in parts for x in p.responses],
            prompt_ids=torch.cat([left(p.prompt_ids, p_len, pad_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, p_len, 0) for p in parts]),
            response_ids=torch.cat([right(p.response_ids, t_len, pad_id) for p in parts]),
            response_mask=torch.cat([right(p.response_mask, t_len, 0) for p in parts]),
            logprobs=torch.cat([right(p.logprobs, t_len, 0.0) for p in parts]),
            pad_id=pad_id,
        )


def build_policy(cfg: PolicyConfig, *, trainable: bool) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The policy model (LoRA-wrapped when ``cfg.lora_rank`` is set) and its tokenizer."""
    tokenizer = load_tokenizer(cfg.model)
    model = load_policy(cfg.model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora_rank is not None:
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=cfg.lora_target_modules,
            init_lora_weights=True,
        )
        model = get_peft_model(model, lora)
    if not trainable:
        model.requires_grad_(False)
    return model, tokenizer


def policy_state(model: nn.Module) -> dict[str, Tensor]:
    """What moves to the rollout workers, where it lives: the LoRA adapter only, or every weight."""
    state = get_peft_model_state_dict(model) if hasattr(model, "peft_config") else model.state_dict()
    return {k: v.detach() for k, v in state.items()}


def policy_weights(model: nn.Module) -> dict[str, Tensor]:
    """``policy_state`` copied to the CPU, to travel through the object store."""
    return {k: v.cpu().clone() for k, v in policy_state(model).items()}


def load_policy_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    if hasattr(model, "peft_config"):
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"policy weights not in the model: {unexpected[:5]}")
        return
    model.load_state_dict(weights, strict=True)


def _positions(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(logits: Tensor, response_ids: Tensor, temperature: float) -> Tensor:
    """log π(token) [B, T] of each response token from the logits of the positions before it."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def response_entropy(logits: Tensor, temperature: float) -> Tensor:
    """Entropy [B, T] of the sampling distribution softmax(logits / temperature) at each position (no grad)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -logp.exp().mul_(logp).nan_to_num_(nan=0.0).sum(-1)  # p·log p, with 0·log 0 = 0


def forward_logprobs(
    model: nn.Module, batch: SampledBatch, temperature: float, *, hidden: bool = False, entropy: bool = False
) -> tuple[Tensor, ...]:
    """Per-token log-probs of the batch's responses and the last hidden states of those positions
    (``None`` unless ``hidden``); with ``entropy``, a third item: the policy's entropy [B, T] at each
    response token (0 on padding, computed without grad)."""
    input_ids, attention_mask = batch.sequences()
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(attention_mask),
        output_hidden_states=hidden,
        use_cache=False,
        logits_to_keep=t + 1,  # the vocabulary projection only where a response token is predicted
    )
    logits = out.logits[:, :-1]
    logp = response_logprobs(logits, batch.response_ids, temperature) * batch.response_mask
    states = out.hidden_states[-1][:, p - 1 : p - 1 + t] if hidden else None
    if entropy:
        return logp, states, response_entropy(logits, temperature) * batch.response_mask
    return logp, states


class ActorCritic(nn.Module):
    """The policy with a scalar value head on its last hidden state (one backbone for actor and critic)."""

    def __init__(self, policy: nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: SampledBatch, temperature: float, *, entropy: bool = False) -> tuple[Tensor, ...]:
        """(log-probs [B, T], values [B, T]) of the response tokens; values are V(state before the token).

        With ``entropy``, a third item: the policy's per-token entropy [B, T] (no grad, 0 on padding).
        """
        logp, states, *rest = forward_logprobs(self.policy, batch, temperature, hidden=True, entropy=entropy)
        values = self.value_head(states.float()).squeeze(-1) * batch.response_mask
        return (logp, values, *rest)


def context_length(model: PreTrainedModel | nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)

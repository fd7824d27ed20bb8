"""Refinement: each member regresses onto its own quantile targets (MSE), only its refinable parameters move."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from uprlhf.reward.ensembles import RewardEnsemble
from uprlhf.reward.losses import mse_refinement_loss
from uprlhf.reward.training import collate, encode_texts, on_device
from uprlhf.selection.influence import gradients_of


def refine_ensemble(
    ensemble: RewardEnsemble,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    targets: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
) -> list[float]:
    """Fine-tune in place on (prompt, response) → targets [N, K]; returns the mean loss of each epoch."""
    if targets.shape != (len(prompts), ensemble.k):
        raise ValueError(f"targets must be [{len(prompts)}, {ensemble.k}], got {tuple(targets.shape)}")
    params = [p for _, p in ensemble.refinable_parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    encoded = encode_texts(tokenizer, prompts, responses, max_length)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with gradients_of(ensemble, params):
        for _ in range(epochs):
            order = torch.randperm(len(encoded), generator=gen).tolist()
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                rewards = ensemble(**on_device(collate(tokenizer, [encoded[i] for i in idx]), params[0].device))
                loss = mse_refinement_loss(rewards, targets[idx].to(rewards))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            losses.append(total / max(1, len(order)))
    ensemble.eval()
    return losses

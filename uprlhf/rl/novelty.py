"""How far a run's samples are from the reward data, and whether that distance sees the run's hacks.

An ensemble's disagreement, randomized priors and a last-layer posterior all grow with distance
from the data the members were fitted on: they can only flag a hacked sample that is far from the
reward pairs. ``jobs.novelty`` measures whether it is. Each *novelty space* embeds a (prompt,
response); a sample's novelty is its Mahalanobis distance from the reward pairs' responses under
a Ledoit–Wolf shrunk covariance (so a space wider than the pairs are many still has a well-posed
distance). The run's samples then go through ``uncertainty_diagnostics`` with novelty in u's
place: if no space ranks the hacked samples above the rest, no uncertainty of that kind can.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from uprlhf.registry import Registry
from uprlhf.section import ModelConfig

# Embeds (prompts, responses) as rows of an [N, D] array.
Embed = Callable[[list[str], list[str]], np.ndarray]


@dataclass(frozen=True)
class NoveltySources:
    """What the spaces read: the runs' reward checkpoint and token budget, their policy's model."""

    reward_checkpoint: Path
    reward_max_length: int
    policy: ModelConfig
    batch_size: int = 64

    def reward_backbone(self) -> ModelConfig:
        """The ensemble's backbone as its manifest names it (no weights are loaded)."""
        from uprlhf.reward.ensembles import MANIFEST

        return ModelConfig(**json.loads((self.reward_checkpoint / MANIFEST).read_text())["backbone"])


# name → builder of the space's ``Embed``.
NOVELTY_SPACES: Registry[Callable[[NoveltySources], Embed]] = Registry("novelty space")

# Buckets of the hashed word n-grams (space ``token_ngrams``).
HASHED_FEATURES = 4096


def novelty_scorer(reference: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Fitted once on ``reference``'s rows [N, D]: each query row's Mahalanobis distance from them, under their
    Ledoit–Wolf covariance."""
    from sklearn.covariance import LedoitWolf

    if reference.ndim != 2 or reference.shape[0] < 2:
        raise ValueError(f"a covariance needs reference rows [N >= 2, D], got shape {reference.shape}")
    fitted = LedoitWolf().fit(reference)

    def novelty(queries: np.ndarray) -> np.ndarray:
        if queries.ndim != 2 or queries.shape[1] != reference.shape[1]:
            raise ValueError(f"queries must be [N, {reference.shape[1]}] as the reference, got shape {queries.shape}")
        return np.sqrt(np.maximum(fitted.mahalanobis(queries), 0.0))

    return novelty


def prompt_and_response(prompts: list[str], responses: list[str]) -> list[str]:
    """One text per sample, the prompt then the response, a space between (both are stored stripped)."""
    return [f"{p} {r}" for p, r in zip(prompts, responses, strict=True)]


def _batched(embed_batch: Callable[[list[str], list[str]], torch.Tensor], batch_size: int) -> Embed:
    @torch.inference_mode()
    def embed(prompts: list[str], responses: list[str]) -> np.ndarray:
        parts = [embed_batch(prompts[i : i + batch_size], responses[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return torch.cat(parts).double().cpu().numpy()

    return embed


def _pretrained(model: ModelConfig, batch_size: int) -> Embed:
    from uprlhf.models import load_backbone, load_tokenizer, pooled_text_features

    backbone, tokenizer = load_backbone(model).eval(), load_tokenizer(model)
    tokenizer.padding_side = "right"  # positions count from the text's first token, as in training
    max_length = min(tokenizer.model_max_length, getattr(backbone.config, "max_position_embeddings", 512))
    return _batched(lambda p, r: pooled_text_features(backbone, tokenizer, prompt_and_response(p, r), max_length), batch_size)


@NOVELTY_SPACES.register("reward_heads")
def _reward_heads(sources: NoveltySources) -> Embed:
    """What the trained ensemble's heads read (its fine-tuned backbone's output), on the text as it scores it."""
    from transformers import AutoTokenizer

    from uprlhf.reward.ensembles import RewardEnsemble
    from uprlhf.reward.training import TOKENIZER_DIR, collate, encode_texts

    ensemble = RewardEnsemble.load(sources.reward_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(sources.reward_checkpoint / TOKENIZER_DIR)

    def embed_batch(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return ensemble.head_inputs(**collate(tokenizer, encode_texts(tokenizer, prompts, responses, sources.reward_max_length)))

    return _batched(embed_batch, sources.batch_size)


@NOVELTY_SPACES.register("reward_backbone")
def _reward_backbone(sources: NoveltySources) -> Embed:
    """The ensemble's backbone as pretrained, before any reward training (``pooled_text_features``)."""
    return _pretrained(sources.reward_backbone(), sources.batch_size)


@NOVELTY_SPACES.register("policy_backbone")
def _policy_backbone(sources: NoveltySources) -> Embed:
    """The policy's own base model (``pooled_text_features``): the representation the drift happens in."""
    return _pretrained(sources.policy, sources.batch_size)


@NOVELTY_SPACES.register("token_ngrams")
def _token_ngrams(sources: NoveltySources) -> Embed:
    """Counts of the response's words, punctuation marks and their pairs, hashed into ``HASHED_FEATURES`` buckets
    and l2-normed: no model at all, so nothing learned can map a repetition or a word the pairs never had onto
    familiar text."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(
        token_pattern=r"(?u)\b\w+\b|[^\w\s]", ngram_range=(1, 2), n_features=HASHED_FEATURES, alternate_sign=False
    )
    return lambda prompts, responses: vectorizer.transform(responses).toarray()

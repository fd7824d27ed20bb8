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

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from uprlhf.registry import Registry

if TYPE_CHECKING:
    from uprlhf.rl.config import NoveltyConfig

# Embeds (prompts, responses) as rows of an [N, D] array.
Embed = Callable[[list[str], list[str]], np.ndarray]

# name → builder of the space's ``Embed`` from the job's config.
NOVELTY_SPACES: Registry[Callable[[NoveltyConfig], Embed]] = Registry("novelty space")

# Buckets of the hashed token n-grams (space ``token_ngrams``).
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


def _texts(prompts: list[str], responses: list[str]) -> list[str]:
    """The text the policy wrote the response into: the prompt continued by the response."""
    return [p + r for p, r in zip(prompts, responses, strict=True)]


def _batched(embed_batch: Callable[[list[str], list[str]], torch.Tensor], batch_size: int) -> Embed:
    @torch.inference_mode()
    def embed(prompts: list[str], responses: list[str]) -> np.ndarray:
        parts = [embed_batch(prompts[i : i + batch_size], responses[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return torch.cat(parts).double().cpu().numpy()

    return embed


def _pretrained(model_cfg, batch_size: int) -> Embed:
    from uprlhf.models import load_backbone, load_tokenizer, pooled_text_features

    backbone, tokenizer = load_backbone(model_cfg).eval(), load_tokenizer(model_cfg)
    tokenizer.padding_side = "right"
    max_length = min(tokenizer.model_max_length, getattr(backbone.config, "max_position_embeddings", 512))
    return _batched(lambda p, r: pooled_text_features(backbone, tokenizer, _texts(p, r), max_length), batch_size)


@NOVELTY_SPACES.register("reward_heads")
def _reward_heads(cfg: NoveltyConfig) -> Embed:
    """What the trained ensemble's heads read (its fine-tuned backbone's output), on the text as it scores it."""
    from transformers import AutoTokenizer

    from uprlhf.reward.ensembles import RewardEnsemble
    from uprlhf.reward.training import TOKENIZER_DIR, collate, encode_texts

    ensemble = RewardEnsemble.load(cfg.reward_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(f"{cfg.reward_checkpoint}/{TOKENIZER_DIR}")

    def embed_batch(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return ensemble.head_inputs(**collate(tokenizer, encode_texts(tokenizer, prompts, responses, cfg.reward_max_length)))

    return _batched(embed_batch, cfg.batch_size)


@NOVELTY_SPACES.register("reward_backbone")
def _reward_backbone(cfg: NoveltyConfig) -> Embed:
    """The ensemble's backbone as pretrained, before any reward training (``pooled_text_features``)."""
    from uprlhf.reward.ensembles import RewardEnsemble

    return _pretrained(RewardEnsemble.load(cfg.reward_checkpoint).backbone_cfg, cfg.batch_size)


@NOVELTY_SPACES.register("policy_backbone")
def _policy_backbone(cfg: NoveltyConfig) -> Embed:
    """The policy's own base model (``pooled_text_features``): the representation the drift happens in."""
    return _pretrained(cfg.policy, cfg.batch_size)


@NOVELTY_SPACES.register("token_ngrams")
def _token_ngrams(cfg: NoveltyConfig) -> Embed:
    """Counts of the response's words and word pairs, hashed into ``HASHED_FEATURES`` buckets and l2-normed: no
    model at all, so nothing learned can hide a repetition or a word the pairs never had."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(ngram_range=(1, 2), n_features=HASHED_FEATURES, alternate_sign=False)
    return lambda prompts, responses: vectorizer.transform(responses).toarray()

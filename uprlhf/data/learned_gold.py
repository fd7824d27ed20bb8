"""A learned gold: a sentiment probe on a larger frozen model, fitted to the reviews' human ratings.

Issue 14's lever "the task itself": with a rule-based gold (VADER) the proxies' errors are a
rule no member can see; with a gold that is itself a learned model, larger than the proxies
and trained on other data (the synthetic-gold setup of Gao et al. 2023 and Coste et al. 2024),
the proxies' errors become extrapolation errors away from their own training pairs. Two
ties remain and are said plainly: the backbone is SmolLM2-135M-Instruct, the policy's own
starting weights, and the task's prompts are openings of the same rated sentences (the
gold judges the continuation, never the opening).

The probe: the frozen backbone's hidden states at three depths (half, three quarters, last
layer), each mean-pooled over the text's tokens and concatenated, standardised with the
training sentences' mean and std, then a ridge regression onto the sentence's mean human
rating (−4 … 4), its penalty chosen by leave-one-out (``sklearn.linear_model.RidgeCV``). It
is fitted once on the 10,605 rated movie-review sentences, minus a held-out fifth that
measures it, and cached under ``$UPRLHF_CACHE/gold/learned-r<revision>``: the probe as
safetensors, its figures in ``manifest.json``. The backbone is read from where it always is
(the packaged SmolLM2-135M) and never copied.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from uprlhf.data import sentiment
from uprlhf.data.gold import LEARNED_GOLD_REVISION
from uprlhf.models import cache_dir, load_backbone, load_tokenizer
from uprlhf.section import ModelConfig

BACKBONE = "packaged:smollm2"
MAX_LENGTH = 64  # tokens; the rated sentences are shorter, responses are 24 new tokens
BATCH_SIZE = 32
HELD_OUT_FRACTION = 0.2
RIDGE_ALPHAS = tuple(10.0 ** (e / 2) for e in range(0, 11))  # 1 … 1e5
RATING_SCALE = 4.0  # ratings run −4 … 4; sentiment = clip(prediction / 4, −1, 1)
SPLIT_SEED = 0
PROBE_FILE = "probe.safetensors"
MANIFEST_FILE = "manifest.json"


def probe_layers(num_layers: int) -> tuple[int, int, int]:
    """The hidden-state indices the probe reads: half-way, three quarters, and the last layer."""
    return num_layers // 2, (3 * num_layers) // 4, num_layers


class FrozenFeatures:
    """Mean-pooled hidden states of a frozen backbone at ``probe_layers``, batched by length."""

    def __init__(self, backbone: ModelConfig) -> None:
        self.model = load_backbone(backbone).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(backbone)
        self.tokenizer.padding_side = "right"  # a text's positions start at 0 whatever its batch (decoders too)
        self.layers = probe_layers(self.model.config.num_hidden_layers)

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), 3·hidden] float32 features, in the order of ``texts``."""
        if not texts:
            return torch.zeros(0, 3 * self.model.config.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # like lengths share a batch: less padding
        features = torch.empty(len(texts), 3 * self.model.config.hidden_size)
        for start in range(0, len(order), BATCH_SIZE):
            chunk = order[start:start + BATCH_SIZE]
            # An empty text still needs a token to pool over: it reads as the tokenizer's own padding.
            encoded = self.tokenizer(
                [texts[i] or self.tokenizer.pad_token for i in chunk],
                return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH,
            )
            hidden = self.model(**encoded, output_hidden_states=True).hidden_states
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = [(hidden[layer] * mask).sum(1) / mask.sum(1) for layer in self.layers]
            features[chunk] = torch.cat(pooled, dim=-1).float()
        return features


def held_out_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of ``n`` rated sentences: a fixed random fifth is held out."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_held = max(1, round(n * HELD_OUT_FRACTION))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def fit_probe(features: torch.Tensor, ratings: Sequence[float]) -> tuple[dict[str, torch.Tensor], dict]:
    """The ridge probe's tensors and its figures (penalty, held-out Pearson r, sizes)."""
    from sklearn.linear_model import RidgeCV

    x = features.double().numpy()
    y = np.asarray(ratings, dtype=np.float64)
    train, held = held_out_split(len(y))
    mean = x[train].mean(0)
    std = x[train].std(0) + 1e-6
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit((x[train] - mean) / std, y[train])
    predicted = ridge.predict((x[held] - mean) / std)
    tensors = {
        "feature_mean": torch.from_numpy(mean).float(),
        "feature_std": torch.from_numpy(std).float(),
        "coef": torch.from_numpy(np.asarray(ridge.coef_)).float(),
        "intercept": torch.tensor([float(ridge.intercept_)]),
    }
    figures = {
        "ridge_alpha": float(ridge.alpha_),
        "held_out_pearson": pearson(predicted, y[held]),
        "n_train": int(train.size),
        "n_held_out": int(held.size),
    }
    return tensors, figures


def pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson's r; None when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def learned_gold_dir() -> Path:
    """Where the fitted probe is cached."""
    return cache_dir() / "gold" / f"learned-r{LEARNED_GOLD_REVISION}"


def build_probe(rated: Sequence[tuple[str, float]], backbone: ModelConfig, target: Path) -> Path:
    """Fit the probe on ``rated`` (sentence, rating) pairs and write it to ``target`` in one rename.

    A folder that is already there is kept as it is: two processes that build at once each
    fit the same probe, and the second rename loses harmlessly.
    """
    if (target / MANIFEST_FILE).is_file():
        return target
    if len(rated) < 10:
        raise ValueError(f"the learned gold needs at least 10 rated sentences, got {len(rated)}")
    texts = [text for text, _ in rated]
    ratings = [rating for _, rating in rated]
    started = time.perf_counter()
    print(f"[learned gold] fitting the probe on {len(texts)} rated sentences once; cached at {target}", flush=True)
    extract = FrozenFeatures(backbone)
    tensors, figures = fit_probe(extract(texts), ratings)
    r = figures["held_out_pearson"]
    print(f"[learned gold] held-out Pearson r {'n/a' if r is None else f'{r:.3f}'} "
          f"({time.perf_counter() - started:.0f}s)", flush=True)
    figures.update(revision=LEARNED_GOLD_REVISION, backbone=backbone.model_dump(), layers=list(extract.layers),
                   rating_scale=RATING_SCALE, max_length=MAX_LENGTH)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        save_file(tensors, str(staging / PROBE_FILE))
        (staging / MANIFEST_FILE).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        staging.rename(target)
    except OSError:
        if not (target / MANIFEST_FILE).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cached_probe() -> Path:
    """The default probe's folder, fitted first if this machine has none (reads the reviews only then)."""
    target = learned_gold_dir()
    if not (target / MANIFEST_FILE).is_file():
        rated = sentiment.load_rated_snippets(sentiment.reviews_dir() / sentiment.MOVIE_REVIEWS_FILE)
        build_probe(rated, ModelConfig(name_or_path=BACKBONE), target)
    return target


class LearnedSentiment:
    """The fitted probe over its frozen backbone: texts → sentiment in [−1, 1]."""

    def __init__(self, folder: Path) -> None:
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no learned gold at {folder} ({MANIFEST_FILE} missing)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("revision") != LEARNED_GOLD_REVISION:
            raise ValueError(f"{manifest_path}: revision {self.manifest.get('revision')!r}, this code reads "
                             f"{LEARNED_GOLD_REVISION}; delete the folder to refit")
        self.features = FrozenFeatures(ModelConfig(**self.manifest["backbone"]))
        probe = load_file(str(folder / PROBE_FILE))
        self.mean, self.std = probe["feature_mean"], probe["feature_std"]
        self.coef, self.intercept = probe["coef"], probe["intercept"]
        if self.coef.numel() != 3 * self.features.model.config.hidden_size:
            raise ValueError(f"{folder / PROBE_FILE}: {self.coef.numel()} weights for a backbone with "
                             f"{3 * self.features.model.config.hidden_size} features")

    def ratings(self, texts: Sequence[str]) -> torch.Tensor:
        """The probe's predicted human rating of each text (the ratings' −4 … 4 scale, unclipped)."""
        return ((self.features(texts) - self.mean) / self.std) @ self.coef + self.intercept

    def __call__(self, texts: Sequence[str]) -> list[float]:
        """Sentiment in [−1, 1]: the predicted rating over ``RATING_SCALE``, clipped; a blank text has none (0)."""
        worded = [i for i, text in enumerate(texts) if text.strip()]
        sentiments = [0.0] * len(texts)
        scaled = (self.ratings([texts[i] for i in worded]) / RATING_SCALE).clamp(-1.0, 1.0).tolist() if worded else []
        for i, value in zip(worded, scaled):
            sentiments[i] = value
        return sentiments

import json

import numpy as np
import pytest
import torch

from uprlhf.data import learned_gold
from uprlhf.data.gold import GOLD_SCORERS, LearnedGold, degeneracy_penalty
from uprlhf.data.learned_gold import (
    LEARNED_GOLD_REVISION,
    MANIFEST_FILE,
    PROBE_FILE,
    FrozenFeatures,
    LearnedSentiment,
    build_probe,
    fit_probe,
    held_out_split,
    probe_layers,
)
from uprlhf.data.sentiment import load_rated_snippets
from uprlhf.section import ModelConfig

GOOD, BAD = ("superb", "moving", "beautiful", "great"), ("dreadful", "boring", "stupid", "dull")
FILLER = ("the", "film", "story", "acting", "was", "and", "plot", "cast")


def rated_sentences(n: int, seed: int = 0) -> list[tuple[str, float]]:
    """Sentences of filler, good and bad words; the rating is good minus bad words (a learnable rule)."""
    rng = np.random.default_rng(seed)
    rated = []
    for _ in range(n):
        words = list(rng.choice(FILLER, size=4))
        good, bad = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        words += list(rng.choice(GOOD, size=good)) + list(rng.choice(BAD, size=bad))
        rng.shuffle(words)
        rated.append((" ".join(words), float(good - bad)))
    return rated


@pytest.fixture(scope="module")
def probe_dir(tiny_reward_backbone, tmp_path_factory):
    return build_probe(rated_sentences(120), ModelConfig(name_or_path=str(tiny_reward_backbone)),
                       tmp_path_factory.mktemp("gold") / "learned")


def test_learned_gold_is_a_registered_gold_scorer():
    assert GOLD_SCORERS.get("learned") is LearnedGold


def test_probe_reads_half_three_quarters_and_last_layer():
    assert probe_layers(30) == (15, 22, 30)
    assert probe_layers(2) == (1, 1, 2)


def test_held_out_split_is_a_fixed_disjoint_fifth():
    train, held = held_out_split(100)
    assert len(held) == 20 and len(train) == 80
    assert sorted([*train, *held]) == list(range(100))
    assert (held_out_split(100)[1] == held).all()


def test_ridge_probe_recovers_a_linear_rating_and_measures_it_on_held_out_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12))
    y = x @ rng.normal(size=12) + 0.1 * rng.normal(size=500)
    tensors, figures = fit_probe(torch.from_numpy(x).float(), y.tolist())
    assert figures["held_out_pearson"] > 0.99
    assert figures["n_train"] == 400 and figures["n_held_out"] == 100
    assert figures["ridge_alpha"] in learned_gold.RIDGE_ALPHAS
    predicted = ((torch.from_numpy(x).float() - tensors["feature_mean"]) / tensors["feature_std"]) @ tensors["coef"] \
        + tensors["intercept"]
    assert np.corrcoef(predicted.numpy(), y)[0, 1] > 0.99


@pytest.mark.parametrize("backbone", ["tiny_reward_backbone", "tiny_policy"])  # an encoder and a decoder
def test_features_of_a_text_do_not_depend_on_its_batch(backbone, request):
    features = FrozenFeatures(ModelConfig(name_or_path=str(request.getfixturevalue(backbone))))
    texts = ["the film was great", "a much longer sentence about the acting and the plot of the film", ""]
    batched = features(texts)
    assert batched.shape == (3, 3 * features.model.config.hidden_size)
    for i, text in enumerate(texts):
        assert torch.allclose(features([text])[0], batched[i], atol=1e-5)


def test_build_writes_probe_and_manifest_and_keeps_an_existing_fit(probe_dir, tiny_reward_backbone):
    manifest = json.loads((probe_dir / MANIFEST_FILE).read_text())
    assert manifest["revision"] == LEARNED_GOLD_REVISION
    assert manifest["n_train"] + manifest["n_held_out"] == 120
    assert manifest["backbone"] == ModelConfig(name_or_path=str(tiny_reward_backbone)).model_dump()
    stamp = (probe_dir / PROBE_FILE).stat().st_mtime_ns
    assert build_probe(rated_sentences(50, seed=1), ModelConfig(name_or_path=str(tiny_reward_backbone)), probe_dir) == probe_dir
    assert (probe_dir / PROBE_FILE).stat().st_mtime_ns == stamp
    assert [p.name for p in probe_dir.parent.iterdir()] == [probe_dir.name]  # no staging folder left behind


def test_too_few_sentences_write_nothing(tiny_reward_backbone, tmp_path):
    with pytest.raises(ValueError, match="at least 10 rated sentences"):
        build_probe(rated_sentences(5), ModelConfig(name_or_path=str(tiny_reward_backbone)), tmp_path / "learned")
    assert list(tmp_path.iterdir()) == []


def test_sentiment_is_the_clipped_rating_and_gold_subtracts_the_degeneracy_penalty(probe_dir):
    sentiment = LearnedSentiment(probe_dir)
    texts = ["the acting was superb and moving", "the plot was dull dull dull", "boring"]
    ratings = sentiment.ratings(texts)
    features = sentiment.features(texts)
    by_hand = ((features - sentiment.mean) / sentiment.std) @ sentiment.coef + sentiment.intercept
    assert torch.allclose(ratings, by_hand, atol=1e-5)
    assert sentiment(texts) == pytest.approx((by_hand / 4).clamp(-1, 1).tolist(), abs=1e-6)
    gold = LearnedGold(str(probe_dir))
    assert gold.score(["Prompt"] * 3, texts) == pytest.approx(
        [s - degeneracy_penalty(t) for s, t in zip(sentiment(texts), texts)], abs=1e-6)
    assert gold.sentiment(texts[0]) == pytest.approx(sentiment(texts)[0], abs=1e-6)


def test_probe_of_another_revision_is_refused(probe_dir, tmp_path):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / PROBE_FILE).write_bytes((probe_dir / PROBE_FILE).read_bytes())
    manifest = json.loads((probe_dir / MANIFEST_FILE).read_text())
    (stale / MANIFEST_FILE).write_text(json.dumps({**manifest, "revision": LEARNED_GOLD_REVISION + 1}))
    with pytest.raises(ValueError, match="delete the folder to refit"):
        LearnedSentiment(stale)
    with pytest.raises(FileNotFoundError, match="missing"):
        LearnedSentiment(tmp_path / "nowhere")


def test_rated_snippets_keep_each_sentence_rating(tmp_path):
    path = tmp_path / "rated.txt"
    path.write_text("1\t2.5\tA fine &amp; ''moving'' film\n\n2\t-1.25\tDull\n")
    assert load_rated_snippets(path) == [('A fine & "moving" film', 2.5), ("Dull", -1.25)]


def test_the_default_probe_is_fitted_once_and_then_read_without_the_reviews(probe_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(learned_gold, "learned_gold_dir", lambda: tmp_path / "cache" / "learned")
    fitted = []
    monkeypatch.setattr(learned_gold, "build_probe", lambda rated, backbone, target: fitted.append(len(rated)))
    monkeypatch.setenv("UPRLHF_CACHE", str(tmp_path / "no-reviews"))
    with pytest.raises(FileNotFoundError, match="make setup"):
        learned_gold.cached_probe()  # nothing cached: it needs the reviews to fit
    assert fitted == []
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "learned").symlink_to(probe_dir)
    assert learned_gold.cached_probe() == tmp_path / "cache" / "learned"  # cached: the reviews are not read
    assert fitted == []


def test_the_probe_learns_the_rating_rule_of_unseen_sentences(probe_dir):
    """The synthetic rating (good minus bad words) ranks sentences the probe never saw."""
    from scipy.stats import spearmanr

    unseen = rated_sentences(200, seed=7)
    predicted = LearnedSentiment(probe_dir).ratings([text for text, _ in unseen])
    assert spearmanr(predicted.numpy(), [rating for _, rating in unseen])[0] > 0.5


def test_a_blank_response_has_no_sentiment_and_scores_minus_one(probe_dir):
    gold = LearnedGold(str(probe_dir))
    assert gold.sentiments(["", "  ", "the acting was superb"])[:2] == [0.0, 0.0]
    assert gold.score(["Prompt", "Prompt"], ["", "the acting was superb and moving"])[0] == -1.0

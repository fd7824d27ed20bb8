"""Novelty: distance from the reward data under a shrunk covariance, and the spaces it is measured in."""

import numpy as np
import pytest

from uprlhf.rl.novelty import HASHED_FEATURES, NOVELTY_SPACES, novelty_scorer


def test_novelty_is_the_distance_in_units_of_the_reference_spread():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, [1.0, 2.0, 0.5], size=(5000, 3))
    novelty = novelty_scorer(reference)(np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 1.5]]))
    assert novelty[0] == pytest.approx(0.0, abs=0.1)
    # three reference standard deviations along each axis, whatever the axis's own scale
    assert novelty[1:] == pytest.approx([3.0, 3.0, 3.0], rel=0.1)


def test_novelty_refuses_rows_of_another_width():
    with pytest.raises(ValueError, match=r"queries must be \[N, 3\] as the reference, got shape \(2, 2\)"):
        novelty_scorer(np.random.default_rng(0).normal(size=(4, 3)))(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"reference rows \[N >= 2, D\], got shape \(1, 3\)"):
        novelty_scorer(np.zeros((1, 3)))


def test_token_ngrams_counts_the_responses_words_and_word_pairs():
    embed = NOVELTY_SPACES.get("token_ngrams")(None)
    rows = embed(["ignored prompt", "another"], ["great film", "great great great"])
    assert rows.shape == (2, HASHED_FEATURES)
    # "great", "film", "great film": three buckets of 1/√3; "great" ×3 and "great great" ×2: (3, 2)/√13
    assert sorted(rows[0][rows[0] > 0]) == pytest.approx([3 ** -0.5] * 3)
    assert sorted(rows[1][rows[1] > 0]) == pytest.approx([2 / 13 ** 0.5, 3 / 13 ** 0.5])


def test_a_repeated_word_the_pairs_never_repeat_is_novel_in_token_space():
    embed = NOVELTY_SPACES.get("token_ngrams")(None)
    words = ["great", "lovely", "dull", "boring", "fun", "awful", "plot", "acting", "film", "scene"]
    rng = np.random.default_rng(1)
    reference = embed([""] * 400, [" ".join(rng.choice(words, 4, replace=False)) for _ in range(400)])
    novelty = novelty_scorer(reference)(embed(["", ""], ["great plot dull film", "great great great great"]))
    assert novelty[1] > 2 * novelty[0]


def test_token_ngrams_see_punctuation_and_one_letter_words():
    embed = NOVELTY_SPACES.get("token_ngrams")(None)
    rows = embed(["", ""], ["!!!! :)", "a a a"])
    # "!", ":", ")", "! !", "! :", ": )"; "a", "a a"
    assert (rows > 0).sum(1).tolist() == [6, 2]

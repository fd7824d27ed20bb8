import math

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from uprlhf.data.gold import (
    GOLD_SCORERS,
    bucket_by_quantiles,
    degeneracy_penalty,
    get_gold_scorer,
    is_word_shaped,
)

POSITIVE = "The acting is superb and the story is moving and beautiful."
NEGATIVE = "The acting is dreadful and the story is boring and stupid."
HONEST = "The film is a great ride from start to finish."
REPEATED = "great great great great great great great great"
GIBBERISH = "5j*%bb *q ~5w6* o36*& #x1h^#fo v&im~v*q u5 rhx43qsv"


# The lexicon golds; the learned gold fits a probe on a 135M model first (tests/test_learned_gold.py).
LEXICON_GOLDS = ("textblob", "vader")


@pytest.fixture(scope="module", params=LEXICON_GOLDS)
def scorer(request):
    return get_gold_scorer(request.param)


def score_one(scorer, response: str) -> float:
    return scorer.score(["This movie"], [response])[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the film is good", 0.0),
        ("good good good", 1.0),  # bigrams 1 distinct of 2 (0.5) + 2 · words 1 distinct of 3 (4/3), clipped
        ("Good, good. GOOD!", 1.0),  # case and punctuation are folded
        ("the cat and the cat", 1.0),  # bigrams 3 distinct of 4 (0.25) + 2 · content words 1 of 2 (1.0)
        ("the review was great and the film was great too", 1 / 9 + 2 * 0.25),  # 8 of 9 bigrams; 3 of 4 content words
        ("good film xqzvb", 1 / 3),  # xqzvb: 5 letters, no vowel
        ("a good film !!!!", 0.25),  # long punctuation-only token is junk
        ("a good film -- truly", 0.0),  # short punctuation-only token is dropped
        ("zzzz zzzz zzzz zzzz", 1.0),  # repetition 2/3 + junk 1, clipped to 1
        ("great film", 1.0),  # fewer than 3 tokens
        ("", 1.0),
        ("   ", 1.0),
    ],
)
def test_degeneracy_penalty_matches_hand_computed_values(text, expected):
    assert degeneracy_penalty(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "token",
    ["don't", "well-made", "and/or", "u.s", "1990s", "21st", "10,000", "9:30", "café", "tv", "a"],
)
def test_word_shaped_tokens(token):
    assert is_word_shaped(token)


@pytest.mark.parametrize(
    "token", ["xqzt", "zzz", "x7#qz", "", "sdfghjk", "4ever", "abcdefghijabcdefghijab", "a--"]
)
def test_gibberish_tokens_are_not_word_shaped(token):
    assert not is_word_shaped(token)


def test_gibberish_gets_a_large_penalty():
    assert degeneracy_penalty(GIBBERISH) >= 0.8


def test_positive_text_scores_above_negative_text(scorer):
    assert score_one(scorer, POSITIVE) > 0.5
    assert score_one(scorer, NEGATIVE) < -0.5


def test_repeated_word_scores_below_its_sentence(scorer):
    assert score_one(scorer, REPEATED) < score_one(scorer, HONEST) - 0.3


def test_gibberish_scores_below_honest_text(scorer):
    assert score_one(scorer, GIBBERISH) < score_one(scorer, HONEST) - 1.0


def test_empty_response_scores_minus_one(scorer):
    assert scorer.score(["a", "b"], ["", "  "]) == [-1.0, -1.0]


def test_score_rejects_mismatched_lengths(scorer):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(["a", "b"], ["c"])


def test_scorer_names_match_registry(scorer):
    assert GOLD_SCORERS[scorer.name] is type(scorer)


def test_vader_gold_is_compound_minus_penalty():
    response = "the film is good good good"
    compound = SentimentIntensityAnalyzer().polarity_scores(response)["compound"]
    gold = score_one(get_gold_scorer("vader"), response)
    assert gold == pytest.approx(compound - 1.0)  # 1/5 (bigrams) + 2 · 2/4 (content words), clipped to 1


def test_registry_has_the_lexicon_golds_and_the_learned_one():
    assert sorted(GOLD_SCORERS) == ["learned", *LEXICON_GOLDS]


def test_unknown_scorer_error_names_allowed_scorers():
    allowed = "unknown gold scorer 'human'; allowed: 'vader', 'textblob', 'learned'"
    with pytest.raises(ValueError, match=allowed):
        get_gold_scorer("human")


def test_bucket_by_quantiles_spreads_distinct_scores_evenly():
    assert bucket_by_quantiles([float(i) for i in range(10)]) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_bucket_by_quantiles_keeps_input_order():
    assert bucket_by_quantiles([9.0, 0.0, 4.5, 2.0, 7.0], n_levels=5) == [5, 1, 3, 2, 4]


def test_bucket_by_quantiles_gives_ties_one_level():
    scores = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert bucket_by_quantiles(scores) == [1, 1, 3, 3, 3, 3, 4, 4, 5, 5]


def test_bucket_by_quantiles_puts_identical_scores_in_the_middle():
    assert bucket_by_quantiles([0.3] * 4) == [3, 3, 3, 3]


def test_bucket_by_quantiles_with_two_levels():
    assert bucket_by_quantiles([1.0, 2.0, 3.0, 4.0], n_levels=2) == [1, 1, 2, 2]


def test_bucket_by_quantiles_of_nothing_is_empty():
    assert bucket_by_quantiles([]) == []


def test_bucket_by_quantiles_rejects_bad_input():
    with pytest.raises(ValueError, match="n_levels"):
        bucket_by_quantiles([1.0], n_levels=0)
    with pytest.raises(ValueError, match="finite"):
        bucket_by_quantiles([1.0, math.nan])


def test_word_shape_ignores_case():
    assert is_word_shaped("Hello") and is_word_shaped("DVD")
    assert not is_word_shaped("XQZT")

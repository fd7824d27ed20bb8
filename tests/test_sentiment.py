import math
import random

import pytest

from uprlhf.data.sentiment import (
    CHAT_INSTRUCTION,
    MOVIE_REVIEWS_FILE,
    OOD_KINDS,
    POSITIVE_WORDS,
    bradley_terry_preference,
    chat_prompt,
    load_snippets,
    make_prompts,
    ood_responses,
    reviews_dir,
    split_prompts,
)

FIXTURE_LINES = [
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.",
    "2\t-0.6\tEffective but too tepid biopic",
    "3\t1.5\tLovely &amp; Amazing involves us because it is so incisive.",
    "4\t3.1\tMünch's genuine insight makes the film's overindulgence forgivable.",
]
SENTENCES = [
    "one two three four five six seven eight nine ten",
    "alpha beta gamma delta epsilon zeta eta theta",
    "red orange yellow green blue indigo violet",
    "north south east west up down",
    "a b c d e",
    "too short here",
    "tiny",
]


def write_snippets(path, lines, newline="\r\n"):
    path.write_bytes(newline.join(lines).encode("utf-8"))
    return path


def test_load_snippets_reads_crlf_file_and_restores_quotes_and_entities(tmp_path):
    path = write_snippets(tmp_path / "reviews.txt", FIXTURE_LINES)
    assert load_snippets(path) == [
        'The Rock is destined to be the 21st Century\'s new "Conan".',
        "Effective but too tepid biopic",
        "Lovely & Amazing involves us because it is so incisive.",
        "Münch's genuine insight makes the film's overindulgence forgivable.",
    ]


def test_load_snippets_skips_blank_lines(tmp_path):
    lines = [FIXTURE_LINES[0], "", FIXTURE_LINES[1], ""]
    path = write_snippets(tmp_path / "reviews.txt", lines, "\n")
    assert len(load_snippets(path)) == 2


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("5\t1.0", "expected 3 tab-separated fields"),
        ("5\t1.0\tone\textra", "expected 3 tab-separated fields"),
        ("5\tgood\tA sentence.", "rating 'good' is not a number"),
        ("5\tnan\tA sentence.", "rating 'nan' is not finite"),
        ("\t1.0\tA sentence.", "empty id"),
        ("5\t1.0\t  ", "empty sentence"),
    ],
)
def test_load_snippets_reports_file_and_line_of_malformed_line(tmp_path, bad_line, problem):
    path = write_snippets(tmp_path / "reviews.txt", [FIXTURE_LINES[0], FIXTURE_LINES[1], bad_line])
    with pytest.raises(ValueError, match=rf"reviews\.txt:3: {problem}"):
        load_snippets(path)


def test_load_snippets_reports_invalid_utf8_line(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_bytes(b"1\t1.0\tfine\r\n2\t1.0\tbad \xff byte\r\n")
    with pytest.raises(ValueError, match=r"reviews\.txt:2: not valid UTF-8"):
        load_snippets(path)


def test_load_snippets_rejects_empty_file(tmp_path):
    path = write_snippets(tmp_path / "reviews.txt", [])
    with pytest.raises(ValueError, match="no snippets"):
        load_snippets(path)


def test_reviews_dir_asks_for_make_setup_when_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("UPRLHF_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make setup"):
        reviews_dir()


def test_reviews_dir_finds_extracted_data_under_cache(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "hutto_ICWSM_2014"
    folder.mkdir(parents=True)
    write_snippets(folder / MOVIE_REVIEWS_FILE, FIXTURE_LINES)
    monkeypatch.setenv("UPRLHF_CACHE", str(tmp_path))
    assert reviews_dir() == folder


def test_make_prompts_is_deterministic_in_seed():
    assert make_prompts(SENTENCES, 4, seed=3) == make_prompts(SENTENCES, 4, seed=3)
    by_seed = {tuple(make_prompts(SENTENCES, 5, seed=s)) for s in range(10)}
    assert len(by_seed) > 1


def test_make_prompts_cuts_openings_within_word_bounds():
    for seed in range(20):
        prompts = make_prompts(SENTENCES, 5, min_words=4, max_words=8, seed=seed)
        assert len(prompts) == len(set(prompts)) == 5
        sources = []
        for prompt in prompts:
            assert 4 <= len(prompt.split()) <= 8
            (source,) = [s for s in SENTENCES if s.startswith(prompt)]
            sources.append(source)
        assert len(set(sources)) == 5
        # "a b c d e" has 5 words: its opening is at most the whole sentence
        assert all(len(p.split()) <= 5 for p in prompts if p.startswith("a b"))


def test_make_prompts_uses_exact_length_when_bounds_meet():
    prompts = make_prompts(SENTENCES, 3, min_words=6, max_words=6, seed=1)
    assert all(len(p.split()) == 6 for p in prompts)


def test_make_prompts_skips_sentences_shorter_than_min_words():
    for seed in range(20):
        prompts = make_prompts(SENTENCES, 5, min_words=4, seed=seed)
        assert not any(p.startswith(("too short", "tiny")) for p in prompts)


def test_make_prompts_errors_when_too_few_usable_sentences():
    with pytest.raises(ValueError, match="asked for 6 prompts but only 5 distinct sentences"):
        make_prompts(SENTENCES, 6, min_words=4)


def test_make_prompts_errors_when_openings_collide():
    sentences = ["the same start one", "the same start two"]
    with pytest.raises(ValueError, match="only 1 distinct openings"):
        make_prompts(sentences, 2, min_words=3, max_words=3)


def test_make_prompts_rejects_bad_word_bounds():
    with pytest.raises(ValueError, match="min_words <= max_words"):
        make_prompts(SENTENCES, 1, min_words=5, max_words=4)


def test_chat_prompt_gives_instruction_then_opening():
    prompt = chat_prompt("A masterful film from")
    assert prompt == f"{CHAT_INSTRUCTION}\n\nA masterful film from"
    assert "positive" in prompt
    with pytest.raises(ValueError, match="blank"):
        chat_prompt("  ")


ON_TASK = ["a fine and moving film", "the cast is superb", "I loved every minute"]
OFF_TASK = ["The city council voted on the budget.", "Rates rose by a quarter point."]


def test_ood_responses_count_and_determinism():
    responses = ood_responses(ON_TASK, OFF_TASK, 10, seed=7)
    assert len(responses) == 10
    assert responses == ood_responses(ON_TASK, OFF_TASK, 10, seed=7)
    assert responses != ood_responses(ON_TASK, OFF_TASK, 10, seed=8)


def test_ood_responses_cycle_through_all_four_kinds():
    vocabulary = {w for text in ON_TASK for w in text.split()}
    responses = ood_responses(ON_TASK, OFF_TASK, 8, seed=0)
    for i, response in enumerate(responses):
        words = response.split()
        kind = OOD_KINDS[i % 4]
        if kind == "repetition":
            assert len(words) >= 8 and len(set(words)) == 1 and words[0] in POSITIVE_WORDS
        elif kind == "word_salad":
            assert len(words) >= 8 and set(words) <= vocabulary and len(set(words)) > 1
        elif kind == "gibberish":
            assert len(words) >= 6 and not set(response) <= set("abcdefghijklmnopqrstuvwxyz ")
        else:
            assert response in OFF_TASK


def test_ood_responses_need_both_sources():
    with pytest.raises(ValueError, match="on_task"):
        ood_responses([" "], OFF_TASK, 4)
    with pytest.raises(ValueError, match="off_task"):
        ood_responses(ON_TASK, [], 4)


def preference_rate(gold_a, gold_b, *, temperature, label_noise, seed, draws=5000):
    rng = random.Random(seed)
    wins = sum(
        bradley_terry_preference(
            gold_a, gold_b, temperature=temperature, label_noise=label_noise, rng=rng
        )
        for _ in range(draws)
    )
    return wins / draws


def test_bradley_terry_without_noise_picks_much_better_response():
    assert preference_rate(1.0, -1.0, temperature=0.05, label_noise=0.0, seed=0) == 1.0
    assert preference_rate(-1.0, 1.0, temperature=0.05, label_noise=0.0, seed=0) == 0.0


def test_bradley_terry_label_noise_flips_that_fraction():
    flipped = 1 - preference_rate(1.0, 0.0, temperature=1e-6, label_noise=0.2, seed=1)
    assert flipped == pytest.approx(0.2, abs=0.03)


def test_bradley_terry_follows_sigmoid_of_gold_gap():
    gap = math.log(3)  # sigmoid(ln 3) = 0.75
    rate = preference_rate(gap, 0.0, temperature=1.0, label_noise=0.0, seed=2)
    assert rate == pytest.approx(0.75, abs=0.03)
    tie_rate = preference_rate(0.4, 0.4, temperature=0.1, label_noise=0.0, seed=2)
    assert tie_rate == pytest.approx(0.5, abs=0.03)


def test_bradley_terry_handles_huge_gaps_without_overflow():
    rng = random.Random(3)
    assert bradley_terry_preference(1e9, -1e9, temperature=1e-9, label_noise=0.0, rng=rng)
    assert not bradley_terry_preference(-1e9, 1e9, temperature=1e-9, label_noise=0.0, rng=rng)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"temperature": 0.0, "label_noise": 0.1}, "temperature"),
        ({"temperature": -1.0, "label_noise": 0.1}, "temperature"),
        ({"temperature": math.nan, "label_noise": 0.1}, "temperature"),
        ({"temperature": math.inf, "label_noise": 0.1}, "temperature"),
        ({"temperature": 1.0, "label_noise": -0.1}, "label_noise"),
        ({"temperature": 1.0, "label_noise": 0.6}, "label_noise"),
        ({"temperature": 1.0, "label_noise": math.nan}, "label_noise"),
    ],
)
def test_bradley_terry_rejects_bad_arguments(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        bradley_terry_preference(1.0, 0.0, rng=random.Random(0), **kwargs)


def test_bradley_terry_rejects_non_finite_gold():
    with pytest.raises(ValueError, match="finite"):
        bradley_terry_preference(
            math.nan, 0.0, temperature=1.0, label_noise=0.0, rng=random.Random(0)
        )


PROMPTS = [f"prompt {i}" for i in range(11)]


def test_split_prompts_sizes_give_remainder_to_rl():
    splits = split_prompts(PROMPTS)
    assert {name: len(part) for name, part in splits.items()} == {"sft": 2, "reward": 4, "rl": 5}
    assert [len(p) for p in split_prompts(PROMPTS[:10]).values()] == [2, 4, 4]
    assert [len(p) for p in split_prompts(PROMPTS[:10], (0.5, 0.5, 0.0)).values()] == [5, 5, 0]
    hundred = [f"p{i}" for i in range(100)]
    assert [len(p) for p in split_prompts(hundred, (0.29, 0.71, 0.0)).values()] == [29, 71, 0]


def test_split_prompts_is_a_disjoint_deterministic_partition():
    splits = split_prompts(PROMPTS, seed=5)
    parts = [set(part) for part in splits.values()]
    assert set.union(*parts) == set(PROMPTS)
    assert sum(len(p) for p in parts) == len(PROMPTS)
    assert splits == split_prompts(PROMPTS, seed=5)
    assert splits != split_prompts(PROMPTS, seed=6)


@pytest.mark.parametrize(
    "fractions", [(0.2, 0.4, 0.3), (0.5, 0.5), (1.2, -0.1, -0.1), (0.2, 0.4, math.nan)]
)
def test_split_prompts_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_prompts(PROMPTS, fractions)


def test_split_prompts_rejects_duplicate_prompts():
    with pytest.raises(ValueError, match="duplicate prompt 'prompt 1'"):
        split_prompts(PROMPTS + ["prompt 1"])

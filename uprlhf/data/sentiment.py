"""The embedded task: continue a movie-review opening positively (DESIGN §5).

Prompts are openings of the rated movie-review sentences that ship in the
vaderSentiment sdist (``make setup`` extracts them under ``$UPRLHF_CACHE``); the
gold scorers of ``uprlhf.data.gold`` judge the continuations, and synthetic preference
labels come from a noisy Bradley–Terry draw on gold, as in the synthetic-gold
setup of the reward over-optimisation literature.
"""

from __future__ import annotations

import html
import math
import os
import random
import string
from collections.abc import Sequence
from pathlib import Path

MOVIE_REVIEWS_FILE = "movieReviewSnippets_GroundTruth.txt"
NEWS_FILE = "nytEditorialSnippets_GroundTruth.txt"

CHAT_INSTRUCTION = (
    "Continue the following movie review from where it stops. "
    "Write one or two sentences that make the review positive."
)

OOD_KINDS = ("repetition", "word_salad", "gibberish", "off_task")
POSITIVE_WORDS = ("great", "amazing", "wonderful", "best", "love", "brilliant", "perfect")
GIBBERISH_CHARS = string.ascii_lowercase + string.digits + "#@%&*~^"

SPLITS = ("sft", "reward", "rl")


def reviews_dir() -> Path:
    """Folder of the extracted hutto_ICWSM_2014 ground-truth files, checked to exist."""
    cache = Path(os.environ.get("UPRLHF_CACHE") or "~/.cache/uprlhf").expanduser()
    folder = cache / "data" / "hutto_ICWSM_2014"
    if not (folder / MOVIE_REVIEWS_FILE).is_file():
        raise FileNotFoundError(
            f"movie-review snippets not found at {folder / MOVIE_REVIEWS_FILE}; "
            "run `make setup` to extract them from the vaderSentiment sdist"
        )
    return folder


def load_snippets(path: str | os.PathLike[str]) -> list[str]:
    """Sentences of a ``*_GroundTruth.txt`` file; see ``load_rated_snippets``."""
    return [sentence for sentence, _ in load_rated_snippets(path)]


def load_rated_snippets(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """(sentence, mean human rating) of each ``id<TAB>rating<TAB>sentence`` line of a ``*_GroundTruth.txt`` file.

    Blank lines are skipped. The files write HTML entities ("&amp;") and a double
    quote as two single quotes; both are turned back into plain text so prompts
    read naturally. Any malformed line raises ``ValueError("file:line: problem")``.
    """
    rated = []
    for lineno, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err.reason})") from None
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{path}:{lineno}: expected 3 tab-separated fields (id, rating, sentence), "
                f"got {len(fields)}"
            )
        snippet_id, rating, sentence = (field.strip() for field in fields)
        if not snippet_id:
            raise ValueError(f"{path}:{lineno}: empty id")
        try:
            value = float(rating)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: rating {rating!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{path}:{lineno}: rating {rating!r} is not finite")
        if not sentence:
            raise ValueError(f"{path}:{lineno}: empty sentence")
        rated.append((html.unescape(sentence).replace("''", '"'), value))
    if not rated:
        raise ValueError(f"{path}: no snippets")
    return rated


def make_prompts(
    sentences: list[str], n: int, *, min_words: int = 4, max_words: int = 8, seed: int = 0
) -> list[str]:
    """``n`` distinct openings: the first k words of distinct sentences, k in [min, max].

    Sentences are visited in a ``random.Random(seed)`` order; each draws k and is cut
    to min(k, its length). Sentences shorter than ``min_words``, and sentences whose
    opening was already produced, are skipped, so prompts never repeat (a repeat
    would leak across the SFT / reward / RL split).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_words <= max_words:
        raise ValueError(
            f"need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}"
        )
    distinct = dict.fromkeys(" ".join(s.split()) for s in sentences)
    usable = [s for s in distinct if len(s.split()) >= min_words]
    if len(usable) < n:
        raise ValueError(
            f"asked for {n} prompts but only {len(usable)} distinct sentences have "
            f">= {min_words} words"
        )
    rng = random.Random(seed)
    rng.shuffle(usable)
    openings: dict[str, None] = {}
    for sentence in usable:
        if len(openings) == n:
            break
        words = sentence.split()
        k = min(rng.randint(min_words, max_words), len(words))
        openings.setdefault(" ".join(words[:k]))
    if len(openings) < n:
        raise ValueError(
            f"asked for {n} prompts but the sentences give only {len(openings)} distinct openings"
        )
    return list(openings)


def chat_prompt(opening: str) -> str:
    """The user message the instruct policy sees: ``CHAT_INSTRUCTION``, a blank line, the opening.

    The response is scored on its own, so the instruction asks for the rest of the
    review rather than a repeat of the opening.
    """
    if not opening.strip():
        raise ValueError("opening must not be blank")
    return f"{CHAT_INSTRUCTION}\n\n{opening.strip()}"


def ood_responses(
    on_task: list[str], off_task_sentences: list[str], n: int, *, seed: int = 0
) -> list[str]:
    """``n`` out-of-distribution responses for the OOD-AUROC check, deterministic in ``seed``.

    Response i is of kind ``OOD_KINDS[i % 4]``: a positive word repeated 8–24 times
    (the classic reward hack), word salad (8–20 words of ``on_task`` in random
    order), character gibberish (6–14 tokens over ``GIBBERISH_CHARS``), or an
    off-task sentence from ``off_task_sentences`` (news text).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    vocabulary = [word for text in on_task for word in text.split()]
    off_task = [s.strip() for s in off_task_sentences if s.strip()]
    if n and not vocabulary:
        raise ValueError("on_task must contain at least one word")
    if n and not off_task:
        raise ValueError("off_task_sentences must contain at least one sentence")
    rng = random.Random(seed)
    responses = []
    for i in range(n):
        kind = OOD_KINDS[i % len(OOD_KINDS)]
        if kind == "repetition":
            response = " ".join([rng.choice(POSITIVE_WORDS)] * rng.randint(8, 24))
        elif kind == "word_salad":
            response = " ".join(rng.sample(vocabulary, min(rng.randint(8, 20), len(vocabulary))))
        elif kind == "gibberish":
            response = " ".join(
                "".join(rng.choices(GIBBERISH_CHARS, k=rng.randint(2, 9)))
                for _ in range(rng.randint(6, 14))
            )
        else:
            response = rng.choice(off_task)
        responses.append(response)
    return responses


def bradley_terry_preference(
    gold_a: float, gold_b: float, *, temperature: float, label_noise: float, rng: random.Random
) -> bool:
    """Whether a synthetic labeller prefers a over b, given their gold scores.

    P(a ≻ b) = sigmoid((gold_a − gold_b) / temperature), then the label is flipped
    with probability ``label_noise``. Two numbers are always drawn from ``rng``, so
    the stream stays aligned however the draws come out.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise}")
    if not (math.isfinite(gold_a) and math.isfinite(gold_b)):
        raise ValueError(f"gold scores must be finite, got {gold_a} and {gold_b}")
    z = (gold_a - gold_b) / temperature
    p_a = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    prefers_a = rng.random() < p_a
    flipped = rng.random() < label_noise
    return prefers_a != flipped


def split_prompts(
    prompts: list[str], fractions: Sequence[float] = (0.2, 0.4, 0.4), *, seed: int = 0
) -> dict[str, list[str]]:
    """Disjoint ``sft`` / ``reward`` / ``rl`` prompt sets from one seeded shuffle.

    The first two sizes are ⌊fraction · N⌋ (with 1e-9 slack for float error, capped
    at what is left) and ``rl`` takes the remainder. Duplicate prompts are refused, since they would
    leak from one stage into another.
    """
    if len(fractions) != len(SPLITS):
        raise ValueError(
            f"fractions must have {len(SPLITS)} entries {SPLITS}, got {len(fractions)}"
        )
    if any(not f >= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    seen: set[str] = set()
    for prompt in prompts:
        if prompt in seen:
            raise ValueError(f"duplicate prompt {prompt!r}; prompts must be distinct to split")
        seen.add(prompt)
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    n_sft = math.floor(fractions[0] * len(shuffled) + 1e-9)
    n_reward = min(math.floor(fractions[1] * len(shuffled) + 1e-9), len(shuffled) - n_sft)
    return {
        "sft": shuffled[:n_sft],
        "reward": shuffled[n_sft : n_sft + n_reward],
        "rl": shuffled[n_sft + n_reward :],
    }

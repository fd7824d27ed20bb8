"""Example extra reward rules (``extra_rewards`` in an RL config; the contract is in ``uprlhf.rl.extra_rewards``).

Each takes the batch's prompts and responses and returns one float per sample, so a
config can name it as it is::

    extra_rewards:
      - {fn: "uprlhf.rl.rules:response_length_penalty", weight: 0.05}
      - {fn: "uprlhf.rl.rules:ends_with_punctuation", weight: 0.5}
"""

from __future__ import annotations

SENTENCE_ENDS = (".", "!", "?")


def response_length_penalty(prompts: list[str], responses: list[str]) -> list[float]:
    """Minus the number of words of each response: with a positive weight, shorter answers score higher.

    Counters the drift to ever longer responses that reward models tend to reward.
    """
    return [-float(len(response.split())) for response in responses]


def ends_with_punctuation(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for a response that ends a sentence (., ! or ?, trailing spaces aside), else 0: a format check."""
    return [1.0 if response.rstrip().endswith(SENTENCE_ENDS) else 0.0 for response in responses]

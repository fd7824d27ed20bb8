"""Extra reward rules for the tests, named by import path (``tests.extra_rewards:...``) in RL configs."""

from __future__ import annotations

NOT_A_FUNCTION = 3


def exclamations(prompts: list[str], responses: list[str]) -> list[float]:
    """How many '!' each response holds."""
    return [float(response.count("!")) for response in responses]


def explode(prompts: list[str], responses: list[str]) -> list[float]:
    raise ValueError("verifier crashed")


def nan_for_the_second(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0, float("nan"), *[0.0] * (len(responses) - 2)]


def one_short(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0] * (len(responses) - 1)


def words(prompts: list[str], responses: list[str]) -> list[str]:
    return ["many"] * len(responses)


def takes_one(responses: list[str]) -> list[float]:
    return [0.0] * len(responses)

"""Shared fixtures: tiny models built from configs and a loopback-only local Ray."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["UPRLHF_DASHBOARD"] = "0"

GOOD = ["great", "lovely", "wonderful", "fun", "brilliant"]
BAD = ["awful", "boring", "terrible", "dull", "bad"]
OPENINGS = ["the movie was", "this film is", "the plot felt", "the acting was"]


def toy_texts() -> list[str]:
    words = GOOD + BAD + ["and", "really", "quite", "zz", "qq", "xx"]
    return [f"{o} {a} and {b}" for o in OPENINGS for a in words for b in words]


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Separable preferences: positive words beat negative ones."""
    rng = random.Random(seed)
    return [
        {
            "id": str(i),
            "prompt": rng.choice(OPENINGS),
            "chosen": f"{rng.choice(GOOD)} and {rng.choice(GOOD)}",
            "rejected": f"{rng.choice(BAD)} and {rng.choice(BAD)}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_reward_backbone(tmp_path_factory):
    from uprlhf.models import save_tiny_reward_backbone

    return save_tiny_reward_backbone(tmp_path_factory.mktemp("models") / "reward", toy_texts())


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    from uprlhf.models import save_tiny_policy

    return save_tiny_policy(tmp_path_factory.mktemp("models") / "policy", toy_texts())


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session, every port on 127.0.0.1."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()

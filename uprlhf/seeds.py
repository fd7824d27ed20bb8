"""One way to derive the seed of every random stream from the run's seed.

Each stream (a rollout worker's sampling at a step, a learner rank's minibatch order,
member k's head initialisation, ...) is named by keys, and its seed is a hash of the
base seed and those keys: streams never collide by accident of arithmetic (as
``seed * 1000 + k`` and ``seed * 1000 + step`` would), and the same names give the same
seed in every process, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63  # fits torch.Generator.manual_seed, numpy and random.Random


def derive_seed(base: int, *keys: int | str) -> int:
    """The seed of the stream named ``keys`` under the run's ``base`` seed (a non-negative 63-bit int)."""
    text = "\x1f".join(str(part) for part in (int(base), *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> (64 - SEED_BITS)

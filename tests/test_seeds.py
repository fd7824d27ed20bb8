"""derive_seed: stable across processes, distinct per stream, in range for every generator."""

import random
import subprocess
import sys

import torch

from uprlhf.seeds import SEED_BITS, derive_seed


def test_same_names_give_the_same_seed_in_another_process():
    here = derive_seed(3, "rollout", 7, 1)
    there = subprocess.run([sys.executable, "-c", "from uprlhf.seeds import derive_seed; print(derive_seed(3, 'rollout', 7, 1))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert int(there) == here


def test_streams_that_arithmetic_seeds_would_collide_get_distinct_seeds():
    # seed*1000+k with (seed=1, k=0) and (seed=0, k=1000) collide; named streams do not
    assert derive_seed(1, "member", 0) != derive_seed(0, "member", 1000)
    assert derive_seed(0, "member", 1) != derive_seed(0, "rank", 1)
    seeds = {derive_seed(0, "step", s, "worker", w) for s in range(100) for w in range(8)}
    assert len(seeds) == 800


def test_seeds_fit_every_generator():
    seed = max(derive_seed(s, "x") for s in range(200))
    assert 0 <= seed < 2**SEED_BITS
    torch.Generator().manual_seed(seed)
    random.Random(seed)

"""Best-of-n sampling ranked by a penalty: the RL-free baseline of the overoptimisation literature.

For each prompt, n responses are drawn from the policy; the one with the highest
shaped reward is kept. The KL of the best-of-n policy to the sampler has the
closed form log n − (n − 1)/n, so best-of-n gives a gold-vs-KL curve without training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uprlhf.rl.penalties import penalize_in_run


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ sampler) = log n − (n − 1)/n (Stiennon et al., 2020)."""
    return math.log(n) - (n - 1) / n


def best_of_n(
    member_rewards: Tensor, gold: Tensor, ns: list[int], penalty: str, coefficients: dict[str, float]
) -> dict[int, dict[str, float]]:
    """Gold, proxy and u of the response each prompt keeps, for every n, ranked by ``penalty``.

    ``member_rewards`` is [P, N, K] (N ≥ max(ns) samples per prompt), ``gold`` [P, N];
    best-of-n looks at the first n samples of each prompt. ``up_rlhf`` centres on
    the mean u of all samples; ``var_kl`` sees log π/π_ref = 0 (samples come from the reference).
    """
    p, n_max, k = member_rewards.shape
    if max(ns) > n_max:
        raise ValueError(f"best-of-{max(ns)} needs {max(ns)} samples per prompt, got {n_max}")
    flat = member_rewards.reshape(p * n_max, k)
    std = flat.std(1, correction=0)
    shaped = penalize_in_run(
        penalty, flat, coefficients, running_mean=float(std.mean()), log_ratio=torch.zeros(p * n_max)
    ).reshape(p, n_max)
    mean, std = flat.mean(1).reshape(p, n_max), std.reshape(p, n_max)
    rows = torch.arange(p)
    out = {}
    for n in ns:
        pick = shaped[:, :n].argmax(1)
        out[n] = {
            "gold": float(gold[rows, pick].mean()),
            "proxy": float(mean[rows, pick].mean()),
            "uncertainty": float(std[rows, pick].mean()),
            "kl": best_of_n_kl(n),
        }
    return out

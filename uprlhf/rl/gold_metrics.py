"""The papers' policy figures on gold rewards (DESIGN §3b): Var_Reward, pairwise win rate, gold at matched KL,
and whether a run's u sees where its reward is wrong.

Pure functions over 1-D arrays (lists, numpy arrays or CPU tensors), so a study's
summary, a report and a test compute them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a float64 vector; empty, multi-dimensional or non-finite input is refused by name."""
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per response), got shape {out.shape}")
    if out.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} has non-finite values at {np.flatnonzero(~np.isfinite(out))[:5].tolist()}")
    return out


def var_reward(gold: ArrayLike) -> float:
    """Var_Reward of paper 003 (UGDA, §5 "Metrics"; lower is better): the variance of gold over responses.

    The paper says only "variance of golden reward scores"; its one written-out
    variance (the ensemble's R_v, §4.1 after Eq. 8) divides by the count, as does
    DESIGN §1's ensemble variance, so this is the population variance (ddof = 0).
    """
    return float(np.var(_vector(gold, "gold")))


def pairwise_win_rate(gold_a: ArrayLike, gold_b: ArrayLike) -> float:
    """Share of prompts on which arm a's response has the higher gold than arm b's; a tie counts ½.

    ``gold_a[i]`` and ``gold_b[i]`` must be the two arms' responses to the same
    prompt i. Paper 001 reports AlpacaEval's win rate against a baseline, which
    counts a tie as half a win; paper 003 (Fig. 2) shows win / tie / lose shares
    from a judge; with ties at ½ this is win + ½·tie of that figure.
    """
    a, b = _vector(gold_a, "gold_a"), _vector(gold_b, "gold_b")
    if a.shape != b.shape:
        raise ValueError(
            f"gold_a and gold_b must be aligned by prompt (one response of each arm per prompt), got {a.size} and {b.size} values"
        )
    return float(np.mean((a > b) + 0.5 * (a == b)))


def gold_at_kl(kls: ArrayLike, golds: ArrayLike, kl: float) -> float | None:
    """Gold of a run at KL ``kl``, linearly interpolated along its (KL, gold) points sorted by KL.

    ``kls[i]`` and ``golds[i]`` are one evaluation of the run (e.g. one row of its
    metrics). Points where either is NaN (steps without a gold evaluation) are
    dropped; points sharing a KL are averaged into one. Returns None, never an
    extrapolation, when ``kl`` lies outside [min KL, max KL] of the remaining
    points or none remain, so that runs are compared only where both reached the KL.
    """
    if not np.isfinite(kl):
        raise ValueError(f"kl must be finite, got {kl}")
    x, y = np.asarray(kls, dtype=np.float64), np.asarray(golds, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"kls and golds must be 1-D and aligned (one KL per gold), got shapes {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    if not np.isfinite(x[keep]).all() or not np.isfinite(y[keep]).all():
        raise ValueError("kls and golds must not be infinite")
    x, y = x[keep], y[keep]
    if x.size == 0 or not x.min() <= kl <= x.max():
        return None
    grid, where = np.unique(x, return_inverse=True)
    means = np.bincount(where, weights=y) / np.bincount(where)
    return float(np.interp(kl, grid, means))


UNCERTAINTY_DIAGNOSTICS = ("u_kl_spearman_samples", "u_hacked_auroc", "u_hacked_auroc_high_proxy", "u_proxy_spearman")


def uncertainty_diagnostics(uncertainty: ArrayLike, kl: ArrayLike, proxy: ArrayLike, gold: ArrayLike) -> dict[str, float | None]:
    """Does a run's u see where its reward is wrong? Four figures over its samples (issue 14's targets).

    - ``u_kl_spearman_samples``: Spearman's ρ of each sample's u with its own KL
      (Σ_t log π/π_ref of the response): does u grow as the policy drifts?
    - ``u_hacked_auroc``: AUROC of u as a detector of *hacked* samples, those whose
      proxy (ensemble mean) is above the run's median and whose gold is below its
      median; 1.0: every hacked sample is more uncertain than every other one, 0.5: no signal.
    - ``u_hacked_auroc_high_proxy``: the same among the samples above the proxy's median
      only. Where u grows with the reward's scale, the first AUROC rises with the proxy
      alone; this one asks whether u tells, among the samples the proxy likes, those
      that gold does not.
    - ``u_proxy_spearman``: Spearman's ρ of u with the proxy, how much of u is the
      reward's own scale (1: u only restates the proxy's ranking).

    Each is None where it is undefined (under three samples, a constant side, no
    hacked or no other sample).
    """
    u, k, p, g = (_vector(v, name) for v, name in ((uncertainty, "uncertainty"), (kl, "kl"), (proxy, "proxy"), (gold, "gold")))
    if not u.shape == k.shape == p.shape == g.shape:
        raise ValueError(f"uncertainty, kl, proxy and gold must be aligned, got shapes {u.shape}, {k.shape}, {p.shape}, {g.shape}")
    # Imported here: the replay buffer's actor imports this module and needs neither.
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
        return float(stats.spearmanr(x, y).statistic) if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0 else None

    hacked = (p > np.median(p)) & (g < np.median(g))

    def auroc(positive: np.ndarray, scores: np.ndarray) -> float | None:
        return float(roc_auc_score(positive, scores)) if 0 < positive.sum() < positive.size else None

    high = p > np.median(p)
    return {"u_kl_spearman_samples": spearman(u, k), "u_hacked_auroc": auroc(hacked, u),
            "u_hacked_auroc_high_proxy": auroc(hacked[high], u[high]), "u_proxy_spearman": spearman(u, p)}

"""Paper 002's bandit simulation (§3 "Variability in the Variance", Figs. 3–5): variance-aware vs vanilla policies.

What the paper states: a true reward vector r* of dimension 1000 (one entry per
arm, i.e. prompt-response pair) is fixed; reward estimates are drawn as
R̂ ~ N(r*, Σ) with Σ diagonal (Assumption 2.1), its variances spread over (3, 100)
("high variability", Fig. 3) or (70, 100) ("low variability", Fig. 4); the two
policies are π1 (Def. 3.1: max πᵀR̂ s.t. ‖π − π0‖² ≤ ε) and π2 (Def. 3.2: the same
with ‖π − π0‖²_Σ ≤ λ_min(Σ)·ε), whose closed forms (App. 6, proof of Thm. 3.3) are
π1 = π0 + √(ε / R̂ᵀR̂)·R̂ and π2 = π0 + √(ε̃ / R̂ᵀΣ⁻¹R̂)·Σ⁻¹R̂. The figures give the
mean and std of the true return πᵀr* over repeated draws of R̂.

Where the paper is silent, this module chooses:
- r* ~ N(0, true_reward_std²) per arm and the variances ~ Uniform(range), both
  drawn once per seed, from their own streams, so the two settings of one seed
  share r*, as the paper's "in both cases, r* is fixed" asks;
- π0 uniform over the arms; ε (``budget``, 1 by default) and the number of draws;
- ``form="kl"`` adds the KL-regularised closed forms the paper's PPO uses
  (Thm. 3.6): vanilla π ∝ π0·exp(R̂/β), variance-aware π ∝ π0·exp(R̂/(β·σ²)), each
  with its β solved so that KL(π‖π0) = ``budget``: the two are compared at one
  KL, as the paper matches its PPO runs (App. 8). The ℓ2 forms are the default
  because they are the π1, π2 the simulation paragraph names; the ℓ2 policies are
  not confined to the simplex (neither are Defs. 3.1–3.2), only their return matters.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from uprlhf.section import Section

HIGH_VARIABILITY = (3.0, 100.0)  # Fig. 3
LOW_VARIABILITY = (70.0, 100.0)  # Fig. 4
SETTINGS = {"high": HIGH_VARIABILITY, "low": LOW_VARIABILITY}
POLICIES = ("vanilla", "variance_aware")
CHUNK = 256  # draws per vectorised block, which bounds memory at [CHUNK, arms]
NEWTON_STEPS = 100  # per row; the search stops far earlier (about 5 steps for most rows)
KL_TOLERANCE = 1e-10  # relative error of the matched KL


class BanditConfig(Section):
    """One setting of the simulation; defaults are the paper's high-variability setting with the ℓ2 policies."""

    arms: int = Field(1000, ge=2, description="Bandit arms (prompt-response pairs): the dimension of r*, 1000 in the paper; at least 2.")
    variance_range: tuple[float, float] = Field(
        HIGH_VARIABILITY, description="(low, high) of the uniform variances σ² of the estimates: (3, 100) high, (70, 100) low variability."
    )
    draws: int = Field(2000, ge=2, description="Independent draws of R̂ ~ N(r*, Σ); each gives one true return per policy; at least 2.")
    form: Literal["l2", "kl"] = Field("l2", description="l2: the paper's π1/π2 (Defs. 3.1-3.2); kl: the KL-regularised forms of Thm. 3.6 at matched KL.")
    budget: float = Field(
        1.0, gt=0, description="ε: ‖π − π0‖² ≤ ε for l2 (π2 gets λ_min(Σ)·ε in the Σ-norm, as the paper sets); KL(π‖π0) = ε nats for kl."
    )
    true_reward_std: float = Field(1.0, gt=0, description="Std of the fixed true rewards r* ~ N(0, std²), one per arm.")

    @model_validator(mode="after")
    def _check(self) -> BanditConfig:
        low, high = self.variance_range
        if not 0 < low <= high:
            raise ValueError(f"variance_range must satisfy 0 < low <= high, got {self.variance_range}")
        if self.form == "kl" and self.budget >= math.log(self.arms):
            raise ValueError(f"a KL budget must be below log(arms) = {math.log(self.arms):.3f} (a point mass), got {self.budget}")
        return self


def l2_policies(r_hat: np.ndarray, variance: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """The steps d = π − π0 [D, A] of π1 and π2 (App. 6): along R̂ with ‖d‖² = ε, along Σ⁻¹R̂ with ‖d‖²_Σ = λ_min·ε."""
    vanilla = math.sqrt(budget) * r_hat / np.linalg.norm(r_hat, axis=1, keepdims=True)
    weighted = r_hat / variance
    aware = np.sqrt(variance.min() * budget / (r_hat * weighted).sum(1, keepdims=True)) * weighted
    return vanilla, aware


def _tilt(scores: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """π_t ∝ exp(t·scores) over uniform π0 [D, A], KL(π_t‖π0) [D] and its slope in t, t·Var_π_t(scores) [D]."""
    z = t[:, None] * scores
    top = z.max(1, keepdims=True)
    e = np.exp(z - top)
    total = e.sum(1, keepdims=True)
    p = e / total
    mean = (p * scores).sum(1)
    divergence = t * mean - (top + np.log(total))[:, 0] + math.log(scores.shape[1])
    return p, divergence, t * ((p * scores * scores).sum(1) - mean**2)


def tilted(scores: np.ndarray, kl: float) -> np.ndarray:
    """π ∝ π0·exp(t·scores), π0 uniform, row by row [D, A], with t > 0 such that KL(π‖π0) = ``kl``.

    KL(π_t‖π0) rises with t from 0 to log A (the point mass on the best arm), so each
    row's t is bracketed as it is searched, starting from t = √(2·kl / Var(scores))
    (KL ≈ t²·Var/2 for small t): Newton steps, or a bisection (a doubling, before an
    upper end is known) where a step would leave the bracket. Rows stop being
    evaluated once they are within tolerance, so the few slow ones cost little.
    """
    rows = scores.shape[0]
    spread = scores.var(1)
    if (spread == 0).any():
        raise ValueError(f"rows {np.flatnonzero(spread == 0)[:5].tolist()} have equal scores on every arm: no tilt moves them")
    t = np.sqrt(2 * kl / spread)
    low, high = np.zeros(rows), np.full(rows, np.inf)
    active = np.arange(rows)
    for _ in range(NEWTON_STEPS):
        ta, la, ha = t[active], low[active], high[active]
        _, divergence, slope = _tilt(scores[active], ta)
        gap = divergence - kl
        done = np.abs(gap) <= KL_TOLERANCE * kl
        la, ha = np.where(gap < 0, ta, la), np.where(gap < 0, ha, ta)
        newton = ta - np.divide(gap, slope, out=np.full(ta.shape, np.inf), where=slope > 0)
        fallback = np.where(np.isinf(ha), 2 * ta, (la + ha) / 2)
        t[active] = np.where(done, ta, np.where((newton > la) & (newton < ha), newton, fallback))
        low[active], high[active] = la, ha
        active = active[~done]
        if active.size == 0:
            return _tilt(scores, t)[0]
    raise RuntimeError(f"KL tilting did not reach {kl} nats within a relative {KL_TOLERANCE} in {NEWTON_STEPS} steps")


def simulate(cfg: BanditConfig, seed: int) -> dict:
    """True returns of both policies over ``cfg.draws`` draws of R̂, the same draws for both.

    Returns ``reference_return`` (π0ᵀr*), per policy its ``mean``, ``std`` (over
    draws, ddof 0) and ``p_below_reference`` (share of draws with πᵀr* ≤ π0ᵀr*,
    the probability Thm. 3.3 bounds), ``returns``: each policy's per-draw returns
    (Fig. 5's histograms), and the run's fixed ``true_reward`` r* and ``variance`` σ².
    """
    truth_stream, variance_stream, noise_stream = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    r_true = truth_stream.normal(0.0, cfg.true_reward_std, cfg.arms)
    variance = variance_stream.uniform(*cfg.variance_range, cfg.arms)
    reference = float(r_true.mean())  # uniform π0
    returns: dict[str, list[np.ndarray]] = {name: [] for name in POLICIES}
    for start in range(0, cfg.draws, CHUNK):
        rows = min(CHUNK, cfg.draws - start)
        r_hat = r_true + noise_stream.standard_normal((rows, cfg.arms)) * np.sqrt(variance)
        if cfg.form == "l2":
            steps = l2_policies(r_hat, variance, cfg.budget)
            values = [reference + step @ r_true for step in steps]
        else:
            values = [tilted(scores, cfg.budget) @ r_true for scores in (r_hat, r_hat / variance)]
        for name, value in zip(POLICIES, values):
            returns[name].append(value)
    out: dict = {"reference_return": reference, "returns": {}, "true_reward": r_true, "variance": variance}
    for name in POLICIES:
        values = np.concatenate(returns[name])
        out["returns"][name] = values
        out[name] = {"mean": float(values.mean()), "std": float(values.std()), "p_below_reference": float((values <= reference).mean())}
    return out


def results_table(seed: int = 0, base: BanditConfig | None = None) -> list[dict]:
    """One row per setting (high, low variability) × form (l2, kl) × policy: mean, std and p_below_reference of the true return."""
    base = base or BanditConfig()
    rows = []
    for setting, variance_range in SETTINGS.items():
        for form in ("l2", "kl"):
            result = simulate(base.replace(variance_range=variance_range, form=form), seed)
            for policy in POLICIES:
                rows.append({"setting": setting, "form": form, "policy": policy, "reference": result["reference_return"], **result[policy]})
    return rows

"""The PPO maths on token sequences: KL estimators, per-token rewards, GAE, the clipped losses.

Everything works on [B, T] tensors over response tokens with a ``mask`` that is 1
on real tokens and 0 on padding. The learner (``uprlhf.rl.learner``) wires these
into an actor-critic update: it shapes the per-token rewards with
``token_rewards`` (the driver only hands it the penalised sequence rewards), gets
advantages and returns from the estimator ``ppo.estimator`` names in
``uprlhf.rl.estimators`` (``gae`` here is the one behind ``"gae"``; the entry whitens
the advantages where it is registered to), minimises ``policy_loss`` + ``value_loss``
(no value loss for a critic-free estimator), and reports ``explained_variance`` of its
value head. The KL controller and the running mean of the uncertainty,
which the run state (``uprlhf.rl.run_state``) carries across steps, live here too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from uprlhf.registry import Registry

# Elementwise KL(π‖π_ref) estimators of t = logp − ref_logp: ``@KL_ESTIMATORS.register("name")`` on ``fn(t)``.
KL_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(t: Tensor) -> Tensor:
    """t: unbiased, can be negative."""
    return t


@KL_ESTIMATORS.register("k2")
def _k2(t: Tensor) -> Tensor:
    """t²/2: its gradient is the gradient of KL to first order."""
    return 0.5 * t.square()


@KL_ESTIMATORS.register("k3")
def _k3(t: Tensor) -> Tensor:
    """exp(−t) − 1 + t: unbiased and ≥ 0."""
    return torch.expm1(-t) + t


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Elementwise KL(π‖π_ref) estimate from sampled-token log-probs, t = logp − ref_logp.

    ``kind`` names a ``KL_ESTIMATORS`` entry: ``k1`` = t (unbiased, can be negative),
    ``k2`` = t²/2 (its gradient is the gradient of KL to first order), ``k3`` =
    exp(−t) − 1 + t (unbiased and ≥ 0).
    """
    return KL_ESTIMATORS.get(kind)(logp - ref_logp)


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, form: str, estimator: str = "k2") -> Tensor:
    """The differentiable KL term of the actor loss (``kl.placement`` 'loss'), before its coefficient.

    ``sequence_sq`` is UP-RLHF's Eq. 15 (paper 000): the mean over samples of
    (Σ_t log π_θ/π_ref)², the whole response's log-ratio squared. The paper writes no
    ½ (unlike the per-token k2), so none is here: β₁ (``kl.coef``) multiplies the
    square itself. ``per_token`` is the masked mean over response tokens of the
    elementwise ``estimator`` (k2 = ½t² per token).
    """
    if form == "sequence_sq":
        return ((logp - ref_logp) * mask).sum(1).square().mean()
    if form == "per_token":
        return masked_mean(kl_estimate(logp, ref_logp, estimator), mask)
    raise ValueError(f"unknown KL loss form {form!r}; allowed: 'sequence_sq', 'per_token'")


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """Normalise to unit variance over the masked entries (and zero mean unless ``shift_mean`` is off)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean).square(), mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards: Tensor, values: Tensor, gamma: float, lam: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over [B, T]; the value after the last token is 0.

    With a ``mask``, padded positions get advantage 0 and are skipped: the
    recursion jumps from each real token to the next real one, so right padding
    (responses of different lengths) ends each sequence at its own last token.
    Returns (advantages, returns) with returns = advantages + values.
    """
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must match")
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def token_rewards(sequence_rewards: Tensor, kl_penalty: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards [B, T]: −KL penalty on every token plus the sequence reward on the last real one."""
    rewards = -kl_penalty * mask
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(rewards.shape[0]), last] += sequence_rewards
    return rewards


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float) -> tuple[Tensor, dict]:
    """The clipped surrogate objective (negated, to minimise) and its clip fraction and approximate KL."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp).square(), mask)
    return loss, {"clip_fraction": float(clip_fraction), "approx_kl": float(approx_kl)}


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """Clipped value loss: the worse of the raw and the clipped squared error, halved."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns).square(), (clipped - returns).square()), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var[returns − values] / Var[returns] over the masked entries (population variances).

    1 for a perfect value head, 0 for one no better than the mean return, negative
    for a worse one; 0.0 when the returns do not vary (nothing to explain).
    """
    def var(x: Tensor) -> Tensor:
        return masked_mean((x - masked_mean(x, mask)).square(), mask)

    var_returns = var(returns.double())
    if var_returns <= 0:
        return 0.0
    return float(1.0 - var((returns - values).double()) / var_returns)


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: nudges the KL coefficient toward a target KL.

    With no target the coefficient stays fixed.
    """

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef = coef
        self.target = target
        self.horizon = horizon

    def update(self, observed_kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, observed_kl / self.target - 1.0))
            self.coef *= 1.0 + error * n_samples / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


class RunningMean:
    """The running mean ū of the uncertainty over every sample seen in the run (UP-RLHF)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def update(self, values: Tensor) -> float:
        self.total += float(values.double().sum())
        self.count += values.numel()
        return self.value

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])

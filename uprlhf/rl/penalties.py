"""Reward shaping for RL: one registry of named uncertainty penalties (DESIGN §1).

Every penalty maps the K member rewards of a batch, [B, K], to one shaped reward
per sample, [B], from the ensemble mean m and population std u. A penalty is a
function ``fn(mean, std, *, coefficient=default, ...)`` decorated with
``@register_penalty("name")``; its keyword-only parameters are its coefficients,
so the signature alone tells the registry their names, defaults and which are
required.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

PenaltyFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Penalty:
    """A registered penalty: its function and the coefficients it accepts."""

    name: str
    fn: PenaltyFn
    coefficients: tuple[str, ...]
    defaults: Mapping[str, object]
    non_negative: frozenset[str]

    @property
    def required(self) -> tuple[str, ...]:
        """Coefficients without a default, which every call must pass."""
        return tuple(c for c in self.coefficients if c not in self.defaults)

    def __call__(self, member_rewards: Tensor, **coefficients: object) -> Tensor:
        """Shape ``member_rewards`` [B, K] into rewards [B], checking coefficients first."""
        unknown = sorted(set(coefficients) - set(self.coefficients))
        if unknown:
            raise ValueError(
                f"penalty {self.name!r} got unknown coefficient(s) {unknown}; "
                f"allowed: {list(self.coefficients)}"
            )
        missing = [c for c in self.required if c not in coefficients]
        if missing:
            raise ValueError(f"penalty {self.name!r} requires coefficient(s) {missing}")
        values = {**self.defaults, **coefficients}
        for coefficient in sorted(self.non_negative):
            # `not >= 0` also rejects NaN, which would silently poison every reward.
            if not float(values[coefficient]) >= 0:  # type: ignore[arg-type]
                raise ValueError(
                    f"penalty {self.name!r}: coefficient {coefficient!r} must be >= 0, "
                    f"got {values[coefficient]}"
                )
        mean, std = ensemble_stats(member_rewards)
        return self.fn(mean, std, **values)


PENALTIES: dict[str, Penalty] = {}


def register_penalty(
    name: str, *, non_negative: Iterable[str] = ()
) -> Callable[[PenaltyFn], PenaltyFn]:
    """Add ``fn(mean, std, *, coefficients...)`` to ``PENALTIES`` under ``name``.

    ``non_negative`` names the coefficients that must be >= 0 (penalty strengths:
    a negative one would reward uncertainty instead of penalising it).
    """

    def decorate(fn: PenaltyFn) -> PenaltyFn:
        if name in PENALTIES:
            raise ValueError(f"penalty {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())
        coefficient_params = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if len(params) - len(coefficient_params) != 2:
            raise TypeError(
                f"penalty {name!r} must take (mean, std) positionally and its "
                "coefficients as keyword-only parameters"
            )
        coefficients = tuple(p.name for p in coefficient_params)
        strengths = frozenset(non_negative)
        if not strengths <= set(coefficients):
            raise TypeError(
                f"penalty {name!r}: non_negative names {sorted(strengths - set(coefficients))} "
                f"are not among its coefficients {list(coefficients)}"
            )
        defaults = {p.name: p.default for p in coefficient_params if p.default is not p.empty}
        PENALTIES[name] = Penalty(
            name=name,
            fn=fn,
            coefficients=coefficients,
            defaults=MappingProxyType(defaults),
            non_negative=strengths,
        )
        return fn

    return decorate


def ensemble_stats(member_rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Ensemble mean m [B] and population std u [B] (divide by K) over members [B, K].

    The population std is what DESIGN §1 defines as the uncertainty; it is 0,
    not NaN, for a single member.
    """
    if member_rewards.dim() != 2:
        raise ValueError(
            f"member_rewards must be [B, K], got shape {tuple(member_rewards.shape)}"
        )
    if member_rewards.shape[1] == 0:
        raise ValueError("member_rewards has no ensemble members (K = 0)")
    return member_rewards.mean(dim=1), member_rewards.std(dim=1, correction=0)


# Inputs a penalty reads from the run, not from its config: ū (up_rlhf) and log π/π_ref (var_kl).
RUN_STATE_INPUTS = ("running_mean", "log_ratio")


def penalize_in_run(
    name: str, member_rewards: Tensor, coefficients: Mapping[str, float], *, running_mean: float, log_ratio: Tensor
) -> Tensor:
    """``penalize`` with the configured coefficients plus whichever run-state inputs the penalty takes."""
    state = {"running_mean": running_mean, "log_ratio": log_ratio}
    wanted = PENALTIES[name].coefficients if name in PENALTIES else ()
    return penalize(name, member_rewards, **coefficients, **{k: v for k, v in state.items() if k in wanted})


def penalize(name: str, member_rewards: Tensor, **coefficients: object) -> Tensor:
    """Shaped rewards [B] from member rewards [B, K] with the penalty called ``name``."""
    if name not in PENALTIES:
        raise ValueError(f"unknown penalty {name!r}; allowed: {sorted(PENALTIES)}")
    return PENALTIES[name](member_rewards, **coefficients)


@register_penalty("mean")
def _mean(mean: Tensor, std: Tensor) -> Tensor:
    """The plain ensemble mean: no uncertainty penalty (the baseline)."""
    return mean


@register_penalty("lcb", non_negative=("lam",))
def _lcb(mean: Tensor, std: Tensor, *, lam: float = 1.0) -> Tensor:
    """Lower confidence bound m - λ·u: pessimism where the members disagree."""
    return mean - lam * std


@register_penalty("uwo", non_negative=("lam",))
def _uwo(mean: Tensor, std: Tensor, *, lam: float = 1.0) -> Tensor:
    """Uncertainty-weighted optimisation m - λ·u²: penalises the variance."""
    return mean - lam * std.square()


@register_penalty("up_rlhf", non_negative=("beta",))
def _up_rlhf(
    mean: Tensor, std: Tensor, *, beta: float = 1.0, running_mean: float | Tensor = 0.0
) -> Tensor:
    """UP-RLHF m - β·(u - ū): penalises uncertainty above the run's running mean ū.

    Centring on ū keeps the average shaped reward near m, so the penalty only
    separates samples the ensemble is more or less sure about than usual.
    """
    if torch.as_tensor(running_mean).dim() != 0:
        raise ValueError("penalty 'up_rlhf': running_mean must be a scalar (float or 0-d tensor)")
    return mean - beta * (std - running_mean)


@register_penalty("var_kl", non_negative=("beta",))
def _var_kl(mean: Tensor, std: Tensor, *, beta: float = 1.0, log_ratio: Tensor) -> Tensor:
    """m - β·u²·log(π_θ/π_ref): a per-sample KL penalty weighted by ensemble variance.

    The policy may drift from the reference where the ensemble agrees, and is held
    close where it does not.
    """
    if log_ratio.shape != mean.shape:
        raise ValueError(
            f"penalty 'var_kl': log_ratio must be [B] = {tuple(mean.shape)}, "
            f"got {tuple(log_ratio.shape)}"
        )
    return mean - beta * std.square() * log_ratio

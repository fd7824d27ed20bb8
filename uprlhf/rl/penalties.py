"""Reward shaping for RL: one registry of named uncertainty penalties (DESIGN §1).

Every penalty maps the K member rewards of a batch, [B, K], to one shaped reward
per sample, [B], from a reward (the ensemble mean m, or one member's r_i when the
run trains against member i, as paper 002 does) and the ensemble's population std u.
A penalty is a function ``fn(mean, std, *, coefficient=default, ...)`` decorated with
``@PENALTIES.register("name", ...)``; its keyword-only parameters are its
coefficients, so the signature alone tells the registry their names, defaults and
which are required. The registration also declares where the KL to the reference
goes (``kl="loss"`` for UP-RLHF; ``kl="penalty"`` when the penalty carries its own
KL term, as var_kl does, so no other is added), which run state it reads
(``reads=("running_mean",)``), which the run passes instead of the config, and
whether it needs an uncertainty (every penalty but ``mean``: with one reward model,
K = 1, u is 0 and the penalty would silently be the mean).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from uprlhf.registry import Registry

PenaltyFn = Callable[..., Tensor]

# What a run hands a penalty besides its configured coefficients, by parameter name:
# ū, the running mean of u (up_rlhf), and log π_θ/π_ref per sample (var_kl).
RUN_STATE_INPUTS = ("running_mean", "log_ratio")
# Where the KL to the reference goes under ``kl.placement: auto``: the classic per-token k1 in the
# reward, a differentiable loss term, or nowhere else because the penalty holds its own KL term.
KL_PLACEMENTS = ("reward", "loss", "penalty")


@dataclass(frozen=True)
class Penalty:
    """A registered penalty: its function, its coefficients, and what its registration declares.

    ``kl`` is where the KL to the reference goes when ``kl.placement`` is 'auto'
    ('loss' for UP-RLHF's Eq. 15 loss, 'reward' for the classic per-token k1,
    'penalty' when the penalty's own KL term replaces both); ``reads`` are the
    run-state inputs (``RUN_STATE_INPUTS``) it takes, which the run passes and a
    config does not set; ``needs_uncertainty`` is False only for penalties that
    mean something with a single reward model (u = 0).
    """

    name: str
    fn: PenaltyFn
    coefficients: tuple[str, ...]
    defaults: Mapping[str, object]
    non_negative: frozenset[str]
    kl: str = "reward"
    reads: tuple[str, ...] = ()
    needs_uncertainty: bool = True

    @classmethod
    def of(
        cls,
        name: str,
        fn: PenaltyFn,
        *,
        kl: str = "reward",
        reads: Iterable[str] = (),
        non_negative: Iterable[str] = (),
        needs_uncertainty: bool = True,
    ) -> Penalty:
        """The entry for ``fn(mean, std, *, coefficients...)``, its coefficients read from the signature."""
        params = list(inspect.signature(fn).parameters.values())
        coefficient_params = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if len(params) - len(coefficient_params) != 2:
            raise TypeError(
                f"penalty {name!r} must take (mean, std) positionally and its "
                "coefficients as keyword-only parameters"
            )
        coefficients = tuple(p.name for p in coefficient_params)
        if "member" in coefficients:
            raise TypeError(f"penalty {name!r}: 'member' is reserved (which member's reward a run trains against)")
        strengths = frozenset(non_negative)
        if not strengths <= set(coefficients):
            raise TypeError(
                f"penalty {name!r}: non_negative names {sorted(strengths - set(coefficients))} "
                f"are not among its coefficients {list(coefficients)}"
            )
        reads = tuple(reads)
        if not set(reads) <= set(coefficients) or not set(reads) <= set(RUN_STATE_INPUTS):
            raise TypeError(
                f"penalty {name!r}: reads {list(reads)} must be keyword-only parameters of it "
                f"and run-state inputs ({', '.join(RUN_STATE_INPUTS)})"
            )
        if kl not in KL_PLACEMENTS:
            raise TypeError(f"penalty {name!r}: kl must be one of {KL_PLACEMENTS}, got {kl!r}")
        defaults = {p.name: p.default for p in coefficient_params if p.default is not p.empty}
        return cls(
            name=name,
            fn=fn,
            coefficients=coefficients,
            defaults=MappingProxyType(defaults),
            non_negative=strengths,
            kl=kl,
            reads=reads,
            needs_uncertainty=needs_uncertainty,
        )

    @property
    def required(self) -> tuple[str, ...]:
        """Coefficients without a default, which every call must pass."""
        return tuple(c for c in self.coefficients if c not in self.defaults)

    @property
    def configurable(self) -> tuple[str, ...]:
        """The coefficients a config may set: all but the run-state inputs it reads."""
        return tuple(c for c in self.coefficients if c not in self.reads)

    def __call__(self, member_rewards: Tensor, *, member: int | None = None, **coefficients: object) -> Tensor:
        """Shape ``member_rewards`` [B, K] into rewards [B], checking coefficients first.

        With ``member`` = i the penalty shapes member i's reward r_i instead of the
        ensemble mean; u is still the whole ensemble's.
        """
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
        if member is not None:
            k = member_rewards.shape[1]
            if not 0 <= member < k:
                raise ValueError(f"penalty {self.name!r}: member {member} is out of range for K = {k} members (0 to {k - 1})")
            mean = member_rewards[:, member]
        return self.fn(mean, std, **values)


# ``@PENALTIES.register(name, kl=..., reads=..., non_negative=..., needs_uncertainty=...)`` on
# ``fn(mean, std, *, ...)``; ``non_negative`` names the coefficients that must be >= 0 (penalty
# strengths: a negative one would reward uncertainty instead of penalising it).
PENALTIES: Registry[Penalty] = Registry("penalty", make=Penalty.of)


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


def penalize_in_run(
    name: str,
    member_rewards: Tensor,
    coefficients: Mapping[str, float],
    *,
    running_mean: float,
    log_ratio: Tensor,
    member: int | None = None,
) -> Tensor:
    """``penalize`` with the configured coefficients plus the run-state inputs the penalty declares it reads."""
    state = {"running_mean": running_mean, "log_ratio": log_ratio}
    penalty = PENALTIES.get(name)
    return penalty(member_rewards, member=member, **coefficients, **{k: state[k] for k in penalty.reads})


def penalize(name: str, member_rewards: Tensor, *, member: int | None = None, **coefficients: object) -> Tensor:
    """Shaped rewards [B] from member rewards [B, K] with the penalty called ``name`` (of member ``member``'s reward if set)."""
    return PENALTIES.get(name)(member_rewards, member=member, **coefficients)


@PENALTIES.register("mean", needs_uncertainty=False)
def _mean(mean: Tensor, std: Tensor) -> Tensor:
    """The plain ensemble mean (or the one member's reward): no uncertainty penalty, the baseline."""
    return mean


@PENALTIES.register("lcb", non_negative=("lam",))
def _lcb(mean: Tensor, std: Tensor, *, lam: float = 1.0) -> Tensor:
    """Lower confidence bound m - λ·u: pessimism where the members disagree."""
    return mean - lam * std


@PENALTIES.register("uwo", non_negative=("lam",))
def _uwo(mean: Tensor, std: Tensor, *, lam: float = 1.0) -> Tensor:
    """Uncertainty-weighted optimisation m - λ·u²: penalises the variance."""
    return mean - lam * std.square()


@PENALTIES.register("up_rlhf", kl="loss", reads=("running_mean",), non_negative=("beta",))
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


@PENALTIES.register("var_kl", kl="penalty", reads=("log_ratio",), non_negative=("beta", "power"))
def _var_kl(
    mean: Tensor, std: Tensor, *, beta: float = 1.0, power: float = 1.0, log_ratio: Tensor
) -> Tensor:
    """m - β·u^p·log(π_θ/π_ref): the sequence KL penalty weighted per sample by the ensemble's spread.

    Paper 002 (variance-aware RLHF): the policy may drift from the reference where
    the ensemble agrees and is held close where it does not. ``power`` p = 1 weights
    by σ, as its experiments do (R_i = r_i - β·σ·ln π/π_0); p = 2 by σ², as its
    theorem does. This term is the run's KL penalty: registered ``kl="penalty"``, so
    no per-token k1 KL is added to the reward beside it.
    """
    if log_ratio.shape != mean.shape:
        raise ValueError(
            f"penalty 'var_kl': log_ratio must be [B] = {tuple(mean.shape)}, "
            f"got {tuple(log_ratio.shape)}"
        )
    return mean - beta * std.pow(power) * log_ratio

"""Rewards beside the ensemble: plain Python rules (format checks, length, verifiers) added to its reward.

A run's config names each rule by import path (``extra_rewards: [{fn: "pkg.mod:func",
weight: 0.1}]``, ``uprlhf.rl.config.ExtraReward``). A rule is batched::

    def func(prompts: list[str], responses: list[str]) -> Sequence[float]: ...

one finite number per (prompt, response), in batch order (a list, tuple, NumPy array
or 1-d tensor). The scorer calls every rule on each training batch beside the
ensemble, and the reward the policy trains on is the penalised ensemble reward plus
Σ weight·rule. A rule that raises, or returns the wrong number of values or a
non-finite one, fails the step with an ``ExtraRewardError`` naming the rule, the
step and the sample: a silently dropped or zeroed rule would train a different
objective than the config says.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from uprlhf.rl.config import ExtraReward

ExtraRewardFn = Callable[[list[str], list[str]], Sequence[float]]


class ExtraRewardError(RuntimeError):
    """An extra reward rule failed on a batch; the message names the rule, the step and the sample."""


def resolve_callable(path: str) -> ExtraRewardFn:
    """The callable that ``"package.module:attribute"`` names, imported (never evaluated as code).

    ``attribute`` may be dotted (``module:Class.method``). Raises ValueError saying
    what is wrong: the form, a module that does not import, a missing attribute, an
    object that is not callable or cannot take ``(prompts, responses)``.
    """
    module_name, sep, attribute = path.partition(":")
    parts = attribute.split(".")
    if not sep or not all(p.isidentifier() for p in module_name.split(".")) or not all(p.isidentifier() for p in parts):
        raise ValueError("expected an import path 'package.module:function'")
    try:
        found = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing user code is a config problem to report
        raise ValueError(f"cannot import module {module_name!r} ({type(err).__name__}: {err})") from None
    for depth, part in enumerate(parts):
        if not hasattr(found, part):
            raise ValueError(f"{'.'.join([module_name, *parts[:depth]])!r} has no attribute {part!r}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"not callable (type {type(found).__name__})")
    try:
        signature = inspect.signature(found)
    except ValueError:  # no signature to read (some builtins): the first call checks the arguments
        return found
    try:
        signature.bind([], [])
    except TypeError:
        raise ValueError(f"must take (prompts, responses), got signature {signature}") from None
    return found


def call_rule(fn: ExtraRewardFn, path: str, prompts: list[str], responses: list[str], step: int) -> Tensor:
    """One rule's values on a batch as float32 [B]; ``ExtraRewardError`` if it raises or returns a bad value."""
    where = f"extra reward {path!r} at step {step}"
    try:
        returned = fn(list(prompts), list(responses))
    except Exception as err:  # the rule is user code: any error it raises fails the step, named
        raise ExtraRewardError(f"{where}: raised {type(err).__name__}: {err} (on the batch of {len(prompts)} samples)") from err
    try:
        values = torch.as_tensor(returned, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ExtraRewardError(f"{where}: returned {type(returned).__name__}, not one number per sample ({err})") from None
    if values.dim() != 1 or len(values) != len(prompts):
        raise ExtraRewardError(f"{where}: returned shape {tuple(values.shape)} for {len(prompts)} samples; "
                               "expected one number per sample")
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ExtraRewardError(f"{where}: returned {values[bad[0]].item()} for sample {bad[0]} "
                               f"(response {responses[bad[0]][:80]!r}); every value must be finite")
    return values.to(torch.float32)


class ExtraRewards:
    """The configured rules, imported once in the process that calls them (the scorer)."""

    def __init__(self, configs: Sequence[ExtraReward]):
        self.rules = []
        for config in configs:
            try:
                self.rules.append((config.label, config.fn, resolve_callable(config.fn)))
            except ValueError as err:  # it imported where the config loaded, but not in this process
                raise ExtraRewardError(f"extra reward {config.fn!r}: {err} here, on the scorer; "
                                       "its module must be importable on every node") from None

    def __call__(self, prompts: list[str], responses: list[str], step: int) -> dict[str, Tensor]:
        """Every rule's values [B] by name, in config order."""
        return {name: call_rule(fn, path, prompts, responses, step) for name, path, fn in self.rules}


def add_extras(penalized: Tensor, extras: Mapping[str, Tensor], configs: Sequence[ExtraReward]) -> Tensor:
    """The reward the policy trains on [B]: the penalised ensemble reward plus Σ weight·extra."""
    total = penalized.clone()
    for config in configs:
        total += config.weight * extras[config.label].to(total.dtype)
    return total


def extra_metrics(extras: Mapping[str, Tensor]) -> dict[str, float]:
    """Each rule's batch mean (unweighted) as a per-step metric ``reward_extra/<name>``."""
    return {f"reward_extra/{name}": float(values.mean()) for name, values in extras.items()}


"""The placement plan: roles by name, each a count of identical bundles, in one placement group.

A job writes its plan once (``rl_plan``, ``sampling_plan``), reserves it, and builds
every role group from it by name; bundle indices are the plan's business, never the
job's. A Ray Tune trial reserves the same plan for its run (``trial_bundles``) and
hands the run its group explicitly (``plan.reserve(..., adopt=group)``), which is
checked bundle for bundle against the plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import PlacementError
from actors.group import RoleGroup
from uprlhf.config import RLConfig, SampleAndScoreConfig
from uprlhf.sft.config import SFTConfig

PLACEMENT_TIMEOUT_S = 300


@dataclass(frozen=True)
class RoleSpec:
    """``count`` actors of one role, each holding one bundle of ``cpus`` and ``gpus``."""

    count: int
    cpus: float
    gpus: float = 0.0

    @property
    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in {"CPU": self.cpus, "GPU": self.gpus}.items() if v > 0}


class PlacementPlan:
    """Roles in order; role ``name`` holds bundles ``indices(name)`` of the plan's group."""

    def __init__(self, roles: dict[str, RoleSpec]):
        self.roles = {name: spec for name, spec in roles.items() if spec.count > 0}

    def bundles(self) -> list[dict[str, float]]:
        return [spec.bundle for spec in self.roles.values() for _ in range(spec.count)]

    def indices(self, role: str) -> list[int]:
        if role not in self.roles:
            raise PlacementError(f"the placement plan has no role {role!r}; it has {', '.join(self.roles)}")
        start = 0
        for name, spec in self.roles.items():
            if name == role:
                return list(range(start, start + spec.count))
            start += spec.count
        raise AssertionError("unreachable")

    def totals(self) -> dict[str, float]:
        return {r: sum(b.get(r, 0.0) for b in self.bundles()) for r in ("CPU", "GPU")}

    def reserve(self, name: str, *, adopt: PlacementGroup | None = None) -> Placement:
        """A placement group holding the plan, or ``adopt`` (a Tune trial's group, checked against the plan).

        Raises PlacementError when the cluster cannot hold the plan or the adopted group does not match it.
        """
        plan = self.bundles()
        if adopt is not None:
            held = adopt.bundle_specs
            if len(held) != len(plan) or any(b.get(r, 0) > h.get(r, 0) + 1e-9 for b, h in zip(plan, held) for r in b):
                raise PlacementError(f"placement group {held} does not hold the placement plan {plan} bundle for bundle")
            return Placement(self, adopt, owned=False)
        have = ray.cluster_resources()
        for resource, need in self.totals().items():
            if need > have.get(resource, 0) + 1e-9:
                raise PlacementError(
                    f"the placement plan needs {need:g} {resource} but the cluster has {have.get(resource, 0):g}; "
                    "lower rollout/learner cpus_per_worker, scorer_cpus or the worker counts"
                )
        group = placement_group(plan, strategy="PACK", name=f"{name}-{time.time_ns()}")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise PlacementError(f"could not place {plan} within {PLACEMENT_TIMEOUT_S} s (resources held by other jobs?)") from None
        return Placement(self, group, owned=True)


class Placement:
    """A reserved plan: builds role groups in their bundles and releases the group it owns."""

    def __init__(self, plan: PlacementPlan, group: PlacementGroup, *, owned: bool):
        self.plan, self.pg, self.owned = plan, group, owned

    def actor(self, role: str, index: int, actor_class: type, *args: Any) -> Any:
        """Actor ``index`` of ``role``: ``actor_class(*args)`` as a Ray actor in its bundle."""
        spec = self.plan.roles[role]
        return ray.remote(actor_class).options(
            num_cpus=spec.cpus,
            num_gpus=spec.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.plan.indices(role)[index]),
        ).remote(*args)

    def group(self, role: str, actor_class: type, args: tuple | Callable[[int], tuple], **options: Any) -> RoleGroup:
        """Every actor of ``role``, built with ``args`` (or actor i with ``args(i)``), also when the group rebuilds one."""
        arguments = args if callable(args) else (lambda i: args)
        return RoleGroup(
            role, actor_class, lambda i: self.actor(role, i, actor_class, *arguments(i)), self.plan.roles[role].count, **options
        )

    def release(self) -> None:
        """Remove the group if the run reserved it (an adopted Tune trial's group is Tune's to remove)."""
        if self.owned:
            remove_placement_group(self.pg)


def sampling_roles(cfg: SampleAndScoreConfig) -> dict[str, RoleSpec]:
    """The roles of every job that samples the policy and scores the samples."""
    return {
        "rollout": RoleSpec(cfg.rollout.num_workers, cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker),
        "scorer": RoleSpec(1, cfg.scorer_cpus, cfg.scorer_gpus),
    }


def sampling_plan(cfg: SampleAndScoreConfig) -> PlacementPlan:
    """R rollout workers and the reward scorer (best-of-n, offline refinement)."""
    return PlacementPlan(sampling_roles(cfg))


def rl_plan(cfg: RLConfig) -> PlacementPlan:
    """A PPO run: R rollout workers, the scorer, W learner ranks and, when refining, the selector.

    The replay buffer takes no CPU and no bundle (it only moves Arrow tables).
    """
    return PlacementPlan(
        {
            **sampling_roles(cfg),
            "learner": RoleSpec(cfg.learner.num_workers, cfg.learner.cpus_per_worker, 1.0 if cfg.learner.use_gpu else 0.0),
            "selector": RoleSpec(1 if cfg.selector.enabled else 0, cfg.selector.cpus, cfg.selector.gpus),
        }
    )


def sft_plan(cfg: SFTConfig) -> PlacementPlan:
    """Supervised fine-tuning: W learner ranks."""
    learner = cfg.learner
    return PlacementPlan({"learner": RoleSpec(learner.num_workers, learner.cpus_per_worker, 1.0 if learner.use_gpu else 0.0)})


def trial_bundles(plan: PlacementPlan, driver_cpus: float) -> list[dict[str, float]]:
    """A Tune trial's bundles: the plan's, with the driver's CPUs added to bundle 0 (where Tune starts the trainable).

    Given an empty head bundle before these, Tune reserves exactly them, so the trial's
    group can be adopted by the plan (the driver's share rides beside the plan's first bundle).
    """
    bundles = [dict(b) for b in plan.bundles()]
    bundles[0]["CPU"] = bundles[0].get("CPU", 0.0) + driver_cpus
    return bundles


def threads_for(cpus: float, configured: int | None) -> int:
    """Torch threads of an actor: the configured number, else its CPUs rounded up."""
    return configured or math.ceil(cpus)

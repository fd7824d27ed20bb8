"""The placement plan: roles by name hold consecutive bundles; a trial's bundles carry the driver in bundle 0."""

import pytest

from actors import PlacementError
from actors.placement import PlacementPlan, RoleSpec, rl_plan, sampling_plan, threads_for, trial_bundles
from tests.conftest import tiny_rl_tree
from uprlhf.config import RLConfig, build


def test_roles_hold_consecutive_bundles_in_plan_order_and_empty_roles_none():
    plan = PlacementPlan({"a": RoleSpec(2, 0.5), "b": RoleSpec(1, 1.0, 1.0), "c": RoleSpec(0, 1.0), "d": RoleSpec(3, 0.25)})
    assert plan.bundles() == [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}] + [{"CPU": 0.25}] * 3
    assert plan.indices("a") == [0, 1] and plan.indices("b") == [2] and plan.indices("d") == [3, 4, 5]
    assert plan.totals() == {"CPU": 2.75, "GPU": 1.0}
    with pytest.raises(PlacementError, match="no role 'c'; it has a, b, d"):
        plan.indices("c")


def test_rl_plan_names_every_role_of_a_ppo_run():
    tree = tiny_rl_tree("policy", "checkpoint", "prompts.parquet", **{"rollout.num_workers": 2, "selector.strategy": "random"})
    cfg = build(RLConfig, tree)
    plan = rl_plan(cfg)
    assert list(plan.roles) == ["rollout", "scorer", "learner", "selector"]
    assert plan.indices("rollout") == [0, 1] and plan.indices("scorer") == [2]
    assert plan.indices("learner") == [3, 4] and plan.indices("selector") == [5]
    assert list(sampling_plan(cfg).roles) == ["rollout", "scorer"]
    assert trial_bundles(plan, 0.25)[0] == {"CPU": 0.5} and trial_bundles(plan, 0.25)[1:] == plan.bundles()[1:]


def test_threads_default_to_the_reserved_cpus_rounded_up():
    assert threads_for(0.25, None) == 1 and threads_for(1.5, None) == 2 and threads_for(0.25, 4) == 4

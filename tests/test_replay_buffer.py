"""The replay-buffer actor: appends from the driver survive the actor being killed."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest


def rows(step: int, n: int) -> dict[str, list]:
    """``n`` valid samples of one step; prompts and rewards name their (step, sample)."""
    return {
        "sample": list(range(n)),
        "prompt": [f"prompt {step}.{i}" for i in range(n)],
        "response": [f"response {step}.{i}" for i in range(n)],
        "prompt_ids": [[step, i] for i in range(n)],
        "response_ids": [[i] for i in range(n)],
        "logprobs": [[-0.5]] * n,
        "ref_logprobs": [[-0.25]] * n,
        "member_rewards": [[step + i, step + i + 0.25] for i in range(n)],
        "reward_mean": [step + i + 0.125 for i in range(n)],
        "reward_std": [0.125] * n,
        "penalized_reward": [step + i for i in range(n)],
        "gold": [None] * n,
        "policy_version": [step] * n,
        "policy_lag": [0] * n,
        "ensemble_version": [0] * n,
    }


def test_actor_appends_reads_and_survives_kill(local_ray, tmp_path):
    from actors.replay_buffer import ReplayBufferActor

    ray = local_ray
    actor = ray.remote(ReplayBufferActor).remote(str(tmp_path))
    ray.get(actor.append.remote(0, rows(0, n=2)))
    ray.get(actor.append.remote(1, pa.table(rows(1, n=3))))
    with pytest.raises(ValueError, match="step 1 is already"):
        ray.get(actor.append.remote(1, rows(1, n=1)))
    table = ray.get(actor.table.remote())
    assert table["step"].to_pylist() == [0, 0, 1, 1, 1]
    assert table["prompt"].to_pylist()[2] == "prompt 1.0"
    assert table["member_rewards"].to_pylist()[4] == [3.0, 3.25]
    assert ray.get(actor.steps.remote()) == [0, 1]
    assert ray.get(actor.num_rows.remote()) == 5
    assert ray.get(actor.rows_after.remote(0))["step"].to_pylist() == [1, 1, 1]
    assert ray.get(actor.rows_after.remote(-1)).num_rows == 5
    assert ray.get(actor.rows_after.remote(1)).num_rows == 0
    assert ray.get(actor.columns.remote(["step", "prompt"])).to_pylist()[2] == {"step": 1, "prompt": "prompt 1.0"}

    ray.kill(actor)
    revived = ray.remote(ReplayBufferActor).remote(str(tmp_path))
    assert ray.get(revived.steps.remote()) == [0, 1]
    assert ray.get(revived.table.remote()).to_pylist() == table.to_pylist()

    ray.get(revived.truncate.remote(0))
    assert ray.get(revived.num_rows.remote()) == 2
    assert ray.get(revived.table.remote())["prompt"].to_pylist() == ["prompt 0.0", "prompt 0.1"]
    ray.kill(revived)


def wait_until_dead(ray, handle, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.steps.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers")


def test_the_group_rebuilds_a_dead_buffer_from_its_shards_and_retries_the_append(local_ray, tmp_path):
    """A buffer killed after a step's shard was written: the rebuilt one drops steps past the last completed one,
    so the retried append writes the step again instead of refusing it as a duplicate."""
    from actors.replay_buffer import replay_group

    completed = {"step": 0}
    group = replay_group(str(tmp_path), max_retries=1, last_step=lambda: completed["step"])
    group.append(0, rows(0, n=2))
    group.append(1, rows(1, n=3))  # written, but the driver never saw step 1 complete
    local_ray.kill(group.handles[0])
    wait_until_dead(local_ray, group.handles[0])  # a kill lands asynchronously: a call sent first could still run
    group.append(1, rows(1, n=3))
    assert group.steps() == [0, 1] and group.num_rows() == 5
    group.kill()


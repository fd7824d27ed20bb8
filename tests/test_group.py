"""Role groups: one call fans out as each method declares, and a dead actor is rebuilt and the call retried."""

import sys

import pytest
from ray import cloudpickle

from actors import RoleError
from actors.group import RoleGroup, dispatch, every, first, split, to_first


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy roles travel to Ray's workers by value


def halves(n: int, items: list[int], offset: int):
    return [((part, offset + i), {}) for i, part in enumerate(split(items, n))]


def flatten(parts: list[list[int]]) -> list[int]:
    return [x for part in parts for x in part]


class Counter:
    """A toy role: adds its own offset to the items it gets; remembers restarts through on_restart."""

    def __init__(self, index: int):
        self.index, self.seen = index, 0

    @dispatch(halves, flatten, timed=True)
    def add(self, items: list[int], offset: int) -> tuple[list[int], float]:
        return [x + offset for x in items], float(self.index + 1)

    @dispatch(to_first, first)
    def whoami(self) -> int:
        return self.index

    @dispatch(gather=every)
    def mark(self) -> int:
        self.seen += 1
        return self.seen

    def pid(self) -> int:
        import os

        return os.getpid()


def kill_and_wait(ray, handle) -> None:
    """``ray.kill`` returns before the actor is gone: wait until a call on it fails, so the test does not race it."""
    from ray.exceptions import RayActorError

    import time

    ray.kill(handle)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(handle.pid.remote(), timeout=60)
        except RayActorError:
            return
        time.sleep(0.1)  # the call ran before the kill took effect
    pytest.fail("the killed actor still answers")


def make_group(ray, count: int, **options) -> RoleGroup:
    return RoleGroup("counter", Counter, lambda i: ray.remote(num_cpus=0)(Counter).remote(i), count, **options)


def test_split_gives_contiguous_nonempty_slices():
    assert split([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split([1], 3) == [[1]]


def test_a_call_is_split_and_joined_as_the_method_declares(local_ray):
    group = make_group(local_ray, 2)
    try:
        # actor 0 gets [1, 2] with offset 10, actor 1 gets [3] with offset 11; seconds are the slowest actor's
        assert group.add([1, 2, 3], 10) == ([11, 12, 14], 2.0)
        assert group.whoami() == 0
        assert group.mark() == [1, 1]
        assert group.submit("mark").result() == [2, 2]
        with pytest.raises(AttributeError, match="no method 'nope'"):
            group.nope()
    finally:
        group.kill()


def test_a_dead_actor_is_rebuilt_brought_up_to_date_and_the_call_retried(local_ray):
    restarted = []
    group = make_group(local_ray, 2, max_retries=1, on_restart=lambda handle: restarted.append(local_ray.get(handle.whoami.remote())))
    try:
        before = local_ray.get(group.handles[1].pid.remote())
        kill_and_wait(local_ray, group.handles[1])
        assert group.add([1, 2, 3], 0) == ([1, 2, 4], 2.0)
        assert restarted == [1]
        assert local_ray.get(group.handles[1].pid.remote()) != before
    finally:
        group.kill()


def test_a_death_past_the_retries_is_one_role_error(local_ray):
    group = make_group(local_ray, 1, max_retries=0)
    kill_and_wait(local_ray, group.handles[0])
    with pytest.raises(RoleError, match="counter: whoami failed after 0 restart"):
        group.whoami()


class Sleeper:
    """A toy role whose actor 1 hangs on its first call, as a stopped process would."""

    def __init__(self, index: int, marker: str):
        self.index, self.marker = index, marker

    @dispatch(gather=every)
    def work(self) -> int:
        import os
        import time

        if self.index == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(600)
        return self.index


def test_a_hung_actor_past_its_deadline_is_named_killed_rebuilt_and_the_call_retried(local_ray, tmp_path, caplog):
    from actors.group import Deadline

    marker = str(tmp_path / "hung-once")
    group = RoleGroup("sleeper", Sleeper, lambda i: local_ray.remote(num_cpus=0)(Sleeper).remote(i, marker), 2,
                      max_retries=1, deadline=Deadline(first_s=5.0))
    try:
        with caplog.at_level("WARNING", logger="uprlhf"):
            assert group.work() == [0, 1]
        assert "sleeper [1]: work gave no answer within 5 s" in caplog.text
    finally:
        group.kill()


class Slow:
    """A toy role that answers after a fixed time."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    @dispatch(gather=first, timed=True)
    def work(self) -> tuple[str, float]:
        import time

        time.sleep(self.seconds)
        return "done", self.seconds


def test_a_driver_held_up_while_waiting_takes_no_actor_for_hung(local_ray, monkeypatch):
    """Each one-second slice of the wait appears to take 100 s (the driver stopped meanwhile): it counts as
    1.5 s at most, so an actor answering after 2.5 s beats an 8 s deadline."""
    import actors.group as group_module

    group = RoleGroup("slow", Slow, lambda i: local_ray.remote(num_cpus=0)(Slow).remote(2.5), 1)
    try:
        import time
        from types import SimpleNamespace

        local_ray.get(group.handles[0].__ray_ready__.remote())  # the actor's start-up is not the call's time
        pending = group.submit("work")
        calls = []

        def stopped_clock() -> float:
            calls.append(1)
            return time.perf_counter() + 100.0 * (len(calls) // 2)

        monkeypatch.setattr(group_module, "time", SimpleNamespace(perf_counter=stopped_clock))
        assert pending.wait(8.0) == []
        monkeypatch.undo()
        assert pending.result() == ("done", 2.5)
        assert group.submit("work").wait(0.5) == [0]  # a real half second is too short
    finally:
        group.kill()


def test_finish_redoes_a_call_whose_actor_died_after_it_was_submitted(local_ray):
    group = make_group(local_ray, 1, max_retries=1)
    try:
        import time

        pending, started = group.submit("add", [1, 2], 5), time.perf_counter()
        local_ray.get(pending.refs[0])
        kill_and_wait(local_ray, group.handles[0])
        dead = group.submit("add", [1, 2], 5)
        assert group.finish(dead, started, "add", [1, 2], 5) == ([6, 7], 1.0)
    finally:
        group.kill()

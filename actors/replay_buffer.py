"""The replay buffer as a Ray role (DESIGN §2): a thin adapter over ``uprlhf.rl.replay.ReplayBuffer``.

It takes no CPU and no bundle, as it only moves Arrow tables; every append is on disk
before it returns, so a new actor on the same folder picks up where a killed one stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.group import Deadline, RoleGroup, dispatch, first
from uprlhf.rl.replay import ReplayBuffer


class ReplayBufferActor:
    """One run's buffer; calls run one at a time, so appends and truncates never interleave."""

    def __init__(self, directory: str) -> None:
        self.buffer = ReplayBuffer(directory)

    @dispatch(gather=first)
    def append(self, step: int, rows: dict[str, list] | pa.Table) -> None:
        self.buffer.append(step, rows)

    @dispatch(gather=first)
    def truncate(self, after_step: int) -> None:
        self.buffer.truncate(after_step)

    @dispatch(gather=first)
    def table(self) -> pa.Table:
        return self.buffer.table()

    @dispatch(gather=first)
    def rows_after(self, step: int) -> pa.Table:
        """Rows of the steps after ``step``: what a selection round reads, without shipping the whole buffer."""
        table = self.buffer.table()
        return table.filter(pc.greater(table["step"], step))

    @dispatch(gather=first)
    def columns(self, names: list[str]) -> pa.Table:
        """Every row, only the named columns: what a run's end-of-run figures read, without the token ids."""
        return self.buffer.table().select(names)

    @dispatch(gather=first)
    def steps(self) -> list[int]:
        return self.buffer.steps()

    @dispatch(gather=first)
    def num_rows(self) -> int:
        return len(self.buffer)


def replay_group(directory: str, *, max_retries: int, last_step: Callable[[], int], deadline: Deadline | None = None) -> RoleGroup:
    """The run's buffer as a group of one; a rebuilt actor reads the shards back and drops steps past ``last_step()``.

    Dropping them makes a retried append idempotent: a step whose shard was written just
    before the actor died is written again, not refused as a duplicate.
    """
    return RoleGroup(
        "replay buffer",
        ReplayBufferActor,
        lambda i: ray.remote(num_cpus=0)(ReplayBufferActor).remote(directory),
        1,
        max_retries=max_retries,
        on_restart=lambda handle: ray.get(handle.truncate.remote(last_step())),
        deadline=deadline,
    )

"""The replay buffer as a Ray role (DESIGN §2): a thin adapter over ``uprlhf.rl.replay.ReplayBuffer``.

It takes no CPU, as it only moves Arrow tables; every append is on disk before it
returns, so a new actor on the same folder picks up where a killed one stopped.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from uprlhf.rl.replay import ReplayBuffer


@ray.remote(num_cpus=0)
class ReplayBufferActor:
    """One run's buffer; calls run one at a time, so appends and truncates never interleave."""

    def __init__(self, directory: str) -> None:
        self.buffer = ReplayBuffer(directory)

    def append(self, step: int, rows: dict[str, list] | pa.Table) -> None:
        self.buffer.append(step, rows)

    def truncate(self, after_step: int) -> None:
        self.buffer.truncate(after_step)

    def table(self) -> pa.Table:
        return self.buffer.table()

    def rows_after(self, step: int) -> pa.Table:
        """Rows of the steps after ``step``: what a selection round reads, without shipping the whole buffer."""
        table = self.buffer.table()
        return table.filter(pc.greater(table["step"], step))

    def steps(self) -> list[int]:
        return self.buffer.steps()

    def num_rows(self) -> int:
        return len(self.buffer)

"""The replay buffer of the RL loop: every policy sample with its rewards (DESIGN §1 refinement, §2).

The selector of the next refinement round and any later job read the policy's own
samples from here, so rows must be neither lost nor doubled: each RL step is one
Parquet shard written atomically (a killed writer leaves at most a hidden temp
file, which readers skip), a step is appended exactly once, and a run resumed from
an earlier checkpoint first truncates the steps it is about to redo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uprlhf.atomic import TEMP_SUFFIX, atomic_write, fsync_directory
from uprlhf.data.loaders import StrPath
from uprlhf.rl.gold_metrics import UNCERTAINTY_DIAGNOSTICS, uncertainty_diagnostics

_SHARD = re.compile(r"step_(\d{8,})\.parquet")


def _field(name: str, type_: pa.DataType, description: str, *, nullable: bool = False) -> pa.Field:
    """A schema field carrying its description, so every shard on disk documents itself."""
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


REPLAY_SCHEMA = pa.schema(
    [
        _field("step", pa.int64(), "RL step that produced the sample; one shard per step"),
        _field("sample", pa.int32(), "index of the sample within its step; unique per step"),
        _field("prompt", pa.string(), "prompt text as given to the policy"),
        _field("response", pa.string(), "response text the policy generated"),
        _field("prompt_ids", pa.list_(pa.int32()), "prompt token ids"),
        _field("response_ids", pa.list_(pa.int32()), "response token ids"),
        _field("logprobs", pa.list_(pa.float32()), "policy log-prob of each response token, from the rollout"),
        _field("ref_logprobs", pa.list_(pa.float32()), "reference-policy log-prob of each response token"),
        _field("member_rewards", pa.list_(pa.float32()), "reward of each of the K ensemble members"),
        _field("reward_mean", pa.float32(), "ensemble mean m of member_rewards"),
        _field("reward_std", pa.float32(), "ensemble uncertainty u: population std of member_rewards (divide by K)"),
        _field("penalized_reward", pa.float32(), "reward after the run's penalty (lcb, uwo, up_rlhf, ...)"),
        _field("gold", pa.float32(), "gold-scorer reward; null when not computed", nullable=True),
        _field("policy_version", pa.int64(), "version of the policy weights that generated the sample"),
        _field("policy_lag", pa.int32(), "versions between the weights that generated the sample and the weights its "
               "update started from: 0 on-policy, at most 1 with rl.async_steps=1"),
        _field("ensemble_version", pa.int64(), "version of the reward ensemble that scored the sample"),
    ]
)

# Responses are scored token by token, so these lists must be as long as response_ids.
_PER_TOKEN = ("logprobs", "ref_logprobs")


class ReplayBuffer:
    """Append-only buffer: Arrow tables in memory, one Parquet shard per step on disk.

    A new instance on the same folder sees every step appended before, so an actor
    that dies, or a resumed run, loses nothing.
    """

    def __init__(self, directory: StrPath) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(f".*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # from a writer killed mid-shard; never replaced a shard
        self._steps: dict[int, pa.Table] = {step: _read_shard(path, step) for step, path in _shards(self.directory)}

    def append(self, step: int, rows: Mapping[str, list] | pa.Table) -> None:
        """Validate the rows of one step, write its shard, then keep it in memory.

        ``rows`` may leave out ``step`` (it is filled in from ``step``). Raises
        ValueError, writing nothing, when the step is already present or a column is
        missing, extra, of the wrong type, or inconsistent.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        if step in self._steps:
            raise ValueError(f"step {step} is already in the replay buffer {self.directory}; a step is appended once")
        table = _validate(rows, step)
        atomic_write(_shard_path(self.directory, step), lambda handle: pq.write_table(table, handle), binary=True)
        fsync_directory(self.directory)
        self._steps[step] = table

    def truncate(self, after_step: int) -> None:
        """Drop every step after ``after_step``, so steps a resumed run redoes are not doubled."""
        for step in sorted((s for s in self._steps if s > after_step), reverse=True):
            _shard_path(self.directory, step).unlink(missing_ok=True)
            del self._steps[step]
        fsync_directory(self.directory)

    def table(self) -> pa.Table:
        """All rows, ordered by step then sample."""
        return _concat([self._steps[step] for step in self.steps()])

    def steps(self) -> list[int]:
        return sorted(self._steps)

    def __len__(self) -> int:
        return sum(table.num_rows for table in self._steps.values())


def read_replay(directory: StrPath) -> pa.Table:
    """Every row a buffer at ``directory`` holds, ordered by step then sample, without taking ownership.

    Unlike ``ReplayBuffer``, this neither creates the folder nor removes temp
    leftovers, so it is safe while a run is still appending.
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no replay buffer folder")
    return _concat([_read_shard(shard, step) for step, shard in _shards(path)])


def _shards(directory: Path) -> list[tuple[int, Path]]:
    """The complete shards of ``directory`` by step; temp files and anything else are skipped."""
    found = []
    for path in directory.iterdir():
        match = _SHARD.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _shard_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.parquet"


def _read_shard(path: Path, step: int) -> pa.Table:
    """One shard, checked like an append, so a foreign or edited file fails loudly here.

    A shard written before ``policy_lag`` existed comes from an on-policy run: it reads as lag 0.
    """
    try:
        table = pq.read_table(path)
        if "policy_lag" not in table.column_names:
            table = table.append_column("policy_lag", pa.array([0] * table.num_rows, pa.int32()))
        return _validate(table, step)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables) if tables else REPLAY_SCHEMA.empty_table()


def _validate(rows: Mapping[str, list] | pa.Table, step: int) -> pa.Table:
    """``rows`` as a table of exactly REPLAY_SCHEMA, sorted by sample; ValueError names the first problem."""
    if isinstance(rows, pa.Table):
        if len(set(rows.column_names)) != rows.num_columns:
            raise ValueError(f"duplicate column names: {rows.column_names}")
        columns: dict[str, object] = {name: rows.column(name) for name in rows.column_names}
    elif isinstance(rows, Mapping):
        columns = dict(rows)
    else:
        raise ValueError(f"rows: expected a dict of columns or a pyarrow.Table, got {type(rows).__name__}")
    names = set(REPLAY_SCHEMA.names)
    missing = [name for name in REPLAY_SCHEMA.names if name not in columns and name != "step"]
    if missing:
        raise ValueError(f"missing column(s): {', '.join(missing)}")
    extra = sorted(set(columns) - names)
    if extra:
        raise ValueError(f"unknown column(s): {', '.join(extra)}; allowed: {', '.join(REPLAY_SCHEMA.names)}")

    arrays = {name: _column(name, columns[name]) for name in REPLAY_SCHEMA.names if name in columns}
    lengths = {len(array) for array in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns differ in length: {({name: len(a) for name, a in arrays.items()})}")
    num_rows = lengths.pop()
    if "step" in arrays:
        wrong = pc.not_equal(arrays["step"], step)
        if pc.any(wrong).as_py():
            raise ValueError(f"step column holds {pc.unique(arrays['step']).to_pylist()}, appended as step {step}")
    else:
        arrays["step"] = pa.chunked_array([pa.array([step] * num_rows, pa.int64())])
    table = pa.Table.from_arrays([arrays[name] for name in REPLAY_SCHEMA.names], schema=REPLAY_SCHEMA)
    _check_values(table)
    return table.sort_by("sample")


def _column(name: str, values: object) -> pa.ChunkedArray:
    """One column converted to its schema type; only lossless numeric conversions are allowed."""
    expected = REPLAY_SCHEMA.field(name).type
    try:
        array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise ValueError(f"column {name}: expected {expected}: {error}") from error
    if not _convertible(array.type, expected):
        raise ValueError(f"column {name}: expected {expected}, got {array.type}")
    try:
        array = array.cast(expected, safe=True)
    except pa.ArrowInvalid as error:
        raise ValueError(f"column {name}: values do not fit {expected}: {error}") from error
    return array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])


def _convertible(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether a column of ``source`` may stand for ``target``: same kind of values, never text to numbers."""
    if source == target or pa.types.is_null(source):
        return True
    if pa.types.is_list(source) and pa.types.is_list(target):
        return _convertible(source.value_type, target.value_type)
    if pa.types.is_integer(source):
        return pa.types.is_integer(target) or pa.types.is_floating(target)
    return pa.types.is_floating(source) and pa.types.is_floating(target)


def _check_values(table: pa.Table) -> None:
    """What the schema cannot say: no nulls outside ``gold``, unique samples, consistent lengths."""
    for field in REPLAY_SCHEMA:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise ValueError(f"column {field.name}: {column.null_count} null value(s); only gold may be null")
        if pa.types.is_list(field.type) and pc.list_flatten(column).null_count:
            raise ValueError(f"column {field.name}: null inside a list")
    if pc.count_distinct(table.column("sample")).as_py() != table.num_rows:
        raise ValueError("column sample: indices repeat within the step")
    response_lengths = pc.list_value_length(table.column("response_ids")).to_pylist()
    for name in _PER_TOKEN:
        for row, length in enumerate(pc.list_value_length(table.column(name)).to_pylist()):
            if length != response_lengths[row]:
                tokens = response_lengths[row]
                raise ValueError(f"column {name}: row {row} has {length} values for {tokens} response tokens")
    members = set(pc.list_value_length(table.column("member_rewards")).to_pylist())
    if 0 in members or len(members) > 1:
        raise ValueError(f"column member_rewards: every row needs the same K >= 1 values, got {sorted(members)}")


# The columns ``replay_arrays`` reads (the token ids and texts stay where they are).
DIAGNOSTIC_COLUMNS = ["reward_std", "reward_mean", "gold", "logprobs", "ref_logprobs"]


def _sequence_sums(column: pa.ChunkedArray) -> np.ndarray:
    """Per row, the sum of its list of floats (0 for an empty list)."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float64)
    ends = np.concatenate([[0.0], np.cumsum(values)])[np.cumsum(lengths)]
    return np.diff(np.concatenate([[0.0], ends]))


def replay_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """u, KL, proxy and gold of a run's rows that have a gold and finite values (``row``: their row numbers),
    each sample's KL being Σ_t (log π − log π_ref) over its response tokens."""
    table = table.select(DIAGNOSTIC_COLUMNS)
    kl = _sequence_sums(table["logprobs"]) - _sequence_sums(table["ref_logprobs"])
    gold = table["gold"].to_numpy(zero_copy_only=False).astype(np.float64)  # a null gold reads as NaN
    u, proxy = (table[name].to_numpy(zero_copy_only=False).astype(np.float64) for name in ("reward_std", "reward_mean"))
    keep = np.isfinite(u) & np.isfinite(kl) & np.isfinite(proxy) & np.isfinite(gold)
    return {"uncertainty": u[keep], "kl": kl[keep], "proxy": proxy[keep], "gold": gold[keep], "row": np.flatnonzero(keep)}


def replay_diagnostics(table: pa.Table) -> dict[str, float | None]:
    """Whether a run's u saw its own errors: ``uncertainty_diagnostics`` over ``replay_arrays``."""
    arrays = replay_arrays(table)
    if not arrays["row"].size:
        return dict.fromkeys(UNCERTAINTY_DIAGNOSTICS)
    return uncertainty_diagnostics(arrays["uncertainty"], arrays["kl"], arrays["proxy"], arrays["gold"])

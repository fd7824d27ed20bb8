"""The replay buffer keeps every sample exactly once, on disk as in memory."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from uprlhf.rl.replay import REPLAY_SCHEMA, ReplayBuffer, read_replay, replay_diagnostics


def rows(step: int, n: int = 3, k: int = 2) -> dict[str, list]:
    """``n`` samples of one step whose values all derive from (step, sample), so any mix-up shows."""
    out: dict[str, list] = {name: [] for name in REPLAY_SCHEMA.names if name != "step"}
    for i in range(n):
        members = [step + i + 0.25 * m for m in range(k)]
        mean = sum(members) / k
        out["sample"].append(i)
        out["prompt"].append(f"prompt {step}.{i}")
        out["response"].append(f"response {step}.{i}")
        out["prompt_ids"].append([step, i])
        out["response_ids"].append(list(range(i + 1)))
        out["logprobs"].append([-0.5 * (t + 1) for t in range(i + 1)])
        out["ref_logprobs"].append([-0.25 * (t + 1) for t in range(i + 1)])
        out["member_rewards"].append(members)
        out["reward_mean"].append(mean)
        out["reward_std"].append(math.sqrt(sum((r - mean) ** 2 for r in members) / k))
        out["penalized_reward"].append(mean - 1.0)
        out["gold"].append(None if i == 0 else float(i))
        out["policy_version"].append(step)
        out["policy_lag"].append(0)
        out["ensemble_version"].append(7)
    return out


def test_every_field_is_documented():
    for field in REPLAY_SCHEMA:
        assert field.metadata[b"description"], field.name
    assert [f.name for f in REPLAY_SCHEMA if f.nullable] == ["gold"]


def test_round_trip_values(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    buffer.append(1, rows(1))
    table = buffer.table()
    assert table.schema == REPLAY_SCHEMA
    first, last = table.to_pylist()[0], table.to_pylist()[2]
    assert first["step"] == 1 and first["sample"] == 0
    assert first["prompt"] == "prompt 1.0" and first["response"] == "response 1.0"
    assert first["prompt_ids"] == [1, 0] and first["response_ids"] == [0]
    assert first["logprobs"] == [-0.5] and first["ref_logprobs"] == [-0.25]
    assert first["gold"] is None
    assert last["member_rewards"] == [3.0, 3.25]
    assert last["reward_mean"] == pytest.approx(3.125)
    assert last["reward_std"] == pytest.approx(0.125)
    assert last["penalized_reward"] == pytest.approx(2.125)
    assert last["gold"] == 2.0
    assert last["logprobs"] == [-0.5, -1.0, -1.5]
    assert (last["policy_version"], last["ensemble_version"]) == (1, 7)
    assert len(buffer) == 3 and buffer.steps() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.parquet"]


def test_table_is_ordered_by_step_then_sample(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    shuffled = rows(5)
    for values in shuffled.values():
        values.reverse()
    buffer.append(5, shuffled)
    buffer.append(2, pa.table({"step": [2] * 3, **rows(2)}))
    table = buffer.table()
    assert list(zip(table["step"].to_pylist(), table["sample"].to_pylist())) == [
        (2, 0), (2, 1), (2, 2), (5, 0), (5, 1), (5, 2)
    ]
    assert table["prompt"].to_pylist()[3] == "prompt 5.0"


def test_new_instance_and_read_replay_see_every_row(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    buffer.append(0, rows(0, n=2))
    buffer.append(1, rows(1, n=4))
    expected = buffer.table()

    reloaded = ReplayBuffer(tmp_path)
    assert reloaded.steps() == [0, 1] and len(reloaded) == 6
    assert reloaded.table().equals(expected)
    assert reloaded.table().to_pylist() == expected.to_pylist()
    assert read_replay(tmp_path).equals(expected)

    reloaded.append(2, rows(2, n=1))
    assert read_replay(tmp_path)["step"].to_pylist() == [0, 0, 1, 1, 1, 1, 2]


def test_empty_buffer_reads_as_empty_table(tmp_path):
    assert ReplayBuffer(tmp_path).table().equals(REPLAY_SCHEMA.empty_table())
    assert read_replay(tmp_path).schema == REPLAY_SCHEMA
    with pytest.raises(FileNotFoundError):
        read_replay(tmp_path / "absent")


def test_duplicate_step_refused(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    buffer.append(3, rows(3))
    with pytest.raises(ValueError, match="step 3 is already"):
        buffer.append(3, rows(3, n=1))
    with pytest.raises(ValueError, match="step 3 is already"):
        ReplayBuffer(tmp_path).append(3, rows(3, n=1))
    assert len(ReplayBuffer(tmp_path)) == 3


def _broken(change) -> dict[str, list]:
    values = rows(4)
    change(values)
    return values


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("reward_std"), "missing column.*reward_std"),
        (lambda r: r.update(extra=[1, 2, 3]), "unknown column.*extra"),
        (lambda r: r.update(reward_mean=["a", "b", "c"]), "column reward_mean: expected float"),
        (lambda r: r.update(sample=[0.5, 1.0, 2.0]), "column sample: expected int32, got double"),
        (lambda r: r.update(prompt=[1, 2, 3]), "column prompt: expected string, got int64"),
        (lambda r: r.update(prompt_ids=[[1], [2**40], [3]]), "column prompt_ids: values do not fit"),
        (lambda r: r.update(policy_version=[True, False, True]), "column policy_version: expected int64, got bool"),
        (lambda r: r.update(penalized_reward=[1.0, None, 2.0]), "column penalized_reward: 1 null"),
        (lambda r: r.update(logprobs=[[-1.0], [None, -1.0], [-1.0, -1.0, -1.0]]), "logprobs: null inside"),
        (lambda r: r.update(ref_logprobs=[[-1.0], [-1.0], [-1.0]]), "ref_logprobs: row 1 has 1 values for 2"),
        (lambda r: r.update(member_rewards=[[1.0], [1.0, 2.0], [1.0]]), "member_rewards: every row"),
        (lambda r: r.update(sample=[0, 1, 1]), "sample: indices repeat"),
        (lambda r: r.update(gold=[1.0, 2.0]), "columns differ in length"),
        (lambda r: r.update(step=[4, 4, 5]), r"step column holds \[4, 5\], appended as step 4"),
    ],
)
def test_bad_rows_refused_and_nothing_written(tmp_path, change, message):
    buffer = ReplayBuffer(tmp_path)
    with pytest.raises(ValueError, match=message):
        buffer.append(4, _broken(change))
    assert buffer.steps() == [] and len(buffer) == 0
    assert list(tmp_path.iterdir()) == []
    buffer.append(4, rows(4))  # the refused step stays free for the corrected rows
    assert len(buffer) == 3


def test_wrong_type_in_a_table_refused(tmp_path):
    table = pa.table(rows(0)).set_column(1, "prompt", pa.array([b"a", b"b", b"c"], pa.binary()))
    with pytest.raises(ValueError, match="column prompt: expected string, got binary"):
        ReplayBuffer(tmp_path).append(0, table)
    assert list(tmp_path.iterdir()) == []


def test_truncate_drops_later_steps_on_disk_and_in_memory(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    for step in range(5):
        buffer.append(step, rows(step, n=2))
    buffer.truncate(after_step=2)
    assert buffer.steps() == [0, 1, 2] and len(buffer) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_0000000{s}.parquet" for s in range(3)]
    assert ReplayBuffer(tmp_path).steps() == [0, 1, 2]
    buffer.append(3, rows(3, n=1))  # the redone step is accepted once more, not doubled
    assert read_replay(tmp_path)["step"].to_pylist() == [0, 0, 1, 1, 2, 2, 3]


def test_leftover_temp_file_ignored_and_cleaned(tmp_path):
    ReplayBuffer(tmp_path).append(0, rows(0))
    leftover = tmp_path / ".step_00000001.parquet.abc123.tmp"
    leftover.write_bytes(b"PAR1 half a shard")
    assert read_replay(tmp_path)["step"].to_pylist() == [0, 0, 0]
    assert leftover.exists()  # a reader never deletes what a live writer may still be writing

    buffer = ReplayBuffer(tmp_path)
    assert not leftover.exists() and buffer.steps() == [0]
    buffer.append(1, rows(1))
    assert buffer.steps() == [0, 1]


def test_foreign_shard_fails_loudly(tmp_path):
    ReplayBuffer(tmp_path).append(0, rows(0))
    (tmp_path / "step_00000000.parquet").rename(tmp_path / "step_00000009.parquet")
    with pytest.raises(ValueError, match=r"step_00000009.parquet: step column holds \[0\]"):
        ReplayBuffer(tmp_path)


def test_a_shard_from_before_policy_lag_reads_as_on_policy(tmp_path):
    import pyarrow.parquet as pq

    buffer = ReplayBuffer(tmp_path)
    buffer.append(0, rows(0))
    shard = next(tmp_path.glob("*.parquet"))
    old = pq.read_table(shard)
    pq.write_table(old.drop_columns(["policy_lag"]), shard)
    table = read_replay(tmp_path)
    assert table.schema == REPLAY_SCHEMA and table["policy_lag"].to_pylist() == [0, 0, 0]
    assert table["response"].to_pylist() == old["response"].to_pylist()


def test_diagnostics_read_only_rows_with_a_gold_and_finite_values_and_each_samples_summed_kl():
    """Samples 1..4 have 2..5 tokens of log π − log π_ref = 1, 0.5, 0.6, 0.1: KL (the sum) 2, 1.5, 2.4, 0.5,
    which ranks them 3 2 4 1 (their means would rank them 4 2 3 1).

    Proxy 1..4 rises as gold 4..1 falls, so samples 3 and 4 are hacked; their u (0.4, 0.3) tops the others'
    (AUROC 1). u ranks 1 2 4 3 against KL's 3 2 4 1: Σd² = 8, ρ = 1 − 6·8 / (4·15) = 0.2 (the means' −0.4).
    Sample 0 has no gold and sample 5 no finite u; counted, either would change both figures.
    """
    step = rows(0, n=6)
    step.update(gold=[None, 4.0, 3.0, 2.0, 1.0, 0.0], reward_mean=[9.0, 1.0, 2.0, 3.0, 4.0, 9.0],
                reward_std=[9.0, 0.1, 0.2, 0.4, 0.3, math.nan])
    step["ref_logprobs"] = [[-1.0] * (i + 1) for i in range(6)]
    step["logprobs"] = [[-1.0 + d] * (i + 1) for i, d in enumerate([0.0, 1.0, 0.5, 0.6, 0.1, 0.0])]
    figures = replay_diagnostics(pa.table(step))
    # u ranks 1 2 4 3 against the proxy's 1 2 3 4: Σd² = 2, ρ = 0.8
    assert figures == {"u_kl_spearman_samples": pytest.approx(0.2), "u_hacked_auroc": 1.0, "u_hacked_auroc_high_proxy": None,
                       "u_proxy_spearman": pytest.approx(0.8)}
    step["gold"] = [None] * 6
    assert replay_diagnostics(pa.table(step)) == dict.fromkeys(["u_kl_spearman_samples", "u_hacked_auroc", "u_hacked_auroc_high_proxy",
                                                                "u_proxy_spearman"])

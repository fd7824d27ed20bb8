"""jobs.ppo end to end on tiny models: outputs, resume after a kill, actor restarts, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.common import read_json
from tests.conftest import ListeningSockets, tiny_rl_tree
from uprlhf.config import RLConfig, build, load_config
from uprlhf.rl.replay import read_replay

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "tokens_per_second", "ray_overhead", "step_seconds")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def maths(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING)}


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        ma, mb = maths(ra), maths(rb)
        assert ma.keys() == mb.keys()
        for key in ma:
            assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-5), (ra["step"], key)


GOLDEN = ROOT / "tests" / "data" / "ppo_golden"


@pytest.fixture(scope="module")
def tree():
    """The tiny run recorded in tests/data/ppo_golden: its stored models and prompts (models built in
    another process differ, so a recording can only be reproduced from stored ones)."""
    return tiny_rl_tree(GOLDEN / "policy", GOLDEN / "final", GOLDEN / "rl_prompts.parquet", **{"ppo.steps": 6})


@pytest.fixture(scope="module")
def reference(local_ray, tree, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run that the resumed and the faulty runs must reproduce."""
    from jobs.drivers.ppo import run_ppo

    out = tmp_path_factory.mktemp("uninterrupted")
    with ListeningSockets() as sockets:
        summary = run_ppo(build(RLConfig, tree), out)
    return out, summary, sockets.found


def test_no_socket_of_a_run_listens_beyond_loopback(reference):
    """The learner ranks' store and gloo sockets, Ray's own ports: all on 127.0.0.1 during a whole run."""
    assert reference[2] == set()


def test_run_writes_metrics_replay_checkpoints_and_summary(reference):
    tmp_path, summary, _ = reference
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == list(range(6))
    assert all(r["policy_version"] == r["step"] + 1 for r in rows)
    assert [r["step"] for r in rows if "gold" in r] == [0, 2, 4]
    table = read_replay(tmp_path / "replay")
    assert table.num_rows == 6 * 4 and table["step"].to_pylist() == [s for s in range(6) for _ in range(4)]
    assert all(len(m) == 3 for m in table["member_rewards"].to_pylist())
    assert read_json(tmp_path / "checkpoints" / "latest.json")["step"] == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000005"]
    assert (tmp_path / "checkpoints" / "step_000005" / "policy" / "adapter_model.safetensors").exists()
    for key in ("gold_final", "gold_best", "gold_at_matched_kl", "kl_final", "uncertainty_mean"):
        assert key in summary
    assert summary["replay_rows"] == 24
    assert set(summary["seconds_per_stage"]) == {"generate", "score", "train", "sync", "evaluate"}


def test_stopped_then_killed_job_resumes_step_for_step(reference, tree, tmp_path, caplog):
    """The driver stopped (SIGSTOP) for longer than every deadline, continued, later killed (SIGKILL) and
    started again (in this process, on the session's Ray: the resume is the same code however the job starts):
    no actor is taken for hung, the resume redoes the steps after the checkpoint, the run is unchanged."""
    from jobs.drivers.ppo import run_ppo

    reference = reference[0]
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({**tree, "deadline_floor_s": 4.0, "deadline_multiple": 2.0, "deadline_first_s": 120.0}))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "jobs.ppo", "--config", str(config), "--output-dir", str(out)]
    env = {**os.environ, "UPRLHF_DASHBOARD": "0", "RAY_ADDRESS": ""}
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def wait_until(done, what: str) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not done():
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before {what}"

    latest = out / "checkpoints" / "latest.json"
    wait_until(lambda: (out / "metrics.jsonl").exists() and len(records(out)) >= 3, "it could be stopped")
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(7)  # past the 4 s floor of every deadline learnt by now (tiny calls take well under 1 s)
    os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: latest.exists() and read_json(latest)["step"] == 3, "it could be killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "gave no answer" not in first_log.read_text()
    with caplog.at_level("INFO", logger="uprlhf"):
        run_ppo(load_config(RLConfig, config), out)
    assert "resuming after step 3" in caplog.text
    assert_same_run(records(out), records(reference))
    table = read_replay(out / "replay")
    assert table["step"].to_pylist() == [s for s in range(6) for _ in range(4)]
    assert table["response"].to_pylist() == read_replay(reference / "replay")["response"].to_pylist()


def test_dead_replay_buffer_rollout_worker_scorer_and_learner_rank_are_recovered_and_the_run_unchanged(reference, tree, tmp_path):
    """Under the learner's broadcast group, the weight sync a lost rank breaks; the object store (the reference
    run's sync) is the one the hung-actor test rebuilds under, so each sync sees a rebuilt learner rank."""
    import ray

    from jobs.drivers.ppo import run_ppo

    killed = []
    plan = {1: "replay", 2: "rollout", 3: "scorer", 4: "learner"}

    def kill(step: int, actors: dict) -> None:
        role = plan.get(step)
        if role and role not in killed:  # a rebuilt run calls the hook again for the steps it redoes
            ray.kill(actors[role][-1])
            killed.append(role)

    run_ppo(build(RLConfig, {**tree, "weight_sync": "broadcast"}), tmp_path / "faults", on_step=kill)
    assert killed == ["replay", "rollout", "scorer", "learner"]
    table = read_replay(tmp_path / "faults" / "replay")
    assert table["step"].to_pylist() == [s for s in range(6) for _ in range(4)]
    # the replacement took the current weights, so the run is the one without faults
    assert_same_run(records(tmp_path / "faults"), records(reference[0]))


def run_main(argv: list[str], capsys) -> str:
    from jobs.ppo import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def write_tree(tree: dict, tmp_path: Path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_bad_inputs_fail_before_any_actor_with_one_message(tree, tmp_path, capsys):
    from uprlhf.data.loaders import write_parquet

    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = run_main(["--config", write_tree({**tree, "prompts": str(empty)}, tmp_path), "--output-dir", str(out)], capsys)
    assert f"{empty}: no rows" in err

    err = run_main(["--config", write_tree(tree, tmp_path), "--output-dir", str(out), "reward_kind=lora", "reward_k=5"], capsys)
    assert "kind is 'linear' but reward_kind='lora'" in err and "K is 3 but reward_k=5" in err

    long_prompts = tmp_path / "long.parquet"
    write_parquet([{"prompt": "the movie was"}] * 5 + [{"prompt": "the movie was " * 200}] * 2, long_prompts)
    err = run_main(["--config", write_tree({**tree, "prompts": str(long_prompts)}, tmp_path), "--output-dir", str(out)], capsys)
    assert f"{long_prompts}:6: prompt:" in err and "exceed the policy's context" in err

    err = run_main(["--config", write_tree(tree, tmp_path), "--output-dir", str(out), "penalty.name=nope"], capsys)
    assert "unknown penalty 'nope'; allowed:" in err

    missing = tmp_path / "no_pairs.parquet"
    err = run_main(["--config", write_tree(tree, tmp_path), "--output-dir", str(out), "selector.strategy=ugda",
                    f"selector.validation={missing}"], capsys)
    assert f"{missing}: no such file" in err
    err = run_main(["--config", write_tree(tree, tmp_path), "--output-dir", str(out), "selector.strategy=best"], capsys)
    assert "selector.strategy = 'best'" in err and "'ugda'" in err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def selector_tree(tiny_policy, tiny_trained_reward, tiny_prompts, **overrides) -> dict:
    """A tiny run refined every 2 steps by UGDA, each round published 2 steps after it starts (reproducible)."""
    return tiny_rl_tree(
        tiny_policy, tiny_trained_reward / "linear" / "final", tiny_prompts,
        **{"ppo.steps": 6, "selector.strategy": "ugda", "selector.every": 2, "selector.wait_steps": 2,
           "selector.projection_dim": 64, "selector.validation": str(tiny_trained_reward / "reward_test.parquet"),
           "selector.cpus": 0.25, **overrides},
    )


@pytest.fixture(scope="module")
def refined(local_ray, tiny_policy, tiny_trained_reward, tiny_prompts, tmp_path_factory) -> Path:
    """One uninterrupted refined run, which the refined runs with faults must reproduce."""
    from jobs.drivers.ppo import run_ppo

    out = tmp_path_factory.mktemp("refined") / "run"
    run_ppo(build(RLConfig, selector_tree(tiny_policy, tiny_trained_reward, tiny_prompts)), out)
    return out


def test_selector_refines_beside_the_loop_and_the_scorer_switches_versions(refined):
    rows = records(refined)
    assert [r["ensemble_version"] for r in rows] == [0, 0, 0, 1, 1, 2]
    assert rows[3]["selection_candidates"] == 8 and rows[5]["selection_candidates"] == 8
    assert rows[3]["selection_labelled"] == 2  # round(round(8 * 0.5) * 0.5)
    table = read_replay(refined / "replay")
    by_step = dict(zip(table["step"].to_pylist(), table["ensemble_version"].to_pylist()))
    assert by_step[2] == 0 and by_step[3] == 1 and by_step[5] == 2
    first, second = (json.loads(line) for line in (refined / "selections.jsonl").read_text().splitlines())
    assert first["through_step"] == 1 and second["through_step"] == 3 and first["adam_normalized"] is True
    assert all(step in (0, 1) for step in (int(i.split("-")[0]) for i in first["selected_ids"]))
    assert all(step in (2, 3) for step in (int(i.split("-")[0]) for i in second["selected_ids"]))
    assert (refined / "ensembles" / "v0002" / "ensemble.json").exists()
    state = read_json(refined / "checkpoints" / read_json(refined / "checkpoints" / "latest.json")["dir"] / "state.json")
    assert state["ensemble_version"] == 2 and state["ensemble_checkpoint"].endswith("v0002")


def test_a_killed_and_a_stopped_selector_are_replaced_their_rounds_redone_and_the_run_unchanged(
    refined, tiny_policy, tiny_trained_reward, tiny_prompts, tmp_path, caplog
):
    """A selector killed (SIGKILL) before the first round, another stopped (SIGSTOP, hung) before the second:
    each is replaced and its round redone, the dead one's at once, the hung one's when its deadline passes."""
    import ray

    from jobs.drivers.ppo import run_ppo

    faults = []

    def fault(step: int, actors: dict) -> None:
        if step == 1 and not faults:
            ray.kill(actors["selector"][0])
            faults.append("kill")
        elif step == 3 and faults == ["kill"]:
            ray.wait([actors["selection"]], timeout=180)  # the redone first round, so the stop hits the second
            os.kill(ray.get(actors["selector"][0].__ray_call__.remote(lambda self: os.getpid())), signal.SIGSTOP)
            faults.append("stop")

    # until the selector has two past calls a hung one is found after deadline_first_s, then after the floor
    tree = selector_tree(tiny_policy, tiny_trained_reward, tiny_prompts, deadline_first_s=15.0, deadline_floor_s=4.0)
    with caplog.at_level("WARNING", logger="uprlhf"):
        run_ppo(build(RLConfig, tree), tmp_path / "run", on_step=fault)
    assert faults == ["kill", "stop"]
    assert "the selector died during a selection round" in caplog.text and "selector [0]: run gave no answer" in caplog.text
    assert_same_run(records(tmp_path / "run"), records(refined))
    got, want = read_replay(tmp_path / "run" / "replay"), read_replay(refined / "replay")
    for column in ("step", "response", "ensemble_version", "policy_version"):
        assert got[column].to_pylist() == want[column].to_pylist(), column


def test_seeded_tiny_run_matches_the_recorded_run_step_for_step(reference):
    """The uninterrupted run reproduces the one recorded in tests/data/ppo_golden exactly.

    The recorded metrics guard every refactor of the loop: a change that alters what a
    seeded run computes shows up here as the first step and key that differ.
    """
    recorded = json.loads((GOLDEN / "metrics.json").read_text())
    assert_same_run(records(reference[0]), recorded["records"])
    assert read_replay(reference[0] / "replay")["response"].to_pylist() == recorded["responses"]


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_damaged_last_checkpoint_and_torn_metrics_fall_back_to_the_previous_checkpoint(reference, tree, tmp_path, caplog):
    """A truncated weights file in the last checkpoint, a planted pickle and a torn metrics line:
    the run resumes from the checkpoint before, never unpickles anything, and ends as the uninterrupted run."""
    from jobs.drivers.ppo import run_ppo

    out = copy_run(reference[0], tmp_path / "damaged")
    last = out / "checkpoints" / "step_000005"
    weights = sorted((last / "learner").glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:100])
    marker = tmp_path / "pickle-ran"
    planted = last / "learner" / "mp_rank_00_model_states.pt"
    planted.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (out / "final_eval.json").unlink()
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 6, "gold": 0.')
    with caplog.at_level("INFO", logger="uprlhf"):
        run_ppo(build(RLConfig, tree), out)
    assert "step_000005 is damaged" in caplog.text and "resuming after step 3" in caplog.text
    assert "torn record cut off" in caplog.text
    assert not marker.exists()
    assert_same_run(records(out), records(reference[0]))


def test_a_resume_with_another_config_is_refused_and_more_steps_are_evaluated_anew(reference, tree, tmp_path, capsys):
    from jobs.drivers.ppo import run_ppo

    out = copy_run(reference[0], tmp_path / "run")
    before = (out / "config.yaml").read_text()
    err = run_main(["--config", write_tree(tree, tmp_path), "--output-dir", str(out), "penalty.name=lcb", "ppo.lr=0.01"], capsys)
    assert "holds a run of another config" in err and "penalty.name: 'mean' -> 'lcb'" in err and "ppo.lr: 0.001 -> 0.01" in err
    assert (out / "config.yaml").read_text() == before

    summary = run_ppo(build(RLConfig, {**tree, "ppo": {**tree["ppo"], "steps": 7}}), out)
    assert [r["step"] for r in records(out)] == list(range(7))
    assert assert_same_run(records(out)[:6], records(reference[0])) is None
    assert read_json(out / "final_eval.json")["step"] == 7 and summary["steps"] == 7


def test_stopped_actors_of_every_role_are_taken_as_hung_rebuilt_and_the_run_unchanged(reference, tree, tmp_path, caplog):
    """SIGSTOP (a hung process) on a rollout worker, the scorer, the replay buffer and a learner rank, one per step."""
    import ray

    from jobs.drivers.ppo import run_ppo

    stopped = []
    plan = {1: "rollout", 2: "scorer", 3: "replay", 4: "learner"}

    def stop(step: int, actors: dict) -> None:
        role = plan.get(step)
        if role and role not in stopped:
            pid = ray.get(actors[role][-1].__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, signal.SIGSTOP)
            stopped.append(role)

    fast = {**tree, "deadline_first_s": 60.0, "deadline_floor_s": 4.0, "deadline_multiple": 5.0}
    with caplog.at_level("WARNING", logger="uprlhf"):
        run_ppo(build(RLConfig, fast), tmp_path / "hung", on_step=stop)
    assert stopped == ["rollout", "scorer", "replay", "learner"]
    for role in ("rollout", "scorer", "replay buffer"):
        assert f"{role} [0]" in caplog.text or f"{role} [" in caplog.text, role
    assert "a learner rank was lost" in caplog.text
    assert_same_run(records(tmp_path / "hung"), records(reference[0]))
    assert read_replay(tmp_path / "hung" / "replay")["response"].to_pylist() == read_replay(reference[0] / "replay")["response"].to_pylist()


def test_a_selection_round_lost_to_a_dead_selector_is_counted_and_the_run_goes_on(local_ray, tiny_policy, tiny_trained_reward, tiny_prompts, tmp_path):
    from jobs.drivers.ppo import run_ppo

    tree = tiny_rl_tree(
        tiny_policy, tiny_trained_reward / "linear" / "final", tiny_prompts,
        **{"ppo.steps": 6, "selector.strategy": "random", "selector.every": 2,
           "selector.validation": str(tiny_trained_reward / "reward_test.parquet"), "selector.cpus": 0.25},
    )
    killed = []

    def kill_selector_mid_round(step, actors):
        if step == 2 and actors["selection"] is not None and not killed:
            local_ray.kill(actors["selector"][0])
            local_ray.wait([actors["selection"]], timeout=60)
            killed.append(step)

    summary = run_ppo(build(RLConfig, tree), tmp_path / "run", on_step=kill_selector_mid_round)
    assert killed == [2]
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["step"] for r in rows if r.get("selection_failed")] == [2]
    assert summary["failed_selections"] == 1


def test_grpo_with_rules_int8_decoding_and_a_judge_trains_whole_groups_and_logs_each_rule(local_ray, tiny_policy, tiny_trained_reward, tiny_prompts, tmp_path):
    """The paths the loop gained beside the golden run, through the actors: n samples per prompt kept whole on
    each learner rank (GRPO, no value head), extra rules on the scorer added to the reward, int8 sampling."""
    from jobs.drivers.ppo import run_ppo

    rules = [{"fn": "uprlhf.rl.rules:response_length_penalty", "weight": 0.05},
             {"fn": "uprlhf.rl.rules:ends_with_punctuation", "weight": 0.5, "name": "format"}]
    tree = tiny_rl_tree(
        tiny_policy, tiny_trained_reward / "linear" / "final", tiny_prompts,
        **{"ppo.steps": 3, "ppo.estimator": "grpo", "ppo.samples_per_prompt": 2, "extra_rewards": rules,
           "rollout.decode_weights": "int8", "gold_every": 10, "checkpoint_every": 10, "judges": ["textblob"]},
    )
    summary = run_ppo(build(RLConfig, tree), tmp_path / "run")
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    # a judge beside the gold scores every gold evaluation: step 0's and the final one
    assert -2.0 <= rows[0]["judge_textblob"] <= 1.0 and "judge_textblob" not in rows[1]
    assert -2.0 <= summary["judge_textblob_final"] <= 1.0 and "judge_vader_final" not in summary
    for r in rows:
        assert r["group_reward_std"] >= 0 and "value_loss" not in r
        assert r["reward_extra/format"] in {0.0, 0.25, 0.5, 0.75, 1.0}
        assert r["reward_extra/response_length_penalty"] <= 0
        assert r["reward_total"] == pytest.approx(
            r["penalized_reward"] + 0.05 * r["reward_extra/response_length_penalty"] + 0.5 * r["reward_extra/format"], abs=1e-5)
    table = read_replay(tmp_path / "run" / "replay")
    prompts = table["prompt"].to_pylist()
    assert prompts[0::2] == prompts[1::2]  # each of the step's 2 prompts sampled twice in a row


def test_one_step_off_policy_samples_beside_the_update_and_resumes_step_for_step(local_ray, tree, reference, tmp_path):
    """async_steps=1: step t+1 is sampled while step t trains, by the weights before that update (policy_lag 1 from
    the second step, in the metrics and the replay buffer); a run stopped after a checkpoint resumes with the batch
    it had sampled ahead and reproduces the uninterrupted run step for step."""
    from jobs.drivers.ppo import run_ppo

    cfg = build(RLConfig, {**tree, "async_steps": 1, "ppo": {**tree["ppo"], "steps": 4}})
    run_ppo(cfg, tmp_path / "straight")
    rows = records(tmp_path / "straight")
    assert [r["policy_lag"] for r in rows] == [0, 1, 1, 1]
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["value_loss"]) for r in rows)
    # the KL is the behaviour policy's: steps 0 and 1 were both sampled by the untrained weights, later ones moved away
    assert abs(rows[0]["kl"]) < 1e-5 and abs(rows[1]["kl"]) < 1e-5 and rows[-1]["kl"] > 1e-4
    assert "seconds_generate" not in rows[-1] and rows[-1]["generation_tokens_per_second"] is None  # nothing left to sample
    table = read_replay(tmp_path / "straight" / "replay")
    assert table["policy_lag"].to_pylist() == [0] * 4 + [1] * 12
    assert table["policy_version"].to_pylist() == [0] * 4 + [s - 1 for s in range(1, 4) for _ in range(4)]
    on_policy = read_replay(reference[0] / "replay")
    assert table["response"].to_pylist()[:4] == on_policy["response"].to_pylist()[:4]  # step 0: the same weights and seed
    assert rows[2]["policy_loss"] != records(reference[0])[2]["policy_loss"]  # later steps: ratios to the behaviour policy

    def stop_at_step_3(step, actors):
        if step == 3:
            raise KeyboardInterrupt  # killed after the checkpoint of step 1 (which holds step 2's batch)

    with pytest.raises(KeyboardInterrupt):
        run_ppo(cfg, tmp_path / "stopped", on_step=stop_at_step_3)
    assert (tmp_path / "stopped" / "checkpoints" / "step_000001" / "prefetched.json").is_file()
    run_ppo(cfg, tmp_path / "stopped")
    assert_same_run(records(tmp_path / "stopped"), rows)
    assert read_replay(tmp_path / "stopped" / "replay")["response"].to_pylist() == table["response"].to_pylist()

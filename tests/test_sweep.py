"""tune.sweep: config checks, the space, trial resources, ASHA, results, and a tiny sweep killed and resumed."""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from actors.placement import PlacementPlan, RoleSpec, rl_plan
from tests.conftest import tiny_rl_tree
from tune import sweep
from tune.config import ALGORITHMS, SweepConfig
from tune.results import best_row, pareto_front, trial_row, write_best, write_tables
from tune.space import SEARCHERS, ensemble_variants, param_space, trial_config
from tune.trial import Trials, trial_plan
from uprlhf.config import ConfigError, RLConfig, build, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune" / "configs" / "tiny.yaml"


def tiny_tree(**changes) -> dict:
    tree = yaml.safe_load(TINY.read_text())
    tree.update(changes)
    return tree


def sweep_config(*overrides: str) -> SweepConfig:
    return load_config(SweepConfig, TINY, list(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.beta_unc={grid: [1.0]}", "space.beta_unc=1.0: penalty: penalty 'mean' has no coefficient(s) ['beta']"),
        ("space.beta_kl={grid: [-1]}", "space.beta_kl=-1: kl.coef = -1: Input should be greater than or equal to 0"),
        ("space.temperature={grid: [1]}", "space.temperature: unknown parameter; use one of penalty, beta_kl, beta_unc, lam, nnm_lambda, seed or a dotted path"),
        ("space={rl.ppo.stepz: {grid: [1]}}", "space.rl.ppo.stepz=1: ppo.stepz: unknown field; allowed: batch_size"),
        ("space.beta_kl={uniform: [0.1, 0.01]}", "uniform bounds [0.1, 0.01] need low < high"),
        ("space.beta_kl={grid: [0.1], choice: [0.2]}", "set exactly one of grid, choice, uniform, loguniform, randint; got ['grid', 'choice']"),
        ("space.nnm_lambda={grid: [0.1]}", "space.nnm_lambda: nnm_lambda only shapes diverse_lora ensembles, but rl.reward_kind='linear'"),
        ("space.beta_kl={loguniform: [0.01, 0.1]}", "search.algorithm=grid takes grid values only"),
        ("reward=null", "no ensemble: set reward (trained once for the sweep) or rl.reward_checkpoint"),
        ("rl.reward_checkpoint=/ckpt", "both reward and rl.reward_checkpoint are set"),
        ("asha.grace_period=8", "asha.grace_period=8 must be below rl.ppo.steps=8"),
    ],
)
def test_bad_sweep_configs_fail_with_one_line_naming_the_parameter(override, message):
    with pytest.raises(ConfigError) as err:
        sweep_config(override)
    assert message in str(err.value)


def test_optuna_without_the_package_is_refused_before_anything_starts(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="search.algorithm=optuna needs the optuna package .*; without it: grid, random"):
        sweep_config("search.algorithm=optuna", "space.beta_kl={choice: [0.02, 0.1]}", "space.penalty={choice: [{name: mean}]}")
    assert set(SEARCHERS) == set(ALGORITHMS)


def test_base_pipeline_config_supplies_data_reward_and_rl_defaults(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "jobs" / "configs" / "demo.yaml"), "rl": {"ppo": {"steps": 6}},
                                    "space": {"beta_kl": {"grid": [0.01, 0.1]}}}))
    cfg = load_config(SweepConfig, path)
    demo = yaml.safe_load((ROOT / "jobs" / "configs" / "demo.yaml").read_text())
    assert cfg.data.n_prompts == demo["data"]["n_prompts"] and cfg.reward.train.epochs == demo["reward"]["train"]["epochs"]
    assert cfg.rl.ppo.steps == 6 and cfg.rl.ppo.lr == demo["rl"]["base"]["ppo"]["lr"]


def test_trial_config_applies_aliases_penalty_labels_and_the_shared_ensemble(tmp_path):
    cfg = sweep_config()
    space = param_space(cfg)
    assert space == {"penalty": {"grid_search": ["mean", "lcb(lam=50)", "up_rlhf(beta=100)"]}, "beta_kl": {"grid_search": [0.02, 0.1]}}
    trial = trial_config(cfg, {"penalty": "up_rlhf(beta=100)", "beta_kl": 0.1}, tmp_path, tmp_path / "data")
    assert trial.penalty.name == "up_rlhf" and trial.penalty.coefficients == {"beta": 100.0} and trial.kl.coef == 0.1
    assert trial.reward_checkpoint == str(tmp_path / "reward" / "shared" / "checkpoints" / "linear" / "final")
    assert trial.reward_k == 3 and trial.data_dir == str(tmp_path / "data")
    assert ensemble_variants(cfg) == [{}]


def test_swept_ensemble_parameter_trains_one_ensemble_per_value_once(tmp_path, monkeypatch):
    cfg = sweep_config("rl.reward_kind=diverse_lora", "space.nnm_lambda={grid: [0.01, 0.1]}")
    trained = []
    monkeypatch.setattr(sweep, "run_train_reward", lambda rc, out: trained.append((rc.kinds, rc.ensemble.nnm_lambda, rc.data_dir, out)))
    sweep.train_ensembles(cfg, tmp_path, tmp_path / "data")
    reward = tmp_path / "reward"
    assert trained == [
        (["diverse_lora"], 0.01, str(tmp_path / "data"), reward / "ensemble.nnm_lambda=0.01"),
        (["diverse_lora"], 0.1, str(tmp_path / "data"), reward / "ensemble.nnm_lambda=0.1"),
    ]
    trial = trial_config(cfg, {"penalty": "mean", "beta_kl": 0.02, "nnm_lambda": 0.1}, tmp_path, tmp_path / "data")
    assert trial.reward_checkpoint == str(reward / "ensemble.nnm_lambda=0.1" / "checkpoints" / "diverse_lora" / "final")


def test_trial_reserves_the_ppo_plan_with_its_driver_in_bundle_zero(tmp_path):
    cfg = sweep_config("rl.rollout.num_workers=2", "rl.learner.num_workers=2", "rl.learner.cpus_per_worker=0.5",
                       "rl.selector.strategy=random", "rl.selector.cpus=0.5")
    trials = Trials(cfg, tmp_path, tmp_path / "data")
    factory = trials.resources({"penalty": "mean", "beta_kl": 0.02})
    plan = rl_plan(trials.config({"penalty": "mean", "beta_kl": 0.02})).bundles()
    assert plan == [{"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]  # ..., selector
    # the trainable takes the empty head bundle's slot, bundle 0; bundle i of the group is bundle i of the plan
    assert factory.head_bundle_is_empty
    assert factory.bundles == [{"CPU": 0.5}, *plan[1:]]
    assert factory.required_resources == {"CPU": 2.5}


def test_concurrency_follows_the_cluster_and_refuses_a_trial_that_cannot_fit(capsys):
    cfg = sweep_config()
    assert sweep.concurrency(cfg, {"CPU": 2.0, "GPU": 0.0}) == 2
    assert sweep.concurrency(cfg, {"CPU": 7.5, "GPU": 0.0}) == 7
    gpu = sweep_config("rl.learner.use_gpu=true", "rl.scorer_gpus=1")
    assert sweep.concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    with pytest.raises(SystemExit):
        sweep.concurrency(gpu, {"CPU": 64.0, "GPU": 1.0})
    assert "a trial needs 1 CPU and 2 GPU but the cluster has 64 and 1" in capsys.readouterr().err
    assert sweep.concurrency(sweep_config("resources.max_concurrent=3"), {"CPU": 2.0, "GPU": 0.0}) == 3


def test_asha_stops_the_weaker_trial_at_the_grace_period_in_ppo_steps():
    asha = sweep.scheduler(sweep_config("asha.grace_period=2"))
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    for trial in (a, b):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, b, {"step": 1, "gold": -1.0}) == "CONTINUE"  # before the grace period
    assert asha.on_trial_result(None, a, {"step": 2, "gold": 0.5}) == "CONTINUE"
    assert asha.on_trial_result(None, b, {"step": 2, "gold": 0.1}) == "STOP"
    assert asha.on_trial_result(None, a, {"step": 8, "gold": 0.5}) == "STOP"  # max_t = rl.ppo.steps


def test_reserve_inside_a_placement_group_returns_it_and_refuses_a_plan_it_cannot_hold(local_ray):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = build(RLConfig, tiny_rl_tree("policy", "checkpoint", "prompts.parquet", **{"learner.num_workers": 1}))
    group = placement_group(trial_plan(cfg, 0.25), strategy="PACK")

    @ray.remote(num_cpus=0)
    def trial_driver(plan, wrong_plan):
        from ray.util import get_current_placement_group

        from actors import PlacementError

        reserved = plan.reserve("trial", adopt=get_current_placement_group())
        try:
            wrong_plan.reserve("trial", adopt=get_current_placement_group())
            refused = None
        except PlacementError as err:
            refused = str(err)
        return reserved.pg.id.hex(), reserved.owned, refused

    try:
        ray.get(group.ready(), timeout=60)
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        plan = rl_plan(cfg)
        wrong = PlacementPlan({**plan.roles, "extra": RoleSpec(1, 1.0)})
        driver = trial_driver.options(scheduling_strategy=strategy, max_retries=0).remote(plan, wrong)
        reserved, owned, refused = ray.get(driver, timeout=120)
        assert reserved == group.id.hex() and not owned
        assert "does not hold the placement plan" in refused
    finally:
        remove_placement_group(group)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        # the trial's own output, as Tune records it: the job's `error:` line wins
        ("Traceback (most recent call last):\n  File \"x.py\", line 1\nerror: rl.eval_prompts=16 leaves no prompts\n"
         "SystemExit: 2\n", "rl.eval_prompts=16 leaves no prompts"),
        # a RayTaskError: the exception and its first line, not the last problem of a long message
        ("ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n  File \"tune/trial.py\", line 80, in run_trial\n"
         "    run_ppo(cfg)\nuprlhf.data.loaders.DataError: /data/p.jsonl:3: prompt: empty\n/data/p.jsonl:9: prompt: empty\n",
         "DataError: /data/p.jsonl:3: prompt: empty"),
        ("ray::ImplicitFunc.train()\ntune.trial.TrialFailed: 20 prompts leave none for training after eval_prompts=32",
         "20 prompts leave none for training after eval_prompts=32"),
        ("something odd\nat the end", "at the end"),
    ],
)
def test_a_failed_trial_row_says_why(error, line):
    row = trial_row("trial_0", {"beta_kl": 0.1}, {}, error, None, 8)
    assert row["status"] == "error" and row["error"] == line


def test_an_exit_inside_a_trial_becomes_an_error_that_says_why():
    from jobs.common import fail
    from tune.trial import TrialFailed, exit_as_error

    with pytest.raises(TrialFailed, match=r"^20 prompts leave none for training after eval_prompts=32$"):
        with exit_as_error():
            fail("20 prompts leave none for training after eval_prompts=32")
    with pytest.raises(TrialFailed, match=r"^exit code 3$"):
        with exit_as_error():
            raise SystemExit(3)


def rows_of(*specs) -> list[dict]:
    return [trial_row(name, {"beta_kl": kl_coef}, metrics, None, build(RLConfig, {"penalty": penalty}), 8)
            for name, kl_coef, penalty, metrics in specs]


def test_pareto_front_best_and_plain_ppo_come_from_completed_trials():
    rows = rows_of(
        ("trial_0", 0.02, {"name": "mean"}, {"step": 8, "gold": 0.30, "kl": 4.0}),
        ("trial_1", 0.10, {"name": "mean"}, {"step": 8, "gold": 0.20, "kl": 1.0}),
        ("trial_2", 0.02, {"name": "up_rlhf", "coefficients": {"beta": 100.0}}, {"step": 8, "gold": 0.40, "kl": 2.0}),
        ("trial_3", 0.10, {"name": "lcb", "coefficients": {"lam": 50.0}}, {"step": 8, "gold": 0.10, "kl": 3.0}),
        ("trial_4", 0.10, {"name": "lcb", "coefficients": {"lam": 50.0}}, {"step": 4, "gold": 0.90, "kl": 0.5}),
    )
    assert [r["status"] for r in rows] == ["completed"] * 4 + ["stopped at step 4"]
    assert rows[4]["steps_done"] == 5 and rows[2]["penalty"] == "up_rlhf(beta=100)"
    assert pareto_front(rows) == ["trial_1", "trial_2"]
    assert best_row(rows)["trial"] == "trial_2"
    assert best_row(rows, penalty="mean")["trial"] == "trial_0"


def test_tables_and_best_yaml_load_as_the_trial_ran(tmp_path):
    rows = rows_of(("trial_0", 0.02, {"name": "mean"}, {"step": 8, "gold": 0.3, "kl": 4.0}))
    trial_dir = tmp_path / "trials" / "trial_0"
    trial_dir.mkdir(parents=True)
    cfg = build(RLConfig, tiny_rl_tree("policy", "checkpoint", "prompts.parquet"))
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    write_tables(rows, tmp_path)
    write_best(rows[0], trial_dir, tmp_path / "best.yaml")
    assert load_config(RLConfig, tmp_path / "best.yaml") == cfg
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == "trial,status,penalty,beta_kl,steps_done,gold,kl,reward_mean,uncertainty,error"
    assert "| trial_0 | completed | mean | 0.02 | 8 | 0.3 | 4 | – | – | – |" in (tmp_path / "results.md").read_text()


def experiment_statuses(out: Path) -> dict[str, str]:
    """Trial statuses as Tune last saved them (the restore point)."""
    statuses = {}
    for path in (out / "tune").glob("experiment_state-*.json"):
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:  # caught mid-write
            continue
        for trial_state, _ in state["trial_data"]:
            trial = json.loads(trial_state)
            statuses[f"trial_{trial['trial_id']}"] = trial["status"]
    return statuses


def metric_steps(trial_dir: Path) -> list[int]:
    path = trial_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow  # about 2.5 min on 2 cores: two sweep starts, two trials and a resumed one
def test_tiny_sweep_killed_and_restarted_resumes_without_rerunning_finished_trials(
    tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path
):
    """Two trials one after the other; killed once the first finished and the second has a
    checkpoint, then started again: the first is kept as it is, the second resumes from its checkpoint."""
    # A tiny step takes ~0.1 s, so a trial needs enough steps that the poll below (every 0.2 s) still
    # finds the second one mid-run; the kill must land between two of its checkpoints, not after its last.
    steps = 40
    rl = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{
        "ppo.steps": steps, "learner.num_workers": 1, "learner.cpus_per_worker": 0.25, "rollout.cpus_per_worker": 0.25, "scorer_cpus": 0.25})
    # ASHA off: its rung at step 2 could stop the second trial before it can be killed (the sweep then ends first).
    tree = tiny_tree(data=None, reward=None, rl=rl, asha={"enabled": False},
                     resources={"driver_cpus": 0.25, "max_concurrent": 1},
                     space={"penalty": {"grid": [{"name": "mean"}, {"name": "up_rlhf", "coefficients": {"beta": 1.0}}]}})
    config, out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    config.write_text(yaml.safe_dump(tree))
    secret = f"sk-test-{secrets.token_hex(16)}"
    env = {**os.environ, "UPRLHF_DASHBOARD": "0", "RAY_ADDRESS": "", "OPENAI_API_KEY": secret, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    command = [sys.executable, "-m", "tune.sweep", "--config", str(config), "--output-dir", str(out)]

    killed = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    first = second = None
    while time.monotonic() < deadline and killed.poll() is None:
        done = [name for name, status in experiment_statuses(out).items() if status == "TERMINATED"]
        started = [p.parent.name for p in (out / "trials").glob("*/metrics.jsonl") if p.parent.name not in done]
        if done and started and len(metric_steps(out / "trials" / started[0])) >= 3:  # checkpointed after step 1
            first, second = done[0], started[0]
            break
        time.sleep(0.2)
    assert killed.poll() is None, "the sweep ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)
    first_output = killed.communicate()[0]
    steps_before_kill = metric_steps(out / "trials" / second)
    assert len(steps_before_kill) < steps, "the second trial finished before the kill: the test needs more steps"
    first_started = (out / "trials" / first / "config.yaml").stat().st_mtime_ns

    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    assert "[sweep] resuming the sweep" in output
    resumed = re.search(rf"\[ppo\] {second}: resuming after step (\d+)\b", output)
    assert resumed, "the second trial did not resume from its checkpoint"
    # checkpoint_every=2: the newest checkpoint is after an odd step the killed run had recorded
    assert int(resumed[1]) % 2 == 1 and int(resumed[1]) <= steps_before_kill[-1]
    assert (out / "trials" / first / "config.yaml").stat().st_mtime_ns == first_started  # not run again
    assert metric_steps(out / "trials" / first) == metric_steps(out / "trials" / second) == list(range(steps))
    assert any(line.split()[:5] == ["trial", "status", "step", "gold", "kl"] for line in (first_output + output).splitlines())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == summary["completed"] == 2 and summary["errors"] == 0
    assert summary["trial_cpus"] == 1.0 and summary["max_concurrent"] == 1
    assert 0 < summary["peak_cpus_in_use"] <= summary["cpus_available"]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and {r.split(",")[2] for r in rows[1:]} == {"mean", "up_rlhf(beta=1)"}
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(RLConfig, out / "best.yaml")
    assert best == load_config(RLConfig, out / "trials" / summary["best"]["trial"] / "config.yaml")
    from jobs.common import parse

    assert parse(RLConfig, "", ["--config", str(out / "best.yaml"), "--output-dir", str(tmp_path / "rerun")])[0] == best

    token = (Path.home() / ".ray" / "auth_token").read_bytes().strip()
    leaked = [p for p in out.rglob("*") if p.is_file() and (token in p.read_bytes() or secret.encode() in p.read_bytes())]
    assert token and not leaked
    assert secret not in output + first_output

"""jobs.refine end to end on a tiny PPO run: every strategy at one budget, figures per seed, retraining, bad input."""

import json
from pathlib import Path

import pytest

from jobs.common import read_json
from tests.conftest import tiny_rl_tree
from uprlhf.config import RLConfig, build


@pytest.fixture(scope="module")
def finished_run(local_ray, tiny_policy, tiny_trained_reward, tiny_prompts, tmp_path_factory) -> Path:
    from jobs.drivers.ppo import run_ppo

    out = tmp_path_factory.mktemp("ppo_run")
    tree = tiny_rl_tree(tiny_policy, tiny_trained_reward / "linear" / "final", tiny_prompts,
                        **{"ppo.steps": 5, "data_dir": str(tiny_trained_reward), "gold_every": 10})
    run_ppo(build(RLConfig, tree), out)
    return out


def refine(out: Path, run_dir: Path, *extra: str) -> dict:
    from jobs.refine import main

    main(["--output-dir", str(out), f"run_dir={run_dir}", "selector.projection_dim=64", "selector.epochs=2",
          "best_of_n=2", "best_of_n_prompts=3", *extra])
    return read_json(out / "summary.json")


def test_every_strategy_labels_the_same_budget_and_is_measured_per_seed(finished_run, tmp_path):
    summary = refine(tmp_path, finished_run, "seeds=[0,1]")
    assert (summary["candidates"], summary["held_out"]) == (16, 4)
    assert summary["budget"] == 4  # round(round(16 * 0.5) * 0.5)
    assert set(summary["strategies"]) == {"none", "ugda", "uncertainty", "influence", "random"}
    for name, row in summary["strategies"].items():
        for key in ("heldout_pairs_accuracy", "heldout_pairs_ece", "policy_samples_accuracy", "best_of_n_gold"):
            assert row[key]["n"] == 2, (name, key)
            assert key == "best_of_n_gold" or 0 <= row[key]["mean"] <= 1, (name, key)
        if name != "none":
            assert row["labelled"] == {"mean": 4, "std": 0.0, "n": 2}
    for seed in (0, 1):
        log = [json.loads(line) for line in (tmp_path / f"seed_{seed}" / "random" / "selections.jsonl").read_text().splitlines()]
        assert len(log) == 1 and len(log[0]["selected_ids"]) == 4
        assert (tmp_path / f"seed_{seed}" / "ugda" / "ensembles" / "v0001" / "ensemble.json").exists()
    random_picks = [json.loads((tmp_path / f"seed_{s}" / "random" / "selections.jsonl").read_text())["selected_ids"] for s in (0, 1)]
    assert random_picks[0] != random_picks[1]
    assert "| ugda |" in (tmp_path / "refine_table.md").read_text()


def test_retraining_trains_a_policy_against_each_ensemble_and_a_rerun_reuses_finished_cells(finished_run, tmp_path):
    extra = ("strategies=[random]", "retrain=true", "retrain_overrides=[ppo.steps=2]")
    summary = refine(tmp_path, finished_run, *extra)
    for name in ("none", "random"):
        assert "retrain_gold_final" in summary["strategies"][name]
        cfg = build(RLConfig, __import__("yaml").safe_load((tmp_path / "seed_0" / name / "rl" / "config.yaml").read_text()))
        assert cfg.ppo.steps == 2 and not cfg.selector.enabled
    assert cfg.reward_checkpoint == str(tmp_path / "seed_0" / "random" / "ensembles" / "v0001")
    assert "Refinement strategies" in (tmp_path / "report.html").read_text()
    before = (tmp_path / "seed_0" / "random" / "figures.json").stat().st_mtime_ns
    assert refine(tmp_path, finished_run, *extra)["strategies"] == summary["strategies"]
    assert (tmp_path / "seed_0" / "random" / "figures.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(("override", "message"), [
    ("retrain_overrides=[ppo.stepz=2]", "stepz"),
    ("strategies=[ugda,bogus]", "strategies"),
])
def test_bad_settings_fail_before_any_model_loads(finished_run, tmp_path, override, message, capsys):
    from jobs.refine import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path), f"run_dir={finished_run}", "retrain=true", override])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "seed_0").exists()

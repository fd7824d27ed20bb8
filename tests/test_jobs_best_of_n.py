import pytest
import yaml

from jobs.common import read_json


def test_best_of_n_job_reports_every_penalty_and_n(local_ray, tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    from jobs.best_of_n import main

    tree = {
        "prompts": str(tiny_prompts),
        "n_prompts": 3,
        "n": [1, 2, 4],
        "reward_checkpoint": str(tiny_reward_checkpoint),
        "reward_k": 3,
        "penalties": [{"name": "mean"}, {"name": "lcb", "coefficients": {"lam": 2.0}}],
        "policy": {"model": {"name_or_path": str(tiny_policy)}, "prompt_template": "plain"},
        "rollout": {"max_new_tokens": 5, "cpus_per_worker": 0.5, "num_workers": 2},
        "scorer_cpus": 0.5,
    }
    config = tmp_path / "bon.yaml"
    config.write_text(yaml.safe_dump(tree))
    main(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    summary = read_json(tmp_path / "out" / "summary.json")
    assert set(summary["best_of_n"]) == {"mean", "lcb"}
    rows = summary["best_of_n"]["mean"]
    assert list(rows) == ["1", "2", "4"]
    assert rows["1"]["kl"] == 0.0 and rows["4"]["kl"] == pytest.approx(1.386294 - 0.75, abs=1e-5)
    # more samples never lower the best proxy reward the mean ranker finds
    assert rows["1"]["proxy"] <= rows["2"]["proxy"] <= rows["4"]["proxy"]
    assert (tmp_path / "out" / "best_of_n.png").stat().st_size > 0


def test_best_of_n_rejects_n_below_one(tmp_path, capsys):
    from jobs.best_of_n import main

    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "n=[0,4]"])
    assert "every n must be >= 1" in capsys.readouterr().err

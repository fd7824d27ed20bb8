import json
import math

import pytest

from jobs.benchmark import main, synthetic_pairs
from uprlhf.config import ENSEMBLE_KINDS

LORA = ("lora", "diverse_lora")


def test_synthetic_pairs_are_deterministic_and_sized():
    prompts, responses = synthetic_pairs(20, seed=3)
    assert (prompts, responses) == synthetic_pairs(20, seed=3)
    assert synthetic_pairs(20, seed=4) != (prompts, responses)
    assert len(prompts) == len(responses) == 20
    assert all(5 <= len(p.split()) <= 12 for p in prompts)
    assert all(20 <= len(r.split()) <= 40 for r in responses)


def test_scoring_benchmark_writes_every_figure(tiny_reward_backbone, tmp_path):
    out = tmp_path / "bench"
    main(
        [
            "scoring",
            "--output-dir",
            str(out),
            f"backbone.name_or_path={tiny_reward_backbone}",
            "pairs=16",
            "k=2",
            "repeats=1",
            "batch_size=8",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "benchmark_table.md").exists() and (out / "config.yaml").exists()
    candidates = ["single", *ENSEMBLE_KINDS, *(f"{k}_sequential" for k in LORA)]
    assert set(summary["seconds"]) == set(candidates)
    assert set(summary["ratio_vs_single"]) == set(ENSEMBLE_KINDS)
    assert set(summary["fused_vs_sequential"]) == set(LORA)
    for group in ("seconds", "ratio_vs_single", "fused_vs_sequential"):
        for value in summary[group].values():
            assert isinstance(value, float) and math.isfinite(value) and value > 0
    for kind in ENSEMBLE_KINDS:
        assert summary["ratio_vs_single"][kind] == summary["seconds"][kind] / summary["seconds"]["single"]
    for kind in LORA:
        assert summary["fused_vs_sequential"][kind] == summary["seconds"][kind] / summary["seconds"][f"{kind}_sequential"]
    expected_targets = {"ratio_vs_single.linear", "ratio_vs_single.frozen_heads", *(f"fused_vs_sequential.{k}" for k in LORA)}
    assert set(summary["targets"]) == expected_targets
    for target in summary["targets"].values():
        assert isinstance(target["met"], bool) and target["max"] > 0
    # the fused forward scores the same K members as the sequential passes
    assert all(diff < 1e-4 for diff in summary["fused_max_abs_diff"].values())
    assert summary["config"]["k"] == 2 and summary["config"]["pairs"] == 16
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(candidates)


def test_unknown_benchmark_exits_2_naming_the_allowed(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["throughput"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "throughput" in err[0] and "allowed: scoring" in err[0]


def test_bad_field_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["scoring", "--output-dir", str(tmp_path), "k=1"])
    assert exc.value.code == 2
    assert "k = 1" in capsys.readouterr().err


def test_rl_benchmark_reports_stages_overhead_and_throughput(local_ray, tiny_policy, tiny_reward_backbone, tmp_path):
    from jobs.benchmark import main

    summary = main([
        "rl", "--output-dir", str(tmp_path), f"policy.name_or_path={tiny_policy}", f"backbone.name_or_path={tiny_reward_backbone}",
        "lora_rank=4", "k=3", "steps=3", "batch_size=4", "max_new_tokens=5", "trl=false",
    ])
    assert set(summary["stage_seconds"]) == {"generate", "score", "train", "sync"}
    assert all(v > 0 for v in summary["stage_seconds"].values())
    assert 0 <= summary["ray_overhead_fraction"] < 1
    assert summary["tokens_per_second"] > 0 and summary["timed_steps"] == 2
    assert summary["trl_tokens_per_second"] is None
    assert (tmp_path / "benchmark_table.md").exists()


def test_selection_benchmark_reports_throughput_per_dimension_and_buffer_time(tiny_reward_backbone, tmp_path):
    from jobs.benchmark import main

    summary = main([
        "selection", "--output-dir", str(tmp_path), f"backbone.name_or_path={tiny_reward_backbone}", "k=3", "lora_rank=2",
        "lora_top_layers=1", "dims=[64,128]", "candidates=6", "validation=4", "buffer_rows=24", "max_length=24",
    ])
    assert set(summary["candidates_per_second"]) == {"64", "128"}
    assert all(v > 0 for v in summary["candidates_per_second"].values())
    assert summary["selected"] == 6  # round(round(24 * 0.5) * 0.5)
    assert summary["seconds_for_10k"] == pytest.approx(summary["seconds_to_select"] * 10000 / 24)
    assert "candidates/s" in (tmp_path / "benchmark_table.md").read_text()

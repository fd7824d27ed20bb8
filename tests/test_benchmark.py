import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from torch import nn

from jobs.benchmark import (
    PolicySizes,
    ScoringBenchmarkConfig,
    ensemble_params,
    limits_line,
    main,
    meta_model,
    replay_tokens,
    rl_limit_lines,
    rl_limit_summary,
    rl_stage_threads,
    scoring_kinds,
    scoring_limit_summary,
    synthetic_pairs,
)
from uprlhf.config import EnsembleConfig, ModelConfig
from uprlhf.perf.limits import (
    decode_weight_bytes,
    forward_flops,
    fraction_of_limit,
    generation_bound,
    lora_params,
    matmul_params,
    measure_matmul_peak,
    measure_memory_bandwidth,
    output_params,
    scoring_flops,
    update_flops,
    weight_bytes,
)

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
            "limits_seconds=0.02",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "benchmark_table.md").exists() and (out / "config.yaml").exists()
    kinds = scoring_kinds()
    candidates = ["single", *kinds, *(f"{k}_sequential" for k in LORA)]
    assert set(summary["seconds"]) == set(candidates)
    assert set(summary["ratio_vs_single"]) == set(kinds)
    assert set(summary["fused_vs_sequential"]) == set(LORA)
    for group in ("seconds", "ratio_vs_single", "fused_vs_sequential"):
        for value in summary[group].values():
            assert isinstance(value, float) and math.isfinite(value) and value > 0
    for kind in kinds:
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
    threads = summary["environment"]["threads"]
    limits = summary["limits"]
    assert limits["threads"] == {"scoring": threads}
    assert limits["bounds"]["scoring"] == limits["matmul_flops_per_s"][str(threads)] > 0
    assert limits["memory_bytes_per_s"] > 0
    assert set(summary["fraction_of_limit"]["scoring"]) == set(candidates)
    for name, fraction in summary["fraction_of_limit"]["scoring"].items():
        assert math.isfinite(fraction) and fraction > 0
        assert fraction == pytest.approx(summary["work"]["scoring"][name] / summary["seconds"][name] / limits["bounds"]["scoring"])
    work, tokens = summary["work"]["scoring"], summary["tokens"]
    # K = 2 heads instead of one on the 32-wide tiny backbone: (K - 1) * (32 + 1) more parameters per token
    assert work["linear"] - work["single"] == pytest.approx(2 * tokens * 33)
    assert work["independent"] == 2 * work["single"]
    for kind in LORA:  # adapters on every layer: the fused pass does the sequential passes' work
        assert work[kind] == work[f"{kind}_sequential"]
    assert "of matmul peak" in (out / "benchmark_table.md").read_text()


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
        "lora_rank=4", "k=3", "steps=3", "batch_size=4", "max_new_tokens=5", "trl=false", "limits_seconds=0.02", "overlap=false",
        "decode_weights=[bfloat16]",  # one low-precision loop end to end; int8's runs in tests/test_jobs_ppo.py
    ])
    assert set(summary["stage_seconds"]) == {"generate", "score", "train", "sync"}
    assert all(v > 0 for v in summary["stage_seconds"].values())
    assert 0 <= summary["ray_overhead_fraction"] < 1
    assert summary["tokens_per_second"] > 0 and summary["timed_steps"] == 2
    assert summary["trl_tokens_per_second"] is None
    assert (tmp_path / "benchmark_table.md").exists()
    assert summary["limits"]["threads"] == {"generation": 2, "update": 1, "scoring": 2}
    assert set(summary["limits"]["matmul_flops_per_s"]) == {"1", "2"}
    assert set(summary["fraction_of_limit"]) == {"generation", "update", "scoring"}
    assert all(math.isfinite(v) and v > 0 for v in summary["fraction_of_limit"].values())
    assert summary["achieved"]["generation"] == pytest.approx(summary["generation_tokens_per_second"])
    assert summary["work"]["tokens"]["response"] == summary["work"]["generation"]
    assert "% of the limit" in (tmp_path / "benchmark_table.md").read_text()
    low = summary["decode_weights"]["bfloat16"]  # the same loop with bfloat16 decoding, in the same run
    assert list(summary["decode_weights"]) == ["bfloat16"]
    assert low["generation_tokens_per_second"] > 0 and low["speedup_vs_float32"] > 0
    assert low["weight_bytes"] == summary["limits"]["policy_weight_bytes"] // 2
    assert low["fraction_of_limit"] == pytest.approx(low["generation_tokens_per_second"] / low["bound"])
    assert low["fraction_of_float32_bound"] == pytest.approx(2 * low["fraction_of_limit"])  # half the bytes: twice the bound
    assert "bfloat16 decoding" in (tmp_path / "benchmark_table.md").read_text()
    assert "overlap" not in summary  # timed with stubbed runs below; the overlapped loop itself in tests/test_jobs_ppo.py


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


# --- the machine's limits and the stages' bounds (uprlhf.perf.limits) ------------------------


class _TinyLM(nn.Module):
    """Token and position tables, one projection, and a vocabulary projection (tied or not)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.position = nn.Embedding(6, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.head


def test_matmul_params_skip_lookup_tables_but_keep_a_tied_vocabulary_projection():
    tied, untied = _TinyLM(tied=True), _TinyLM(tied=False)
    assert matmul_params(tied) == 20 + 40  # proj 4*4+4, head = embedding 10*4 counted once
    assert matmul_params(untied) == 20 + 50  # the input table drops out, the head (with bias) stays
    assert output_params(tied) == 40 and output_params(untied) == 50
    assert weight_bytes(tied) == 4 * 60
    assert weight_bytes(tied.to(torch.bfloat16)) == 2 * 60


def test_decode_weight_bytes_count_one_byte_per_int8_linear_weight_and_the_dtype_size_otherwise():
    tied = _TinyLM(tied=True)
    # proj (16 weights + 4 bias) and the tied head (40): int8 weights, float32 bias
    assert decode_weight_bytes(tied, "int8", []) == 16 + 4 * 4 + 40
    assert decode_weight_bytes(tied, "int8", ["proj"]) == 4 * 20 + 40  # a LoRA target stays float32
    assert decode_weight_bytes(tied, "bfloat16", ["proj"]) == 2 * 60  # every weight cast, LoRA targets too
    assert decode_weight_bytes(tied, "float32", []) == weight_bytes(tied)


def test_lora_params_match_module_names_as_peft_does():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].q_proj = nn.Linear(4, 6)
    model.layers[0].v_proj = nn.Linear(4, 2)
    model.layers[0].xq_proj = nn.Linear(4, 4)  # ends in "q_proj" but is not named q_proj
    assert lora_params(model, ["q_proj", "v_proj"], rank=2) == 2 * (4 + 6) + 2 * (4 + 2)


def test_flop_counts_by_hand():
    assert forward_flops(10, 3) == 60
    # per token: forward 2*100, activation gradients 2*100, weight gradients 2*10
    assert update_flops(100, 10, tokens=2) == 2 * 420
    assert update_flops(100, 100, tokens=1) == 6 * 100  # full fine-tuning: the usual 6 N
    assert update_flops(100, 10, tokens=2, epochs=2, forwards_without_grad=1) == 2 * 840 + 400
    assert scoring_flops(10, shared=50, member=5, members=4) == 2 * 10 * (50 + 4 * 5)
    assert scoring_flops(10, shared=50) == 1000


def test_generation_bound_streams_the_weights_once_per_decode_step():
    assert generation_bound(1e10, weight_bytes=5e8, batch_size=8) == pytest.approx(160.0)


def test_fraction_of_limit():
    assert fraction_of_limit(30.0, 120.0) == 0.25
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            fraction_of_limit(1.0, bad)


def test_policy_sizes_count_the_learner_and_reference_work_by_hand():
    lora = PolicySizes(body=100, head=40, lora=10, value=5, weight_bytes=560)
    # body: 3 tokens x (2*110 + 2*110 + 2*10) + the no-grad forward 3 x 2*110; head: 2 x (90+90+10) + 2 x 90
    assert lora.update(sequence_tokens=3, response_tokens=2, epochs=1) == 3 * 460 + 660 + 2 * 190 + 180
    full = PolicySizes(body=100, head=40, lora=None, value=5, weight_bytes=560)
    assert full.update(3, 2, epochs=1) == (3 * 600 + 600) + (2 * 270 + 180)
    assert lora.reference(3, 2) == 2 * 100 * 3 + 2 * 40 * 2


def test_policy_sizes_from_the_meta_model_match_the_loaded_one(tiny_policy):
    from uprlhf.models import load_policy

    cfg = ModelConfig(name_or_path=str(tiny_policy))
    real = load_policy(cfg)
    sizes = PolicySizes.of(meta_model(cfg), 4, ["q_proj", "v_proj"])
    hidden, vocab = real.config.hidden_size, real.config.vocab_size
    assert real.config.tie_word_embeddings
    assert sizes.body + sizes.head == sum(p.numel() for p in real.parameters())  # tied: the table is the head
    assert sizes.head == vocab * hidden and sizes.value == hidden + 1
    q_v = [m for n, m in real.named_modules() if n.endswith((".q_proj", ".v_proj"))]
    assert sizes.lora == sum(4 * (m.in_features + m.out_features) for m in q_v)
    assert sizes.weight_bytes == 4 * (sizes.body + sizes.head)


def test_meta_reward_model_has_the_loaded_models_parameters(tiny_reward_backbone):
    from uprlhf.models import load_reward_model

    cfg = ModelConfig(name_or_path=str(tiny_reward_backbone))
    assert matmul_params(meta_model(cfg, reward_labels=3)) == matmul_params(load_reward_model(cfg, num_labels=3))


def test_lora_ensemble_params_run_the_frozen_lower_layers_once(tiny_reward_backbone):
    from uprlhf.models import load_reward_model
    from uprlhf.reward.ensembles import ensemble_class

    backbone = ModelConfig(name_or_path=str(tiny_reward_backbone))
    ensemble = ensemble_class("lora")(backbone, EnsembleConfig(k=2, lora_rank=2, lora_top_layers=1), 0.0, 0.0, 0)
    ensemble.attach_adapters()
    shared, member, members = ensemble_params("lora", ensemble)
    lower = ensemble.peft.get_base_model().base_model.encoder.layer[0]
    assert members == 2 and shared == sum(p.numel() for p in lower.parameters())
    whole = matmul_params(load_reward_model(backbone, num_labels=1))
    assert shared + member == whole + ensemble.member_parameter_count() // 2


def test_rl_stage_threads_follow_the_actors():
    rl_cfg = SimpleNamespace(
        rollout=SimpleNamespace(cpus_per_worker=0.5, torch_threads=2),
        learner=SimpleNamespace(cpus_per_worker=0.5),
        scorer_cpus=1.5,
        scorer_threads=None,
    )
    assert rl_stage_threads(rl_cfg) == {"generation": 2, "update": 1, "scoring": 2}


def test_rl_benchmark_reports_each_stage_against_its_limit(tiny_policy, tiny_reward_backbone, tmp_path, monkeypatch):
    """The run itself stubbed (no Ray): three steps of records and replay rows with hand-set tokens and seconds."""
    import jobs.drivers.ppo
    from uprlhf.paths import RunPaths
    from uprlhf.rl.replay import ReplayBuffer

    runs = {}

    def fake_run_ppo(rl_cfg, run_dir, name):
        runs[name] = rl_cfg
        run_dir.mkdir(parents=True)
        replay = ReplayBuffer(RunPaths(run_dir).replay)
        lines = []
        for step in range(3):
            lengths = [3, 5, 2, 4]  # response tokens per sample; prompts of 6 tokens
            replay.append(step, {
                "sample": list(range(4)), "prompt": ["a good film"] * 4, "response": ["it was fine"] * 4,
                "prompt_ids": [[1] * 6] * 4, "response_ids": [[2] * n for n in lengths],
                "logprobs": [[0.0] * n for n in lengths], "ref_logprobs": [[0.0] * n for n in lengths],
                "member_rewards": [[0.0] * 3] * 4, "reward_mean": [0.0] * 4, "reward_std": [0.0] * 4,
                "penalized_reward": [0.0] * 4, "gold": [None] * 4, "policy_version": [step] * 4, "policy_lag": [0] * 4, "ensemble_version": [0] * 4,
            })
            seconds = {"seconds_generate": 2.0, "seconds_score": 0.5, "seconds_train": 1.0, "seconds_sync": 0.1}
            lines.append(json.dumps({"step": step, "step_seconds": 4.0, "response_tokens": 14.0, "ray_overhead_seconds": 0.1, **seconds}))
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    monkeypatch.setattr(jobs.drivers.ppo, "run_ppo", fake_run_ppo)
    summary = main([
        "rl", "--output-dir", str(tmp_path), f"policy.name_or_path={tiny_policy}", f"backbone.name_or_path={tiny_reward_backbone}",
        "lora_rank=4", "k=3", "steps=3", "batch_size=4", "trl=false", "limits_seconds=0.02",
    ])
    limits, work = summary["limits"], summary["work"]
    assert limits["threads"] == {"generation": 2, "update": 1, "scoring": 2}
    assert set(limits["matmul_flops_per_s"]) == {"1", "2"}
    assert work["tokens"]["sequence"] == 2 * (4 * 6 + 14) and work["tokens"]["response"] == 2 * 14 == work["generation"]
    sizes = PolicySizes(**{k: v for k, v in work["params"].items() if k != "reward"})
    assert work["update"] == sizes.update(2 * 38, 2 * 14, epochs=1)
    assert work["scoring"] == sizes.reference(2 * 38, 2 * 14) + forward_flops(work["params"]["reward"], work["tokens"]["reward"])
    bounds = limits["bounds"]
    assert bounds["generation"] == pytest.approx(limits["memory_bytes_per_s"] / sizes.weight_bytes * 4)
    assert bounds["update"] == 2 * limits["matmul_flops_per_s"]["1"] and bounds["scoring"] == limits["matmul_flops_per_s"]["2"]
    seconds = {"generation": 4.0, "update": 2.0, "scoring": 1.0}  # two timed steps
    for stage, value in summary["fraction_of_limit"].items():
        assert value == pytest.approx(work[stage] / seconds[stage] / bounds[stage])
    assert summary["achieved"]["generation"] == pytest.approx(summary["generation_tokens_per_second"])
    assert "% of the limit" in (tmp_path / "benchmark_table.md").read_text()
    overlap = summary["overlap"]  # the loop split over the cores, synchronous and one step off policy
    split = {name: (c.async_steps, c.learner.num_workers, c.learner.cpus_per_worker, c.rollout.cpus_per_worker,
                    c.rollout.torch_threads, c.scorer_cpus) for name, c in runs.items() if name.endswith(("sync", "async"))}
    assert split == {"benchmark-sync": (0, 1, 0.75, 0.75, 1, 0.5), "benchmark-async": (1, 1, 0.75, 0.75, 1, 0.5)}
    assert overlap == {"cpus_each": 0.75, "sync_step_seconds": 4.0, "async_step_seconds": 4.0, "ratio": 1.0}
    assert "one-step-off-policy overlap (rl.async_steps=1, rollout and learner on 0.75 CPU each): step 4.00 s" in \
        (tmp_path / "benchmark_table.md").read_text()


class _WordTokenizer:
    """One token per word of prompt and response, truncated as a Hugging Face tokenizer truncates."""

    def __call__(self, prompts, responses, truncation, max_length):
        return {"input_ids": [[0] * min(len(p.split()) + len(r.split()), max_length) for p, r in zip(prompts, responses)]}


def test_replay_tokens_count_the_timed_steps_real_tokens():
    table = pa.table({
        "step": [0, 1, 1, 2],
        "sample": [0, 0, 1, 0],
        "prompt": ["a b", "a b c", "a", "a b"],
        "response": ["x", "x y z w", "x y", "x"],
        "prompt_ids": [[1, 2], [1, 2, 3], [1], [1, 2]],
        "response_ids": [[7], [7, 8, 9], [7, 8], [7]],
    })
    counted = replay_tokens(table, [1, 2], _WordTokenizer(), reward_max_length=5)
    assert counted == {"sequence": (3 + 3) + (1 + 2) + (2 + 1), "response": 3 + 2 + 1, "reward": 5 + 3 + 3}


MACHINE = {"matmul_flops_per_s": {"1": 50e9, "2": 90e9}, "matmul_dtype": "float32", "memory_bytes_per_s": 10e9, "memory_threads": 2}


def test_rl_limit_summary_by_hand():
    threads = {"generation": 2, "update": 1, "scoring": 2}
    work = {"generation": 400.0, "update": 2e11, "scoring": 9e10}
    seconds = {"generation": 10.0, "update": 4.0, "scoring": 2.0}
    summary = rl_limit_summary(MACHINE, threads, learner_workers=2, batch_size=8, policy_bytes=5e8, work=work, seconds=seconds)
    assert summary["limits"]["bounds"] == pytest.approx({"generation": 160.0, "update": 100e9, "scoring": 90e9})
    assert summary["achieved"] == pytest.approx({"generation": 40.0, "update": 5e10, "scoring": 4.5e10})
    assert summary["fraction_of_limit"] == pytest.approx({"generation": 0.25, "update": 0.5, "scoring": 0.5})
    assert summary["limits"]["threads"] == threads and summary["limits"]["memory_bytes_per_s"] == 10e9
    lines = rl_limit_lines(summary, learner_workers=2, batch_size=8)
    assert lines[0] == limits_line(summary["limits"])
    assert "50.0 GFLOP/s on 1 thread(s), 90.0 GFLOP/s on 2 thread(s)" in lines[0] and "10.0 GB/s" in lines[0]
    assert lines[1].startswith("- generation: 40.0 tokens/s of 160.0") and lines[1].endswith("25.0 % of the limit")
    assert lines[2].startswith("- update: 50.00 GFLOP/s of 100.0") and "× 2 learner ranks" in lines[2]


def test_scoring_limit_summary_by_hand():
    params = {"single": (1_000_000, 0, 1), "lora": (400_000, 700_000, 5)}
    summary = scoring_limit_summary(MACHINE, 2, tokens=1000, params=params, seconds={"single": 0.1, "lora": 1.0})
    assert summary["limits"]["bounds"] == {"scoring": 90e9}
    assert summary["work"]["scoring"] == {"single": 2e9, "lora": 2 * 1000 * (400_000 + 5 * 700_000)}
    assert summary["fraction_of_limit"]["scoring"] == pytest.approx({"single": 2e10 / 90e9, "lora": 7.8e9 / 90e9})


def test_measurements_are_positive_and_restore_the_thread_count():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        peak = measure_matmul_peak(2, size=32, repeats=2, seconds=0.01)
        assert torch.get_num_threads() == 1
        bandwidth = measure_memory_bandwidth(2, nbytes=2**20, repeats=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert math.isfinite(peak) and peak > 0
    assert math.isfinite(bandwidth) and bandwidth > 0


@pytest.mark.parametrize("kind", ["single", "multi_backbone"])
def test_the_scoring_benchmark_refuses_a_kind_it_cannot_time_and_lists_those_it_can(kind):
    with pytest.raises(ValueError, match=rf"kinds: '{kind}' cannot be timed here; allowed: independent, linear, frozen_heads, lora, diverse_lora"):
        ScoringBenchmarkConfig(kinds=[kind])

"""jobs.pipeline: a stage that cannot run is found before the first stage starts (no Ray, no data built)."""

import pytest

from jobs import pipeline
from uprlhf.config import PipelineConfig, load_config


def tiny(tiny_policy, tiny_reward_backbone, *overrides):
    models = [f"data.policy.name_or_path={tiny_policy}", f"rl.base.policy.model.name_or_path={tiny_policy}",
              f"reward.backbone.name_or_path={tiny_reward_backbone}"]
    return [*models, *overrides]


def run_main(tmp_path, capsys, monkeypatch, argv) -> str:
    for stage in ("prepare_data", "run_train_reward", "run_ppo"):
        monkeypatch.setattr(pipeline, stage, lambda *a, stage=stage, **k: pytest.fail(f"{stage} must not start"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--output-dir", str(out), *argv])
    assert exit_info.value.code == 2
    assert not out.exists()  # nothing written, nothing spent
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_too_few_rl_prompts_for_the_evaluation_fail_before_the_data_stage(tiny_policy, tiny_reward_backbone, tmp_path, capsys, monkeypatch):
    err = run_main(tmp_path, capsys, monkeypatch, tiny(tiny_policy, tiny_reward_backbone, "data.n_prompts=10", "rl.base.eval_prompts=16"))
    assert err == (
        "error: data.n_prompts=10 with data.split=[0.2, 0.4, 0.4] gives 4 RL prompts, which leave none for training "
        "after rl.base.eval_prompts=16; raise data.n_prompts or lower rl.base.eval_prompts\n"
    )


def test_every_infeasible_stage_is_listed_at_once(tiny_policy, tiny_reward_backbone, tmp_path, capsys, monkeypatch):
    argv = tiny(tiny_policy, tiny_reward_backbone, "data.n_prompts=100", "rl.base.eval_prompts=16", "rl.base.ppo.batch_size=32",
                "rl.base.ppo.minibatch_size=8", "rl.base.reward_kind=lora", "rl.base.policy.lora_target_modules=[q_proj, query]",
                "reward.kinds=[linear, diverse_lora]", "reward.ensemble.lora_target_modules=[q_proj]")
    lines = run_main(tmp_path, capsys, monkeypatch, argv).removeprefix("error: ").splitlines()
    assert lines[0] == "rl.base.reward_kind='lora' is not trained here; reward.kinds=['linear', 'diverse_lora']"
    assert lines[1] == (
        "data.n_prompts=100 with data.split=[0.2, 0.4, 0.4] gives 40 RL prompts: 24 for training after "
        "rl.base.eval_prompts=16, fewer than the 32 prompts a step samples (rl.base.ppo.batch_size=32 / "
        "samples_per_prompt=1; a batch would repeat prompts)"
    )
    assert lines[2].startswith(f"reward.ensemble.lora_target_modules: {tiny_reward_backbone} has no module called 'q_proj'; ")
    assert lines[2].endswith(" (kinds diverse_lora put LoRA on them)")
    assert lines[3].startswith(f"rl.base.policy.lora_target_modules: {tiny_policy} has no module called 'query'; ")
    assert len(lines) == 4


def test_too_few_reward_prompts_are_found_up_front(monkeypatch):
    monkeypatch.setattr(pipeline, "model_problems", lambda cfg: [])
    cfg = load_config(PipelineConfig, None, ["data.n_prompts=10", "data.split=[0.8, 0.1, 0.1]", "rl.base.prompts=p.jsonl"])
    # rl.base.prompts is a file of its own, so the split's 1 RL prompt is no problem
    assert pipeline.feasibility_problems(cfg) == [
        "data.n_prompts=10 with data.split=[0.8, 0.1, 0.1] gives 1 reward prompt(s); reward training needs at least 2"
    ]


def test_the_demo_config_is_feasible():
    from pathlib import Path

    demo = Path(pipeline.__file__).parent / "configs" / "demo.yaml"
    assert pipeline.feasibility_problems(load_config(PipelineConfig, demo)) == []


def test_with_an_sft_section_every_ppo_run_starts_from_and_regularises_towards_the_sft_policy(tmp_path):
    from pathlib import Path

    cfg = load_config(PipelineConfig, None, ["sft={}", "data.sft_completions_per_prompt=4"])
    for rl in pipeline.stage_configs(cfg, tmp_path).values():
        assert Path(rl.policy.model.name_or_path) == tmp_path / "sft" / "policy"  # its untouched copy is the reference
    plain = load_config(PipelineConfig, None, [])
    assert all(rl.policy.model.name_or_path == "packaged:smollm2" for rl in pipeline.stage_configs(plain, tmp_path).values())


def test_an_sft_section_without_examples_or_for_another_policy_is_refused():
    from uprlhf.config import ConfigError

    with pytest.raises(ConfigError, match=r"sft is set but the data stage writes no SFT examples: set data.sft_completions_per_prompt >= 1"):
        load_config(PipelineConfig, None, ["sft={}"])
    with pytest.raises(ConfigError, match=r"sft.policy.prompt_template \('plain'\) differs from rl.base.policy.prompt_template"):
        load_config(PipelineConfig, None, ["sft.policy.prompt_template=plain", "data.sft_completions_per_prompt=2"])
    assert load_config(PipelineConfig, None, ["sft.data_file=mine.jsonl"]).sft.data_file == "mine.jsonl"


def test_the_pipeline_runs_sft_on_its_data_before_the_reward_stage(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "prepare_data", lambda cfg, data_dir: calls.append(("data", data_dir)) or {})
    monkeypatch.setattr(pipeline, "run_sft", lambda cfg, out: calls.append(("sft", cfg.data_dir, out)) or {"policy": "p"})
    monkeypatch.setattr(pipeline, "run_train_reward", lambda cfg, out: calls.append(("reward",)) or {})

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pipeline, "run_ppo", stop)
    cfg = load_config(PipelineConfig, None, ["sft={}", "data.sft_completions_per_prompt=4"])
    with pytest.raises(Stop):
        pipeline.run_pipeline(cfg, tmp_path)
    assert calls == [("data", tmp_path / "data"), ("sft", str(tmp_path / "data"), tmp_path / "sft"), ("reward",)]

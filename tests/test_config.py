from pathlib import Path

import pytest

from jobs import train_reward
from uprlhf.config import (
    ConfigError,
    PipelineConfig,
    TrainRewardConfig,
    describe,
    fingerprint,
    load_config,
    parse_override,
)


def test_yaml_and_dotted_overrides_are_merged_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ensemble: {k: 3}\ntrain: {lr: 0.001}\n")
    cfg = load_config(TrainRewardConfig, path, ["train.num_workers=1", "kinds=[lora, linear]", "ensemble.lora_top_layers=2"])
    assert cfg.ensemble.k == 3
    assert cfg.train.lr == 0.001
    assert cfg.train.num_workers == 1
    assert cfg.kinds == ["lora", "linear"]
    assert cfg.ensemble.lora_top_layers == 2


def test_bad_kind_names_field_value_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(TrainRewardConfig, None, ["kinds=[lora, bagging]"])
    message = str(err.value)
    assert message.count("\n") == 0
    assert "kinds.1 = 'bagging'" in message
    for kind in ("independent", "linear", "frozen_heads", "lora", "diverse_lora"):
        assert kind in message


def test_out_of_range_value_says_the_bound():
    with pytest.raises(ConfigError, match=r"train.zero_stage = 4: Input should be less than or equal to 3"):
        load_config(TrainRewardConfig, None, ["train.zero_stage=4"])


def test_unknown_key_lists_allowed_fields():
    with pytest.raises(ConfigError) as err:
        load_config(TrainRewardConfig, None, ["ensemble.kk=3"])
    assert "ensemble.kk: unknown field; allowed: bootstrap, k, lora_alpha" in str(err.value)


def test_cross_field_rule_is_reported():
    with pytest.raises(ConfigError, match=r"min_words \(9\) must not exceed max_words \(8\)"):
        load_config(PipelineConfig, None, ["data.min_words=9"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("train.lr")


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(TrainRewardConfig, tmp_path / "nope.yaml")


def test_job_exits_2_with_one_line_and_no_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_reward.main(["--output-dir", str(tmp_path), "train.num_workers=0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: train.num_workers = 0: Input should be greater than or equal to 1")
    assert "Traceback" not in err


def test_every_field_is_documented():
    lines = describe(PipelineConfig)
    assert len(lines) > 30
    assert all(not line.endswith(": None") for line in lines)


def test_fingerprint_changes_with_any_field():
    a = load_config(PipelineConfig, None)
    b = load_config(PipelineConfig, None, ["data.seed=1"])
    assert fingerprint(a) == fingerprint(load_config(PipelineConfig, None))
    assert fingerprint(a) != fingerprint(b)


def test_replace_revalidates_unlike_model_copy():
    from uprlhf.config import RLConfig, SelectorConfig

    cfg = SelectorConfig()
    assert cfg.replace(strategy="ugda", seed=3).strategy == "ugda"
    assert cfg.strategy == "off"
    with pytest.raises(ValueError, match="unknown selection strategy 'best'"):
        cfg.replace(strategy="best")
    with pytest.raises(ValueError, match="must be a multiple of ppo.minibatch_size"):
        RLConfig().replace(ppo={"batch_size": 5, "minibatch_size": 2})


def test_rollout_options_are_one_type_per_backend():
    from uprlhf.config import HFRolloutConfig, RLConfig, VLLMRolloutConfig

    assert type(load_config(RLConfig, None).rollout) is HFRolloutConfig
    vllm = load_config(RLConfig, None, ["rollout.backend=vllm", "rollout.gpus_per_worker=1", "rollout.gpu_memory_utilization=0.5"])
    assert isinstance(vllm.rollout, VLLMRolloutConfig) and vllm.rollout.gpu_memory_utilization == 0.5
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization: unknown field \(for rollout backend=hf\)"):
        load_config(RLConfig, None, ["rollout.gpu_memory_utilization=0.5"])
    with pytest.raises(ConfigError, match="backend vllm needs gpus_per_worker > 0"):
        load_config(RLConfig, None, ["rollout.backend=vllm"])
    with pytest.raises(ConfigError, match="unknown rollout backend 'tgi'; allowed: 'hf', 'vllm'"):
        load_config(RLConfig, None, ["rollout.backend=tgi"])


def test_describe_prints_each_kind_of_a_union_and_the_registered_names():
    from uprlhf.config import RLConfig

    lines = describe(RLConfig)
    assert "selector.labeler.name (default 'gold'): Which kind; one of: gold, llm_judge, human." in lines
    assert any(line.startswith("selector.labeler.base_url [name=llm_judge] (required): ") for line in lines)
    assert any(line.startswith("selector.labeler.wait_s [name=human] (default 3600.0): ") for line in lines)
    assert any(line.startswith("rollout.gpu_memory_utilization [backend=vllm] (default 0.3): ") for line in lines)
    assert sum(line.startswith("rollout.num_workers ") for line in lines) == 1  # shared fields once
    assert any(line.startswith("penalty.name (default 'mean'): ") and line.endswith("One of: mean, lcb, uwo, up_rlhf, var_kl.") for line in lines)


def test_every_config_class_is_reexported_from_uprlhf_config():
    import uprlhf.config as config
    from uprlhf.data import config as data
    from uprlhf.reward import config as reward
    from uprlhf.rl import config as rl
    from uprlhf.section import Section
    from uprlhf.selection import config as selection

    for module in (data, reward, rl, selection):
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, Section) and not name.startswith("_") and value.__module__ == module.__name__:
                assert getattr(config, name) is value and name in config.__all__, name


# Issue 11: non-finite numbers, penalty bounds, duplicate keys, unreadable files, short nested errors.


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["kl.coef=.inf"], "kl.coef = inf"),
        (["ppo.clip_range=.inf"], "ppo.clip_range = inf"),
        (["ppo.lr=-.inf"], "ppo.lr = -inf"),
        (["penalty.name=up_rlhf", "penalty.coefficients.beta=.nan"], "penalty.coefficients.beta = nan"),
        (["kl.target=.inf"], "kl.target = inf"),
    ],
)
def test_non_finite_numbers_are_rejected_in_one_line_naming_the_field(overrides, field):
    from uprlhf.config import RLConfig

    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, None, overrides)
    assert str(err.value) == f"config: {field}: Input should be a finite number"


def test_every_config_section_refuses_inf_and_nan():
    import uprlhf.config as config
    from tune.config import SweepConfig
    from uprlhf.section import Section

    sections = [v for v in vars(config).values() if isinstance(v, type) and issubclass(v, Section)] + [SweepConfig]
    assert len(sections) > 20
    for section in sections:
        assert section.model_config.get("allow_inf_nan") is False, section.__name__


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["penalty.name=up_rlhf", "penalty.coefficients.beta=-100"], "coefficients.beta = -100: must be >= 0 (a strength of penalty 'up_rlhf')"),
        (["penalty.name=lcb", "penalty.coefficients.lam=-5"], "coefficients.lam = -5: must be >= 0 (a strength of penalty 'lcb')"),
        (["penalty.name=uwo", "penalty.coefficients.lam=-0.5"], "coefficients.lam = -0.5: must be >= 0 (a strength of penalty 'uwo')"),
        (["penalty.name=var_kl", "penalty.coefficients.beta=-1"], "coefficients.beta = -1: must be >= 0 (a strength of penalty 'var_kl')"),
    ],
)
def test_negative_penalty_strength_is_a_config_error(overrides, message):
    from uprlhf.config import RLConfig

    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, None, overrides)
    assert str(err.value).startswith(f"config: penalty: {message}")
    assert load_config(RLConfig, None, [overrides[0], overrides[1].split("=")[0] + "=0"]).penalty.name


def test_kl_loss_defaults_to_up_rlhf_eq_15_and_keeps_the_per_token_form_by_name():
    from uprlhf.config import RLConfig

    assert load_config(RLConfig, None, []).kl.loss_form == "sequence_sq"
    cfg = load_config(RLConfig, None, ["penalty.name=mean", "kl.placement=loss", "kl.loss_form=per_token", "kl.estimator=k3"])
    assert cfg.kl_in_loss() and not cfg.kl_in_reward() and cfg.kl.loss_form == "per_token"
    with pytest.raises(ConfigError, match="kl.loss_form = 'k2'"):
        load_config(RLConfig, None, ["kl.loss_form=k2"])


def test_var_kl_power_is_a_non_negative_coefficient():
    from uprlhf.config import RLConfig

    assert load_config(RLConfig, None, ["penalty.name=var_kl", "penalty.coefficients.power=2"]).penalty.coefficients == {"power": 2.0}
    with pytest.raises(ConfigError, match=r"coefficients.power = -1: must be >= 0 \(a strength of penalty 'var_kl'\)"):
        load_config(RLConfig, None, ["penalty.name=var_kl", "penalty.coefficients.power=-1"])


def test_penalty_member_and_a_single_reward_model_are_checked_against_the_checkpoints_k():
    from uprlhf.config import RLConfig

    with pytest.raises(ConfigError, match="penalty.member = -1: Input should be greater than or equal to 0"):
        load_config(RLConfig, None, ["penalty.member=-1"])
    cfg = load_config(RLConfig, None, ["penalty.name=lcb", "penalty.member=5", "reward_kind=single", "reward_k=1"])
    with pytest.raises(ConfigError, match="reward_k must be >= 2 for kind .linear."):
        load_config(RLConfig, None, ["reward_k=1"])
    assert cfg.penalty.ensemble_problems(1, "single") == [
        "penalty 'lcb' needs an ensemble uncertainty, but the reward checkpoint has K = 1 (kind 'single'); use penalty.name=mean",
        "penalty.member=5 is out of range: the reward checkpoint has K = 1 member(s), so it must be 0 to 0 (or null for the ensemble mean)",
    ]
    assert cfg.penalty.ensemble_problems(6, "linear") == []
    assert cfg.penalty.replace(name="mean", member=0).ensemble_problems(1, "single") == []
    assert cfg.penalty.replace(member=None).ensemble_problems(5, "linear") == []


def test_penalty_strength_bounds_also_hold_in_pipeline_penalty_lists():
    with pytest.raises(ConfigError, match=r"rl.penalties.1: coefficients.beta = -2: must be >= 0"):
        load_config(PipelineConfig, None, ["rl.penalties=[{name: mean}, {name: up_rlhf, coefficients: {beta: -2}}]"])


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("train:\n  lr: 0.001\n  epochs: 2\n  lr: 0.1\n", 4, "lr"),
        ("train: {lr: 0.001}\nkinds: [linear]\ntrain: {epochs: 3}\n", 3, "train"),
    ],
)
def test_duplicate_yaml_key_names_file_line_and_key(tmp_path, text, line, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(TrainRewardConfig, path)
    assert str(err.value) == f"{path}:{line}: duplicate key {key!r}"


def test_yaml_anchors_and_merge_keys_may_still_override_merged_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ensemble: &shape {k: 3, lora_rank: 4}\ntrain: {lr: 0.001}\n")
    assert load_config(TrainRewardConfig, path).ensemble.k == 3
    path.write_text("data_dir: null\nensemble:\n  <<: {k: 3, lora_rank: 4}\n  k: 4\n")
    assert load_config(TrainRewardConfig, path).ensemble.k == 4


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train: {lr: 0.001}  # r\u00e9glage\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(TrainRewardConfig, path)
    assert str(err.value) == f"{path}: not UTF-8 text (bad byte at offset 23); save the config as UTF-8"


def _main_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_reward.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_non_utf8_config_file_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kinds: [linear]  # \xe9\n")
    err = _main_error(capsys, ["--config", str(path), "--output-dir", str(tmp_path / "out")])
    assert err.startswith(f"error: {path}: not UTF-8 text")


def test_unknown_packaged_model_exits_2_with_one_line(tmp_path, capsys):
    err = _main_error(capsys, ["--output-dir", str(tmp_path / "out"), "backbone.name_or_path=packaged:gpt5"])
    assert err == (
        "error: config: backbone.name_or_path = 'packaged:gpt5': unknown packaged model 'packaged:gpt5'; "
        "allowed: packaged:smollm2, packaged:minilm\n"
    )


def test_output_dir_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    err = _main_error(capsys, ["--output-dir", str(taken)])
    assert err == f"error: --output-dir {taken}: exists and is not a folder\n"


def test_nested_validator_error_leads_with_field_and_reason_in_a_short_line():
    demo = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"  # a full rl.base section
    with pytest.raises(ConfigError) as err:
        load_config(PipelineConfig, demo, ["rl.base.ppo.batch_size=6", "rl.base.ppo.minibatch_size=4"])
    message = str(err.value)
    assert message.startswith(f"{demo}: rl.base: ppo.batch_size=6 must be a multiple of ppo.minibatch_size=4 (got {{")
    assert len(message) - len(str(demo)) < 160 and message.endswith("…)")
    assert message.count("\n") == 0


def test_a_huge_input_is_cut_short_but_a_small_value_still_leads():
    from uprlhf.config import RLConfig

    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, None, [f"policy.prompt_template={'x' * 5000}"])
    message = str(err.value)
    assert message.startswith("config: policy.prompt_template: unknown prompt template")
    assert len(message) < 500
    with pytest.raises(ConfigError, match=r"^config: ppo.steps = 0: Input should be greater than or equal to 1$"):
        load_config(RLConfig, None, ["ppo.steps=0"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["judges=[textblob, vader]"], "judges.1 = 'vader': already the gold; each scorer judges once"),
        (["gold=learned", "judges=[vader, vader]"], "judges.1 = 'vader': already a judge; each scorer judges once"),
        (["judges=[human]"], "judges.0 = 'human': unknown gold scorer 'human'"),
    ],
)
def test_each_judge_is_a_gold_scorer_other_than_the_gold_and_judges_once(overrides, message):
    from uprlhf.config import RLConfig

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(RLConfig, None, overrides)
    assert load_config(RLConfig, None, ["judges=[textblob, learned]"]).judges == ["textblob", "learned"]


def test_gold_labeler_left_at_its_default_labels_with_the_runs_gold():
    from uprlhf.config import RLConfig

    assert load_config(RLConfig, None, ["gold=learned"]).selector.labeler.gold == "learned"
    assert load_config(RLConfig, None, []).selector.labeler.gold == "vader"
    chosen = load_config(RLConfig, None, ["gold=learned", "selector.labeler={name: gold, gold: textblob}"])
    assert chosen.selector.labeler.gold == "textblob"
    # a dumped config loads back to the same labeler
    again = RLConfig.model_validate(chosen.model_dump(mode="json"))
    assert again.selector.labeler == chosen.selector.labeler

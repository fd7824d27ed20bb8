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

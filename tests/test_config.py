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

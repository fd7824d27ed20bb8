"""jobs.drivers.inputs: what the sampling jobs check before any actor starts (no Ray here)."""

import json

import pytest

from jobs.drivers.inputs import rl_inputs, sampling_inputs
from tests.conftest import tiny_rl_tree
from uprlhf.config import RLConfig, build
from uprlhf.data.loaders import DataError, load_prompts


def test_unknown_lora_target_of_the_policy_is_one_line_before_any_actor(tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"policy.lora_target_modules": ["q_proj", "qkv"]})
    with pytest.raises(DataError) as err:
        sampling_inputs(build(RLConfig, tree), tmp_path)
    assert err.value.problems == [
        f"policy.lora_target_modules: {tiny_policy} has no module called 'qkv'; "
        "its linear modules are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"
    ]


def test_full_finetuning_skips_the_lora_target_check(tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"policy.lora_rank": None, "policy.lora_target_modules": ["qkv"]})
    assert len(sampling_inputs(build(RLConfig, tree), tmp_path).prompts) == 40


def test_rl_prompts_of_a_data_dir_are_read_in_any_canonical_format(tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    rows = load_prompts(tiny_prompts).rows
    data = tmp_path / "data"
    data.mkdir()
    (data / "rl_prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, prompts=None, data_dir=str(data))
    inputs = rl_inputs(build(RLConfig, tree), tmp_path)
    assert inputs.train_prompts + inputs.eval_prompts == [r["prompt"] for r in rows]


def test_a_data_dir_without_rl_prompts_names_what_it_looked_for(tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    (tmp_path / "data").mkdir()
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, prompts=None, data_dir=str(tmp_path / "data"))
    with pytest.raises(DataError) as err:
        sampling_inputs(build(RLConfig, tree), tmp_path)
    assert err.value.problems == [
        f"{tmp_path / 'data'}: no rl_prompts data; expected one of rl_prompts.parquet, rl_prompts.jsonl, "
        "rl_prompts.json, rl_prompts.csv or a saved datasets folder rl_prompts/"
    ]


def test_a_penalty_member_beyond_the_checkpoints_k_is_one_line(tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"penalty.member": 3})
    with pytest.raises(DataError) as err:
        rl_inputs(build(RLConfig, tree), tmp_path)
    assert err.value.problems == [
        "penalty.member=3 is out of range: the reward checkpoint has K = 3 member(s), so it must be 0 to 2 "
        "(or null for the ensemble mean)"
    ]
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"penalty.member": 2})
    assert rl_inputs(build(RLConfig, tree), tmp_path).train_prompts


@pytest.mark.parametrize("penalty", ["lcb", "uwo", "up_rlhf", "var_kl"])
def test_a_single_reward_model_refuses_penalties_that_need_an_uncertainty(penalty, tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path):
    from uprlhf.reward.ensembles import MANIFEST
    from uprlhf.reward.training import TOKENIZER_DIR

    single = tmp_path / "single"
    (single / TOKENIZER_DIR).mkdir(parents=True)
    (single / MANIFEST).write_text(json.dumps({"kind": "single", "k": 1}))  # all the checks read of a checkpoint
    tree = tiny_rl_tree(tiny_policy, single, tiny_prompts, reward_k=1, reward_kind="single", **{"penalty.name": penalty})
    with pytest.raises(DataError) as err:
        rl_inputs(build(RLConfig, tree), tmp_path)
    assert err.value.problems == [
        f"penalty {penalty!r} needs an ensemble uncertainty, but the reward checkpoint has K = 1 (kind 'single'); "
        "use penalty.name=mean"
    ]
    tree = tiny_rl_tree(tiny_policy, single, tiny_prompts, reward_k=1, reward_kind="single", **{"penalty.name": "mean", "penalty.member": 0})
    assert rl_inputs(build(RLConfig, tree), tmp_path).reward_checkpoint == single

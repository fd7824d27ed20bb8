import json
import shutil

import pytest
import torch

from uprlhf.config import ConfigError, load_config
from uprlhf.rl.config import ExtraReward, HFRolloutConfig, PolicyConfig, RLConfig
from uprlhf.rl.extra_rewards import ExtraRewardError, ExtraRewards, add_extras, extra_metrics
from uprlhf.rl.rollout import HFRolloutEngine
from uprlhf.reward.ensembles import MemberStats, write_member_stats
from uprlhf.rl.scoring import EnsembleScorer, ScoredBatch, check_reward_checkpoint


def policy_cfg(path) -> PolicyConfig:
    return PolicyConfig(model={"name_or_path": str(path)}, lora_target_modules=["q_proj", "v_proj"], prompt_template="plain", lora_rank=4)


def test_scores_every_member_and_the_reference_logprobs(tiny_policy, tiny_reward_checkpoint):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=5))
    batch = engine.generate(["the movie was", "this film is", "the plot felt"], seed=0)
    scorer = EnsembleScorer(tiny_reward_checkpoint, policy_cfg(tiny_policy), max_length=32, temperature=1.0)
    scores = scorer.score(batch)
    assert scores["member_rewards"].shape == (3, 3)
    # a fresh LoRA policy is the reference, so its log-probs are the sampler's
    assert torch.allclose(scores["ref_logprobs"], batch.logprobs, atol=1e-4)
    again = scorer.member_rewards(batch.prompts, batch.responses)
    assert torch.allclose(scores["member_rewards"], again)


def test_reward_models_read_text_so_tokenizers_may_differ(tiny_policy, tiny_reward_checkpoint):
    scorer = EnsembleScorer(tiny_reward_checkpoint, policy_cfg(tiny_policy), max_length=32, temperature=1.0)
    one = scorer.member_rewards(["the movie was"], ["great and lovely"])
    batch = scorer.member_rewards(["the movie was", "x"], ["great and lovely", "awful"])
    assert torch.allclose(one[0], batch[0], atol=1e-5)


def test_checkpoint_kind_and_k_must_match_the_config(tiny_reward_checkpoint, tmp_path):
    assert check_reward_checkpoint(tiny_reward_checkpoint, "linear", 3) == []
    problems = check_reward_checkpoint(tiny_reward_checkpoint, "lora", 5)
    assert any("kind is 'linear' but reward_kind='lora'" in p for p in problems)
    assert any("K is 3 but reward_k=5" in p for p in problems)
    assert "not a reward ensemble checkpoint" in check_reward_checkpoint(tmp_path, "linear", 3)[0]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_reward_checkpoint, copy)
    shutil.rmtree(copy / "tokenizer")
    assert any("no tokenizer/" in p for p in check_reward_checkpoint(copy, "linear", 3))
    assert json.loads((copy / "ensemble.json").read_text())["k"] == 3


def test_a_normalised_scorer_needs_member_stats_and_standardises_every_member(tiny_policy, tiny_reward_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_reward_checkpoint, tmp_path / "copy")
    assert any("no member_stats to normalise the members by" in p for p in check_reward_checkpoint(copy, "linear", 3, normalise=True))
    write_member_stats(copy, MemberStats([1.0, 0.0, -1.0], [0.5, 2.0, 1.0], 6))
    assert check_reward_checkpoint(copy, "linear", 3, normalise=True) == []
    raw = EnsembleScorer(copy, policy_cfg(tiny_policy), max_length=32, temperature=1.0)
    normalised = EnsembleScorer(copy, policy_cfg(tiny_policy), max_length=32, temperature=1.0, normalise=True)
    expected = (raw.member_rewards(PROMPTS, RESPONSES) - torch.tensor([1.0, 0.0, -1.0])) / torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(normalised.member_rewards(PROMPTS, RESPONSES), expected)
    normalised.load_ensemble(copy, 1)  # a refined ensemble is scored the same way
    torch.testing.assert_close(normalised.member_rewards(PROMPTS, RESPONSES), expected)


# Issue 15: rewards beside the ensemble (weighted rules named by import path, computed on the scorer).

RESPONSES = ["great fun.", "awful", "so very dull!"]
PROMPTS = ["the movie was", "this film is", "the plot felt"]
TWO_RULES = [
    {"fn": "uprlhf.rl.rules:response_length_penalty", "weight": 0.1},
    {"fn": "uprlhf.rl.rules:ends_with_punctuation", "weight": 0.5, "name": "format"},
]


def test_reward_is_the_penalised_reward_plus_each_weighted_rule_and_each_rule_is_logged():
    cfg = RLConfig(extra_rewards=TWO_RULES)
    extras = ExtraRewards(cfg.extra_rewards)(PROMPTS, RESPONSES, step=3)
    # words: 2, 1, 3 → -2, -1, -3; sentence ends: '.', none, '!' → 1, 0, 1
    assert list(extras) == ["response_length_penalty", "format"]
    assert extras["response_length_penalty"].tolist() == [-2.0, -1.0, -3.0]
    assert extras["format"].tolist() == [1.0, 0.0, 1.0]
    penalized = torch.tensor([0.5, -0.25, 1.0])
    total = add_extras(penalized, extras, cfg.extra_rewards)
    # 0.5 - 0.2 + 0.5, -0.25 - 0.1 + 0, 1.0 - 0.3 + 0.5
    assert total.tolist() == pytest.approx([0.8, -0.35, 1.2])
    assert penalized.tolist() == [0.5, -0.25, 1.0]  # the penalised reward itself is kept as it was
    metrics = extra_metrics(extras)
    assert metrics == pytest.approx({"reward_extra/response_length_penalty": -2.0, "reward_extra/format": 2 / 3})


def test_a_rule_weighted_0_is_logged_but_not_trained_on():
    cfg = RLConfig(extra_rewards=[{"fn": "tests.extra_rewards:exclamations", "weight": 0.0}])
    extras = ExtraRewards(cfg.extra_rewards)(PROMPTS, RESPONSES, step=0)
    assert add_extras(torch.tensor([1.0, 2.0, 3.0]), extras, cfg.extra_rewards).tolist() == [1.0, 2.0, 3.0]
    assert extra_metrics(extras) == pytest.approx({"reward_extra/exclamations": 1 / 3})


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("explode", "extra reward 'tests.extra_rewards:explode' at step 7: raised ValueError: verifier crashed "
                    "(on the batch of 3 samples)"),
        ("nan_for_the_second", "extra reward 'tests.extra_rewards:nan_for_the_second' at step 7: returned nan for "
                               "sample 1 (response 'awful'); every value must be finite"),
        ("one_short", "extra reward 'tests.extra_rewards:one_short' at step 7: returned shape (2,) for 3 samples; "
                      "expected one number per sample"),
        ("words", "extra reward 'tests.extra_rewards:words' at step 7: returned list, not one number per sample"),
    ],
)
def test_a_failing_rule_fails_the_step_with_one_message_naming_it(fn, message):
    rules = ExtraRewards(RLConfig(extra_rewards=[{"fn": f"tests.extra_rewards:{fn}", "weight": 1.0}]).extra_rewards)
    with pytest.raises(ExtraRewardError) as err:
        rules(PROMPTS, RESPONSES, step=7)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("tests.no_such_module:f", "extra_rewards.0.fn = 'tests.no_such_module:f': cannot import module "
                                   "'tests.no_such_module' (ModuleNotFoundError: No module named 'tests.no_such_module')"),
        ("tests.extra_rewards:absent", "extra_rewards.0.fn = 'tests.extra_rewards:absent': 'tests.extra_rewards' "
                                       "has no attribute 'absent'"),
        ("tests.extra_rewards:NOT_A_FUNCTION", "extra_rewards.0.fn = 'tests.extra_rewards:NOT_A_FUNCTION': "
                                               "not callable (type int)"),
        ("tests.extra_rewards.exclamations", "extra_rewards.0.fn = 'tests.extra_rewards.exclamations': expected an "
                                             "import path 'package.module:function'"),
        ("__import__('os'):system", "extra_rewards.0.fn = \"__import__('os'):system\": expected an import path"),
        ("tests.extra_rewards:takes_one", "extra_rewards.0.fn = 'tests.extra_rewards:takes_one': "
                                          "must take (prompts, responses), got signature (responses"),
    ],
)
def test_a_bad_import_path_is_a_config_error_naming_the_key_and_the_value(fn, message):
    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, None, [f'extra_rewards=[{{fn: "{fn}", weight: 0.1}}]'])
    assert str(err.value).startswith(f"config: {message}")


def test_a_rule_the_scorer_cannot_import_is_named_there():
    unimportable = ExtraReward.model_construct(fn="tests.only_on_the_driver:rule", weight=1.0, name=None)
    with pytest.raises(ExtraRewardError, match=r"extra reward 'tests.only_on_the_driver:rule': cannot import module .* "
                                               r"here, on the scorer; its module must be importable on every node"):
        ExtraRewards([unimportable])


def test_rules_need_distinct_names_and_a_weight():
    with pytest.raises(ConfigError, match=r"names \['exclamations'\] repeat .*give each entry its own `name`"):
        load_config(RLConfig, None, ['extra_rewards=[{fn: "tests.extra_rewards:exclamations", weight: 1},'
                                     ' {fn: "tests.extra_rewards:exclamations", weight: 2}]'])
    with pytest.raises(ConfigError, match=r"extra_rewards.0.weight: required"):
        load_config(RLConfig, None, ['extra_rewards=[{fn: "tests.extra_rewards:exclamations"}]'])
    with pytest.raises(ConfigError, match=r"extra_rewards.0.weight = nan: Input should be a finite number"):
        load_config(RLConfig, None, ['extra_rewards=[{fn: "tests.extra_rewards:exclamations", weight: .nan}]'])


def test_the_scorer_computes_the_rules_for_a_training_step_only(tiny_policy, tiny_reward_checkpoint):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=5))
    batch = engine.generate(PROMPTS, seed=0)
    scorer = EnsembleScorer(tiny_reward_checkpoint, policy_cfg(tiny_policy), max_length=32, temperature=1.0,
                            extra_rewards=RLConfig(extra_rewards=TWO_RULES).extra_rewards)
    scored = ScoredBatch.of(batch, scorer.score(batch, step=0))
    lengths = [-float(len(r.split())) for r in batch.responses]
    assert scored.extra_rewards["response_length_penalty"].tolist() == lengths
    assert set(scored.extra_rewards) == {"response_length_penalty", "format"}
    assert scorer.score(batch)["extra_rewards"] == {}  # the gold evaluation reads the ensemble alone

import json
import shutil

import torch

from uprlhf.rl.config import HFRolloutConfig, PolicyConfig
from uprlhf.rl.policy import forward_logprobs
from uprlhf.rl.rollout import HFRolloutEngine
from uprlhf.rl.scoring import EnsembleScorer, check_reward_checkpoint


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

"""The advantage-estimator registry: GAE through it is ``gae`` itself; GRPO, RLOO and REINFORCE++-baseline on hand cases."""

import math

import pytest
import torch
from pydantic import ValidationError

from uprlhf.config import ConfigError, RLConfig, load_config
from uprlhf.rl.config import PPOConfig
from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS, GROUP_STD_EPS, group_ids, group_reward_std, repeat_prompts
from uprlhf.rl.learner import LearnerBatch
from uprlhf.rl.policy import SampledBatch
from uprlhf.rl.ppo import gae, whiten


def test_gae_is_the_default_and_the_critic_free_estimators_are_registered_beside_it():
    assert ADVANTAGE_ESTIMATORS.names() == ("gae", "grpo", "rloo", "reinforce_baseline")
    assert PPOConfig().estimator == "gae" and PPOConfig().samples_per_prompt == 1
    with pytest.raises(ValidationError, match="unknown advantage estimator 'ppo'; allowed: 'gae', 'grpo', 'rloo', 'reinforce_baseline'"):
        PPOConfig(estimator="ppo")
    gae_entry = ADVANTAGE_ESTIMATORS.get("gae")
    assert gae_entry.critic and gae_entry.whiten and gae_entry.min_group == 1
    assert [(e.critic, e.min_group, e.whiten) for e in map(ADVANTAGE_ESTIMATORS.get, ("grpo", "rloo", "reinforce_baseline"))] == [
        (False, 2, False), (False, 2, False), (False, 2, True)
    ]


def test_gae_through_the_registry_is_gae_on_a_hand_case():
    # one sequence of 3 tokens and one of 2 (right-padded); γ = 0.5, λ = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    cfg = PPOConfig(gamma=0.5, lam=0.5)
    entry = ADVANTAGE_ESTIMATORS.get("gae")
    advantages, returns = entry.fn(rewards, values, mask, group_ids(2, 1), cfg)
    # row 0: δ = [0 + .25 - .5, 0 + .25 - .5, 1 - .5] = [-.25, -.25, .5]; A_t = δ_t + .25·A_{t+1}
    # row 1: δ = [0 + .5 - 1, 2 - 1] = [-.5, 1]; the padded token gets 0
    expected = torch.tensor([[-0.25 + 0.25 * (-0.25 + 0.25 * 0.5), -0.25 + 0.25 * 0.5, 0.5], [-0.5 + 0.25, 1.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)
    same = gae(rewards, values, cfg.gamma, cfg.lam, mask)
    assert torch.equal(advantages, same[0]) and torch.equal(returns, same[1])  # bit for bit
    # what the learner gets: GAE whitened over the batch, as before the registry had critic-free entries
    whitened, returns = entry(rewards, values, mask, torch.tensor([0, 0]), cfg)  # groups play no part in GAE
    assert torch.equal(whitened, whiten(same[0], mask)) and torch.equal(returns, same[1])


# Two prompts × three samples, responses of 4, 2, 1 | 3, 4, 2 tokens; padding holds junk the mask must drop.
MASK = torch.tensor([
    [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0],
    [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0],
], dtype=torch.float32)
REWARDS = torch.tensor([
    [-0.5, 0.5, 0.0, 1.0], [0.0, 2.0, 9.0, 9.0], [6.0, 9.0, 9.0, 9.0],   # R = 1, 2, 6: mean 3, sample std √7
    [1.0, 1.0, 1.0, 9.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 9.0, 9.0],    # R = 3, 3, 0: mean 2, sample std √3
])
GROUPS = torch.tensor([7, 7, 7, 2, 2, 2])  # any ids: rows of one prompt share one
R = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 0.0])


def _run(name: str, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(range(6)) if rows is None else rows
    values = torch.full((len(rows), 4), 5.0)  # a critic-free estimator never reads them
    return ADVANTAGE_ESTIMATORS.get(name)(REWARDS[rows], values, MASK[rows], GROUPS[rows], PPOConfig(estimator=name, samples_per_prompt=3, batch_size=6, minibatch_size=6))


def test_grpo_normalises_each_sequence_return_within_its_group():
    advantages, returns = _run("grpo")
    s7, s3 = math.sqrt(7) + GROUP_STD_EPS, math.sqrt(3) + GROUP_STD_EPS
    per_sample = torch.tensor([-2 / s7, -1 / s7, 3 / s7, 1 / s3, 1 / s3, -2 / s3])
    torch.testing.assert_close(advantages, per_sample[:, None] * MASK)  # one advantage on every response token
    torch.testing.assert_close(returns, R[:, None] * MASK)


def test_grpo_of_a_group_with_equal_rewards_is_zero():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    advantages, _ = ADVANTAGE_ESTIMATORS.get("grpo")(rewards, torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([0, 0]), PPOConfig())
    assert torch.equal(advantages, torch.zeros(2, 2))


def test_rloo_subtracts_the_mean_of_the_other_samples_of_the_prompt():
    advantages, returns = _run("rloo")
    # row 0: 1 − (2 + 6)/2 = −3; row 1: 2 − (1 + 6)/2 = −1.5; row 2: 6 − 1.5 = 4.5; row 5: 0 − 3 = −3
    per_sample = torch.tensor([-3.0, -1.5, 4.5, 1.5, 1.5, -3.0])
    torch.testing.assert_close(advantages, per_sample[:, None] * MASK)
    torch.testing.assert_close(returns, R[:, None] * MASK)


def test_reinforce_baseline_subtracts_the_group_mean_then_whitens_over_the_batch():
    entry = ADVANTAGE_ESTIMATORS.get("reinforce_baseline")
    centred = torch.tensor([-2.0, -1.0, 3.0, 1.0, 1.0, -2.0])
    raw, _ = entry.fn(REWARDS, torch.zeros(6, 4), MASK, GROUPS, PPOConfig())
    torch.testing.assert_close(raw, centred[:, None] * MASK)
    # whitened over the 16 response tokens: mean (−8 − 2 + 3 + 3 + 4 − 4)/16 = −0.25, variance 41/16
    advantages, returns = _run("reinforce_baseline")
    expected = (centred + 0.25) / math.sqrt(41 / 16 + 1e-8)
    torch.testing.assert_close(advantages, expected[:, None] * MASK)
    torch.testing.assert_close(returns, R[:, None] * MASK)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_baseline"])
def test_group_estimators_see_groups_not_row_order(name):
    shuffled = [4, 0, 5, 2, 3, 1]
    advantages, returns = _run(name, shuffled)
    in_order, in_order_returns = _run(name)
    torch.testing.assert_close(advantages, in_order[shuffled])
    torch.testing.assert_close(returns, in_order_returns[shuffled])


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_baseline"])
def test_a_group_of_one_sample_is_refused(name):
    with pytest.raises(ValueError, match=rf"advantage estimator '{name}' needs >= 2 samples per prompt group; the smallest has 1"):
        ADVANTAGE_ESTIMATORS.get(name)(REWARDS[:4], torch.zeros(4, 4), MASK[:4], GROUPS[:4], PPOConfig())


def test_group_reward_std_is_the_mean_over_groups_of_the_sample_std():
    assert group_reward_std(REWARDS, MASK, GROUPS) == pytest.approx((math.sqrt(7) + math.sqrt(3)) / 2)
    assert group_reward_std(torch.tensor([[1.0], [1.0]]), torch.ones(2, 1), torch.tensor([0, 0])) == 0.0


def test_prompts_repeat_in_a_row_and_their_rows_share_a_group():
    assert repeat_prompts(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    assert group_ids(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    assert group_ids(3, 1).tolist() == [0, 1, 2]


def test_config_refuses_too_few_samples_per_prompt_and_an_indivisible_batch():
    with pytest.raises(ValidationError, match=r"estimator 'grpo' compares the samples of one prompt: samples_per_prompt=1 must be >= 2"):
        PPOConfig(estimator="grpo")
    with pytest.raises(ValidationError, match=r"batch_size=16 must be a multiple of samples_per_prompt=3"):
        PPOConfig(estimator="rloo", samples_per_prompt=3)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        PPOConfig(samples_per_prompt=0)
    assert PPOConfig(estimator="reinforce_baseline", samples_per_prompt=4).samples_per_prompt == 4
    assert PPOConfig(samples_per_prompt=2).estimator == "gae"  # GAE over several samples per prompt is fine too


def test_config_refuses_a_group_cut_between_learner_ranks():
    # 12 samples over 4 ranks: 3 a rank, so a group of 2 would straddle ranks 0 and 1
    with pytest.raises(ConfigError, match=r"ppo.batch_size=12 / learner.num_workers=4 = 3 samples per learner rank must be a "
                                          r"multiple of ppo.samples_per_prompt=2"):
        load_config(RLConfig, None, ["ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.batch_size=12",
                                     "ppo.minibatch_size=4", "learner.num_workers=4"])
    cfg = load_config(RLConfig, None, ["ppo.estimator=grpo", "ppo.samples_per_prompt=3", "ppo.batch_size=12",
                                       "ppo.minibatch_size=4", "learner.num_workers=2"])
    assert cfg.ppo.samples_per_prompt == 3


def _learner_batch(groups: torch.Tensor) -> LearnerBatch:
    b, t = len(groups), 2
    sampled = SampledBatch(
        prompts=[f"p{int(g)}" for g in groups], responses=[f"r{i}" for i in range(b)],
        prompt_ids=torch.ones(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.long),
        response_ids=torch.arange(b * t).view(b, t), response_mask=torch.ones(b, t, dtype=torch.long), logprobs=torch.zeros(b, t),
    )
    return LearnerBatch(sampled, torch.zeros(b, t), torch.arange(b, dtype=torch.float32), groups)


def test_shards_hold_whole_groups_and_a_cut_group_is_refused():
    batch = _learner_batch(group_ids(12, 3))  # 4 prompts × 3 samples over 2 ranks: 2 whole groups each
    shards = [batch.shard(rank, 2) for rank in range(2)]
    assert [s.groups.tolist() for s in shards] == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]]
    assert [s.sampled.prompts for s in shards] == [["p0"] * 3 + ["p1"] * 3, ["p2"] * 3 + ["p3"] * 3]
    assert shards[1].rewards.tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    # the statistics a rank computes on its shard are those of its groups in the whole batch
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 0.0]] * 4)
    assert group_reward_std(rewards[6:], torch.ones(6, 2), shards[1].groups) == pytest.approx(math.sqrt(7))
    with pytest.raises(ValueError, match="shard 0 of 4 \\(3 rows\\) cuts a prompt group"):
        _learner_batch(group_ids(12, 2)).shard(0, 4)
    assert [s.groups.tolist() for s in (_learner_batch(group_ids(4, 1)).shard(r, 4) for r in range(4))] == [[0], [1], [2], [3]]

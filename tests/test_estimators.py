"""The advantage-estimator registry: GAE through it is ``gae`` itself, and ``ppo.estimator`` names it."""

import pytest
import torch
from pydantic import ValidationError

from uprlhf.rl.config import PPOConfig
from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS
from uprlhf.rl.ppo import gae


def test_gae_is_the_only_and_default_estimator():
    assert ADVANTAGE_ESTIMATORS.names() == ("gae",)
    assert PPOConfig().estimator == "gae"
    with pytest.raises(ValidationError, match="unknown advantage estimator 'rloo'; allowed: 'gae'"):
        PPOConfig(estimator="rloo")


def test_gae_through_the_registry_is_gae_on_a_hand_case():
    # one sequence of 3 tokens and one of 2 (right-padded); γ = 0.5, λ = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    cfg = PPOConfig(gamma=0.5, lam=0.5)
    advantages, returns = ADVANTAGE_ESTIMATORS.get("gae")(rewards, values, mask, cfg)
    # row 0: δ = [0 + .25 - .5, 0 + .25 - .5, 1 - .5] = [-.25, -.25, .5]; A_t = δ_t + .25·A_{t+1}
    # row 1: δ = [0 + .5 - 1, 2 - 1] = [-.5, 1]; the padded token gets 0
    expected = torch.tensor([[-0.25 + 0.25 * (-0.25 + 0.25 * 0.5), -0.25 + 0.25 * 0.5, 0.5], [-0.5 + 0.25, 1.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)
    same = gae(rewards, values, cfg.gamma, cfg.lam, mask)
    assert torch.equal(advantages, same[0]) and torch.equal(returns, same[1])  # bit for bit

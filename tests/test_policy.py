import torch

from uprlhf.rl.config import HFRolloutConfig, PolicyConfig
import math

import pytest

from uprlhf.rl.policy import (
    ActorCritic, SampledBatch, build_policy, forward_logprobs, load_policy_weights, policy_weights, response_entropy,
)
from uprlhf.rl.rollout import HFRolloutEngine


def policy_cfg(path, **kw) -> PolicyConfig:
    return PolicyConfig(model={"name_or_path": str(path)}, lora_target_modules=["q_proj", "v_proj"], prompt_template="plain", lora_rank=4, **kw)


def test_forward_logprobs_match_the_samplers_logprobs(tiny_policy):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=5))
    batch = engine.generate(["the movie was", "this film is really"], seed=3)
    logp, _ = forward_logprobs(engine.model, batch, temperature=1.0)
    assert torch.allclose(logp, batch.logprobs, atol=1e-4)
    assert (logp[batch.response_mask == 0] == 0).all()


def test_concat_repads_slices_and_select_inverts_it(tiny_policy):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=4))
    a = engine.generate(["the movie was"], seed=0)
    b = engine.generate(["this film is really quite"], seed=1)
    joined = SampledBatch.concat([a, b], pad_id=engine.tokenizer.pad_token_id)
    assert joined.prompt_ids.shape[1] == max(a.prompt_ids.shape[1], b.prompt_ids.shape[1])
    first = joined.select([0])
    ids, mask = first.sequences()
    assert ids[mask.bool()].tolist() == torch.cat([a.prompt_ids, a.response_ids], 1)[torch.cat([a.prompt_mask, a.response_mask], 1).bool()].tolist()
    # left padding keeps every response at the same column, so log-probs are unchanged by re-padding
    logp, _ = forward_logprobs(engine.model, joined, 1.0)
    assert torch.allclose(logp, joined.logprobs, atol=1e-4)


def test_policy_weights_of_a_lora_policy_are_the_adapter_only(tiny_policy):
    model, _ = build_policy(policy_cfg(tiny_policy), trainable=True)
    weights = policy_weights(model)
    assert weights and all("lora_" in k for k in weights)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    other, _ = build_policy(policy_cfg(tiny_policy), trainable=False)
    changed = {k: v + 1.0 for k, v in weights.items()}
    load_policy_weights(other, changed)
    assert all(torch.equal(policy_weights(other)[k], changed[k]) for k in changed)


def test_full_policy_moves_every_weight(tiny_policy):
    model, _ = build_policy(PolicyConfig(model={"name_or_path": str(tiny_policy)}, lora_rank=None), trainable=True)
    assert set(policy_weights(model)) == set(model.state_dict())


def test_actor_critic_values_start_at_zero_and_follow_the_mask(tiny_policy):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=4))
    batch = engine.generate(["the movie was", "the plot"], seed=0)
    model, _ = build_policy(policy_cfg(tiny_policy), trainable=True)
    ac = ActorCritic(model, model.get_input_embeddings().embedding_dim)
    logp, values = ac(batch, 1.0)
    assert logp.shape == values.shape == batch.response_ids.shape
    assert (values == 0).all()


def test_response_entropy_of_uniform_and_certain_distributions():
    vocab = 7
    uniform = torch.zeros(2, 3, vocab)
    assert torch.allclose(response_entropy(uniform, 1.0), torch.full((2, 3), math.log(vocab)))
    certain = torch.full((1, 1, vocab), float("-inf"))
    certain[..., 2] = 0.0
    assert response_entropy(certain, 1.0).item() == 0.0  # 0·log 0 counts as 0
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4); at temperature 2, logits/2
    p = torch.tensor([1.0, 3.0**0.5]) / (1 + 3.0**0.5)
    assert response_entropy(logits, 2.0).item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert not response_entropy(logits.requires_grad_(), 1.0).requires_grad


def test_actor_critic_entropy_is_optional_masked_and_leaves_the_rest_alone(tiny_policy):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=4))
    batch = engine.generate(["the movie was", "the plot"], seed=0)
    model, _ = build_policy(policy_cfg(tiny_policy), trainable=True)
    ac = ActorCritic(model, model.get_input_embeddings().embedding_dim)
    with torch.no_grad():
        logp, values = ac(batch, 0.7)
        logp_e, values_e, entropy = ac(batch, 0.7, entropy=True)
        assert torch.equal(logp, logp_e) and torch.equal(values, values_e)
        vocab = model.get_output_embeddings().weight.shape[0]
        assert entropy.shape == batch.response_ids.shape
        assert (entropy[batch.response_mask == 0] == 0).all()
        real = entropy[batch.response_mask == 1]
        assert (real > 0).all() and (real <= math.log(vocab) + 1e-5).all()

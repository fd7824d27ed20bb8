import pytest
import torch

from uprlhf.rl.config import HFRolloutConfig, PolicyConfig, VLLMRolloutConfig
from uprlhf.rl.generation import Int8Decoding
from uprlhf.rl.policy import forward_logprobs, policy_weights
from uprlhf.rl.rollout import ROLLOUT_ENGINES, HFRolloutEngine, check_prompt_lengths, make_rollout_engine, response_mask


def policy_cfg(path) -> PolicyConfig:
    return PolicyConfig(model={"name_or_path": str(path)}, lora_target_modules=["q_proj", "v_proj"], prompt_template="plain", lora_rank=4)


def test_response_mask_keeps_tokens_through_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9]])
    assert response_mask(ids, {2}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_same_seed_same_samples_other_seed_other_samples(tiny_policy):
    engine = make_rollout_engine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=6))
    a = engine.generate(["the movie was"] * 3, seed=7)
    b = engine.generate(["the movie was"] * 3, seed=7)
    c = engine.generate(["the movie was"] * 3, seed=8)
    assert torch.equal(a.response_ids, b.response_ids) and a.responses == b.responses
    assert not torch.equal(a.response_ids, c.response_ids)
    assert (a.logprobs <= 0).all()


def test_loading_weights_merges_from_the_pristine_base_every_time(tiny_policy):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=6))
    fresh = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=6))
    torch.manual_seed(0)
    update = {k: torch.randn_like(v) * 0.5 for k, v in policy_weights(engine.model).items()}
    for version in range(1, 4):  # a worker that synced several times ...
        engine.load_weights({k: v * version for k, v in update.items()}, version)
    engine.load_weights(update, 4)
    fresh.load_weights(update, 1)  # ... equals one that synced once (as after a resume)
    for (name, p), (_, q) in zip(engine.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(p, q), name
    base = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=6))
    assert not torch.equal(engine.generate(["the movie was"] * 4, 1).logprobs, base.generate(["the movie was"] * 4, 1).logprobs)
    assert engine.version == 4


def test_vllm_backend_is_registered_and_says_how_to_install(tiny_policy):
    pytest.importorskip("ray")  # the registry is import-safe without vllm
    assert set(ROLLOUT_ENGINES) == {"hf", "vllm"}
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
            make_rollout_engine(policy_cfg(tiny_policy), VLLMRolloutConfig(gpus_per_worker=1))


def test_prompts_longer_than_the_context_are_named_by_row(tiny_policy):
    from uprlhf.models import load_tokenizer

    cfg = policy_cfg(tiny_policy)
    tokenizer = load_tokenizer(cfg.model)
    problems = check_prompt_lengths(["the movie", "the movie " * 40], cfg, HFRolloutConfig(max_new_tokens=8), tokenizer, 64, "p.jsonl")
    assert len(problems) == 1 and problems[0].startswith("p.jsonl:2: prompt: ") and "context of 64" in problems[0]


def test_int8_decoding_samples_from_int8_copies_of_the_unadapted_layers_and_keeps_float_log_probs(tiny_policy):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=6, decode_weights="int8"))
    quantized = set(engine.decoder.names)
    assert quantized and not any("lora_" in n or "base_layer" in n for n in quantized)  # LoRA-adapted layers stay float
    assert any(n.endswith("mlp.down_proj") for n in quantized) and any(n.endswith("lm_head") for n in quantized)
    assert any(n.endswith("self_attn.k_proj") for n in quantized)  # not a LoRA target here
    torch.manual_seed(0)
    update = {k: torch.randn_like(v) * 0.5 for k, v in policy_weights(engine.model).items()}
    engine.load_weights(update, 1)
    batch = engine.generate(["the movie was", "this film is"] * 2, seed=3)
    floats = {n: type(engine.model.get_submodule(n)) for n in quantized}
    assert set(floats.values()) == {torch.nn.Linear}  # swapped back after generate
    # the log-probs are the float32 policy's own, not the int8 sampler's
    assert torch.equal(batch.logprobs, forward_logprobs(engine.model, batch, 1.0)[0])
    assert (batch.logprobs <= 0).all() and batch.response_mask.sum() > 0
    again = engine.generate(["the movie was", "this film is"] * 2, seed=3)
    assert torch.equal(again.response_ids, batch.response_ids)


def test_int8_decoding_is_close_to_float_and_refreshed_after_a_full_weight_load(tiny_policy):
    full = PolicyConfig(model={"name_or_path": str(tiny_policy)}, prompt_template="plain", lora_rank=None)
    engine = HFRolloutEngine(full, HFRolloutConfig(max_new_tokens=4, decode_weights="int8"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        exact = engine.model(ids).logits
        with engine.decoder.decoding():
            approx = engine.model(ids).logits
    assert not torch.equal(exact, approx) and torch.allclose(exact, approx, atol=0.05 * exact.abs().max())
    weights = {k: v * 2 for k, v in policy_weights(engine.model).items()}
    engine.load_weights(weights, 1)
    with torch.no_grad():
        exact = engine.model(ids).logits
        with engine.decoder.decoding():
            approx = engine.model(ids).logits
    assert torch.allclose(exact, approx, atol=0.05 * exact.abs().max())


def test_int8_decoding_is_refused_on_a_gpu_worker():
    with pytest.raises(ValueError, match="decode_weights 'int8' is the CPU path"):
        HFRolloutConfig(decode_weights="int8", gpus_per_worker=1)


def test_int8_decoding_swaps_only_inside_the_context():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    decoding = Int8Decoding(model, skip=lambda name: name == "2")
    assert decoding.names == ["0"]
    with decoding.decoding():
        assert type(model[0]) is not torch.nn.Linear and type(model[2]) is torch.nn.Linear
    assert type(model[0]) is torch.nn.Linear


def test_bf16_decoding_samples_from_bf16_casts_and_keeps_the_float_policy_and_its_log_probs(tiny_policy):
    engine = HFRolloutEngine(policy_cfg(tiny_policy), HFRolloutConfig(max_new_tokens=6, decode_weights="bfloat16"))
    torch.manual_seed(0)
    engine.load_weights({k: torch.randn_like(v) * 0.5 for k, v in policy_weights(engine.model).items()}, 1)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        exact = engine.model(ids).logits
        with engine.decoder.decoding():
            assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
            approx = engine.model(ids).logits
    assert approx.dtype == torch.bfloat16 and not torch.equal(exact, approx.float())
    assert torch.allclose(exact, approx.float(), atol=0.05 * exact.abs().max())
    batch = engine.generate(["the movie was", "this film is"] * 2, seed=3)
    after = dict(engine.model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], w) for n, w in before.items())  # restored bit for bit
    # the log-probs are the float32 policy's own, not the bf16 sampler's
    assert torch.equal(batch.logprobs, forward_logprobs(engine.model, batch, 1.0)[0])
    assert torch.equal(engine.generate(["the movie was", "this film is"] * 2, seed=3).response_ids, batch.response_ids)


def test_an_unknown_decode_weights_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown decode weights 'fp8'; allowed: 'float32', 'bfloat16', 'int8'"):
        HFRolloutConfig(decode_weights="fp8")

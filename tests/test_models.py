import pytest
import torch

from uprlhf.config import ModelConfig
from uprlhf.models import load_policy, load_reward_model, load_tokenizer, resolve, train_tiny_tokenizer


def test_reward_tokenizer_encodes_prompt_response_pairs():
    tok = train_tiny_tokenizer(["the movie was great", "the plot was dull"], causal=False)
    enc = tok("the movie", "was great")
    ids = enc["input_ids"]
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2
    assert enc["token_type_ids"][-1] == 1


def test_local_tiny_models_load_through_the_one_loader(tiny_policy, tiny_reward_backbone):
    policy = load_policy(ModelConfig(name_or_path=str(tiny_policy)))
    reward = load_reward_model(ModelConfig(name_or_path=str(tiny_reward_backbone)), num_labels=4)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_reward_backbone)))
    assert policy.config.num_hidden_layers == 2
    with torch.no_grad():
        assert reward(**tok(["the movie was fun"], return_tensors="pt")).logits.shape == (1, 4)


def test_unknown_packaged_model_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: packaged:smollm2, packaged:minilm"):
        resolve("packaged:gpt5")


def test_remote_code_is_off_by_default():
    assert ModelConfig(name_or_path="x").trust_remote_code is False


@pytest.mark.slow
def test_packaged_minilm_loads_as_a_reward_model():
    cfg = ModelConfig(name_or_path="packaged:minilm")
    model, tok = load_reward_model(cfg, num_labels=5), load_tokenizer(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    with torch.no_grad():
        assert model(**tok(["a fine film"], ["truly"], return_tensors="pt")).logits.shape == (1, 5)


@pytest.mark.slow
def test_packaged_smollm2_is_cached_as_safetensors_and_generates():
    cfg = ModelConfig(name_or_path="packaged:smollm2")
    path = resolve(cfg.name_or_path)
    assert path.endswith("smollm2-135m-instruct")
    policy, tok = load_policy(cfg), load_tokenizer(cfg)
    assert not hasattr(policy.config, "quantization_config")
    enc = tok(["The film was"], return_tensors="pt")
    out = policy.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


def test_lora_target_the_policy_lacks_is_one_line_listing_its_linear_modules(tiny_policy):
    from uprlhf.models import lora_target_problem

    cfg = ModelConfig(name_or_path=str(tiny_policy))
    assert lora_target_problem(cfg, ["q_proj", "v_proj"], "policy.lora_target_modules") is None
    problem = lora_target_problem(cfg, ["q_proj", "query"], "policy.lora_target_modules")
    assert problem == (
        f"policy.lora_target_modules: {tiny_policy} has no module called 'query'; "
        "its linear modules are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"
    )


def test_lora_target_check_builds_the_reward_backbone_as_a_classifier(tiny_reward_backbone):
    from uprlhf.models import lora_target_problem

    cfg = ModelConfig(name_or_path=str(tiny_reward_backbone))
    assert lora_target_problem(cfg, ["query", "value"], "ensemble.lora_target_modules", reward=True) is None
    problem = lora_target_problem(cfg, ["q_proj", "v_proj"], "ensemble.lora_target_modules", reward=True)
    assert problem.startswith(f"ensemble.lora_target_modules: {tiny_reward_backbone} has no module called 'q_proj', 'v_proj'; ")
    assert problem.endswith("its linear modules are: query, key, value, dense, classifier")


def _saved_adapter(policy, path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_policy(ModelConfig(name_or_path=str(policy))), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_an_adapter_of_the_policy_fits_it(tiny_policy, tmp_path):
    from uprlhf.models import adapter_problem

    assert adapter_problem(_saved_adapter(tiny_policy, tmp_path / "adapter"), ModelConfig(name_or_path=str(tiny_policy))) is None


def test_an_adapter_of_another_base_with_the_same_module_names_is_refused_from_its_header(tiny_policy, tmp_path):
    from safetensors.torch import load_file, save_file

    from uprlhf.models import adapter_problem

    adapter = _saved_adapter(tiny_policy, tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    policy = load_policy(ModelConfig(name_or_path=str(tiny_policy)))
    layer = policy.model.layers[0].self_attn.v_proj
    assert weights[key].shape == (4, layer.in_features)
    save_file({**weights, key: torch.zeros(4, layer.in_features + 3)}, str(adapter / "adapter_model.safetensors"))
    assert adapter_problem(adapter, ModelConfig(name_or_path=str(tiny_policy))) == (
        f"{adapter / 'adapter_model.safetensors'}: {key} has shape [4, {layer.in_features + 3}], but {tiny_policy}'s model.layers.0.self_attn.v_proj "
        f"maps {layer.in_features} to {layer.out_features} features (an adapter of another base model?)"
    )


def test_an_adapter_whose_b_factor_does_not_fit_is_refused(tiny_policy, tmp_path):
    from safetensors.torch import load_file, save_file

    from uprlhf.models import adapter_problem

    adapter = _saved_adapter(tiny_policy, tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file({**weights, key: torch.zeros(5, 4)}, str(adapter / "adapter_model.safetensors"))
    assert adapter_problem(adapter, ModelConfig(name_or_path=str(tiny_policy))).startswith(
        f"{adapter / 'adapter_model.safetensors'}: {key} has shape [5, 4], but"
    )


def test_an_unreadable_adapter_header_is_one_line(tiny_policy, tmp_path):
    from uprlhf.models import adapter_problem

    adapter = _saved_adapter(tiny_policy, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert adapter_problem(adapter, ModelConfig(name_or_path=str(tiny_policy))).startswith(
        f"{adapter / 'adapter_model.safetensors'}: cannot read its header:"
    )


def test_last_token_index_finds_the_last_real_token_on_either_padding_side():
    from uprlhf.models import last_token_index

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(right.flip(1)).tolist() == [3, 3, 3]


def test_pooled_features_of_a_text_do_not_depend_on_the_padding_after_it(tiny_policy):
    from uprlhf.models import load_backbone, pooled_text_features

    cfg = ModelConfig(name_or_path=str(tiny_policy))
    backbone, tokenizer = load_backbone(cfg).eval(), load_tokenizer(cfg)
    tokenizer.padding_side = "right"
    alone = pooled_text_features(backbone, tokenizer, ["the movie was great"], 32)
    padded = pooled_text_features(backbone, tokenizer, ["the movie was great", "the plot felt dull and boring and long"], 32)
    assert alone.shape == (1, 2 * backbone.config.hidden_size)
    assert torch.allclose(padded[0], alone[0], atol=1e-5)
    assert not torch.allclose(padded[1], alone[0], atol=1e-2)

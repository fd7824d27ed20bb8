from uprlhf.config import ModelConfig
from uprlhf.rl.generation import sample_completions
from uprlhf.models import load_policy, load_tokenizer


def test_samples_n_completions_per_prompt_reproducibly(tiny_policy):
    cfg = ModelConfig(name_or_path=str(tiny_policy))
    model, tok = load_policy(cfg), load_tokenizer(cfg)
    args = dict(n=3, max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=4, seed=7)
    seen = []
    first = sample_completions(model, tok, ["the movie was", "this film is"], progress=seen.append, **args)
    again = sample_completions(model, tok, ["the movie was", "this film is"], **args)
    assert [len(c) for c in first] == [3, 3]
    assert first == again
    assert seen == [4, 6]
    assert all(isinstance(t, str) and t == t.strip() for c in first for t in c)


def test_int8_sampling_gives_n_completions_and_leaves_the_model_float(tiny_policy):
    import torch

    cfg = ModelConfig(name_or_path=str(tiny_policy))
    model, tok = load_policy(cfg), load_tokenizer(cfg)
    args = dict(n=2, max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=4, seed=7, decode_weights="int8")
    first = sample_completions(model, tok, ["the movie was", "this film is"], **args)
    assert [len(c) for c in first] == [2, 2] and first == sample_completions(model, tok, ["the movie was", "this film is"], **args)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("proj") or n == "lm_head")


def test_bf16_sampling_gives_n_completions_and_leaves_the_model_float(tiny_policy):
    import torch

    cfg = ModelConfig(name_or_path=str(tiny_policy))
    model, tok = load_policy(cfg), load_tokenizer(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = dict(n=2, max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=4, seed=7, decode_weights="bfloat16")
    first = sample_completions(model, tok, ["the movie was", "this film is"], **args)
    assert [len(c) for c in first] == [2, 2] and first == sample_completions(model, tok, ["the movie was", "this film is"], **args)
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())

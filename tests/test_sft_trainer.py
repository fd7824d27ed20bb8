
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from uprlhf.sft.config import SFTConfig
from uprlhf.sft.data import encode_rows
from uprlhf.sft.trainer import ADAPTER_DIR, POLICY_DIR, SFTTrainer


def config(tiny_policy, **changes) -> SFTConfig:
    tree = {
        "policy": {"model": {"name_or_path": str(tiny_policy)}, "lora_rank": 4, "lora_target_modules": ["q_proj", "v_proj"],
                   "prompt_template": "plain"},
        "learner": {"num_workers": 1},
        "batch_size": 2,
        "lr": 5e-2,
        **changes,
    }
    return SFTConfig.model_validate(tree)


def examples(tiny_policy) -> list[dict]:
    rows = [{"prompt": "the movie was", "response": "great and fun"}, {"prompt": "this film is", "response": "lovely and brilliant"}]
    return encode_rows(AutoTokenizer.from_pretrained(tiny_policy), str, rows, 32, "rows")


@pytest.mark.parametrize(("lora_rank", "kept"), [(4, 0.97), (None, 0.5)], ids=["lora", "full"])
def test_steps_lower_the_response_loss(lora_rank, kept, single_rank, tiny_policy):
    trainer = SFTTrainer(config(tiny_policy, **{"policy": {**config(tiny_policy).policy.model_dump(), "lora_rank": lora_rank}}), 0, 1, 8)
    data = examples(tiny_policy)
    before, tokens = trainer.eval_loss(data, 2)
    assert tokens == sum(len([t for t in e["labels"] if t != -100]) for e in data)
    stats = [trainer.train_step(data) for _ in range(8)]
    after, _ = trainer.eval_loss(data, 2)
    assert after < kept * before  # a rank-4 adapter on q and v of a random model moves it less than every weight
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert stats[0]["lr"] == pytest.approx(5e-2) and stats[-1]["lr"] < stats[0]["lr"]


def test_the_loss_is_the_mean_negative_log_likelihood_of_the_response_tokens_only(single_rank, tiny_policy):
    trainer = SFTTrainer(config(tiny_policy), 0, 1, 4)
    example = examples(tiny_policy)[0]
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(trainer.model(input_ids=ids).logits[0, :-1], -1)
    targets = ids[0, 1:]
    counted = [i for i, label in enumerate(example["labels"][1:]) if label != -100]  # the response and its eos
    assert len(counted) == len(example["labels"]) - example["labels"].count(-100)
    by_hand = -sum(logp[i, targets[i]].item() for i in counted)
    total, tokens = trainer.eval_loss([example], 1)
    assert tokens == len(counted)
    assert total == pytest.approx(by_hand, rel=1e-5)


def test_save_and_load_resume_bit_identically(single_rank, tiny_policy, tmp_path):
    data = examples(tiny_policy)
    first = SFTTrainer(config(tiny_policy), 0, 1, 6)
    for _ in range(2):
        first.train_step(data)
    first.save(tmp_path)
    straight = [first.train_step(data)["loss"] for _ in range(3)]
    resumed = SFTTrainer(config(tiny_policy), 0, 1, 6)
    resumed.load(tmp_path)
    again = [resumed.train_step(data)["loss"] for _ in range(3)]
    assert again == straight
    for (name, a), (_, b) in zip(first.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_export_writes_the_adapter_and_a_merged_model_with_the_same_outputs(single_rank, tiny_policy, tmp_path):
    trainer = SFTTrainer(config(tiny_policy), 0, 1, 4)
    data = examples(tiny_policy)
    for _ in range(3):
        trainer.train_step(data)
    trainer.export(tmp_path)
    assert (tmp_path / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (tmp_path / POLICY_DIR / "model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / POLICY_DIR)
    ids = torch.tensor([data[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / POLICY_DIR).eos_token_id == AutoTokenizer.from_pretrained(tiny_policy).eos_token_id

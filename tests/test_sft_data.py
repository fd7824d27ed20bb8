import pytest
import torch
from transformers import AutoTokenizer

from uprlhf.sft.data import IGNORE, collate, encode_example, encode_rows, step_indices, steps_per_epoch


@pytest.fixture(scope="module")
def tokenizer(tiny_policy):
    return AutoTokenizer.from_pretrained(tiny_policy)


def test_an_example_has_labels_on_the_response_and_its_eos_only(tokenizer):
    template = lambda p: f"say: {p}"  # noqa: E731
    example = encode_example(tokenizer, template, "the movie was", "great and fun", max_length=64)
    prompt_ids = tokenizer("say: the movie was")["input_ids"]
    response_ids = tokenizer("great and fun", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]


def test_a_long_response_is_cut_at_the_end_and_a_prompt_without_room_is_refused(tokenizer):
    n_prompt = len(tokenizer("the movie was")["input_ids"])
    cut = encode_example(tokenizer, str, "the movie was", "great and fun and lovely", max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["labels"][-2:] == cut["input_ids"][-2:]
    assert encode_example(tokenizer, str, "the movie was", "great", max_length=n_prompt) is None
    with pytest.raises(ValueError, match=r"data.jsonl: row 2 \(id b\): prompt: .* tokens leave no room .* max_length=3"):
        encode_rows(tokenizer, str, [{"id": "a", "prompt": "x", "response": "great"},
                                     {"id": "b", "prompt": "the movie was great", "response": "fun"}], 3, "data.jsonl")


def test_collate_pads_right_with_the_pad_token_and_ignored_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["labels"].dtype == torch.long


def test_each_epoch_shows_every_example_and_the_ranks_split_each_step():
    n, batch, world = 10, 4, 2
    per_epoch = steps_per_epoch(n, batch)
    assert per_epoch == 3
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            shares = [step_indices(n, step, batch, rank, world, seed=0) for rank in range(world)]
            assert [len(s) for s in shares] == [2, 2]
            assert not set(shares[0]) & set(shares[1])
            seen += shares[0] + shares[1]
        assert set(seen) == set(range(n)) and len(seen) == per_epoch * batch  # 2 wrapped repeats fill the last step
    assert step_indices(n, 0, batch, 0, world, seed=0) != step_indices(n, per_epoch, batch, 0, world, seed=0)
    assert step_indices(n, 4, batch, 1, world, seed=0) == step_indices(n, 4, batch, 1, world, seed=0)


def test_fewer_examples_than_a_batch_still_fill_it():
    rows = step_indices(3, 0, 8, 0, 1, seed=0)
    assert len(rows) == 8 and sorted(rows.count(i) for i in range(3)) == [2, 3, 3]

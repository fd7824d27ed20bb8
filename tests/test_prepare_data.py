import json

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.drivers import prepare_data
from uprlhf.config import PrepareDataConfig, load_config
from uprlhf.data.loaders import DataError


def _snippets(path, sentences):
    path.write_text("".join(f"{i}\t1.0\t{s}\r\n" for i, s in enumerate(sentences)), encoding="utf-8")
    return path


@pytest.fixture
def task_files(tmp_path):
    reviews = [f"the movie number {i} was a really fun ride for everyone" for i in range(40)]
    news = [f"city council number {i} votes on the new budget today" for i in range(10)]
    return _snippets(tmp_path / "reviews.txt", reviews), _snippets(tmp_path / "news.txt", news)


def _cfg(policy, reviews, news, *extra):
    return load_config(
        PrepareDataConfig,
        None,
        [
            f"policy.name_or_path={policy}",
            f"reviews_file={reviews}",
            f"off_task_file={news}",
            "n_prompts=20",
            "completions_per_prompt=3",
            "max_new_tokens=6",
            "n_ood=12",
            "reward_test_fraction=0.25",
            *extra,
        ],
    )


def test_builds_split_pairs_and_ood_once_per_config(tiny_policy, task_files, tmp_path, monkeypatch):
    cfg = _cfg(tiny_policy, *task_files)
    manifest = prepare_data.build(cfg, tmp_path / "data")
    data = tmp_path / "data"
    assert manifest["counts"]["prompts"] == {"sft": 4, "reward": 8, "rl": 8}
    samples = pq.read_table(data / "samples.parquet").to_pylist()
    assert len(samples) == 24
    train = pq.read_table(data / "reward_train.parquet").to_pylist()
    test = pq.read_table(data / "reward_test.parquet").to_pylist()
    unused = sum(manifest["counts"]["pairs_not_used"].values())
    assert len(train) + len(test) + unused == 8 * 3  # three pairs per prompt
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in test})
    gold = {s["response"]: s["gold"] for s in samples}
    for row in train + test:
        assert row["gold_chosen"] == gold[row["chosen"]]
        assert row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]
    ood = pq.read_table(data / "ood.parquet").to_pylist()
    assert len(ood) == 12 and {r["kind"] for r in ood} == {"repetition", "word_salad", "gibberish", "off_task"}
    assert json.loads((data / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]

    monkeypatch.setattr("uprlhf.rl.generation.sample_completions", lambda *a, **k: pytest.fail("cached data was rebuilt"))
    assert prepare_data.build(cfg, data) == manifest


def test_label_noise_zero_with_sharp_temperature_prefers_higher_gold(tiny_policy, task_files, tmp_path):
    cfg = _cfg(tiny_policy, *task_files, "label_noise=0.0", "bt_temperature=0.0001")
    prepare_data.build(cfg, tmp_path / "data")
    rows = pq.read_table(tmp_path / "data" / "reward_train.parquet").to_pylist()
    assert all(r["gold_chosen"] >= r["gold_rejected"] for r in rows)


def test_missing_reviews_file_exits_with_one_message(tiny_policy, task_files, tmp_path, capsys):
    from jobs.prepare_data import main

    cfg = _cfg(tiny_policy, tmp_path / "absent.txt", task_files[1])
    with pytest.raises(DataError, match="absent.txt"):
        prepare_data.build(cfg, tmp_path / "data")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "absent.txt" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_bad_split_is_a_config_error():
    with pytest.raises(ValueError, match="must be three positive fractions summing to 1"):
        load_config(PrepareDataConfig, None, ["split=[0.5, 0.5, 0.5]"])
    assert PrepareDataConfig().split == (0.2, 0.4, 0.4)


def test_sft_examples_are_the_gold_best_nonempty_completion_of_each_sft_prompt(tiny_policy, task_files, tmp_path):
    cfg = _cfg(tiny_policy, *task_files, "sft_completions_per_prompt=3")
    manifest = prepare_data.build(cfg, tmp_path / "data")
    rows = pq.read_table(tmp_path / "data" / "sft.parquet").to_pylist()
    sft_prompts = pq.read_table(tmp_path / "data" / "sft_prompts.parquet").column("prompt").to_pylist()
    assert manifest["counts"]["sft_examples"] == len(rows) and {r["prompt"] for r in rows} <= set(sft_prompts)
    assert all(r["response"].strip() for r in rows)
    gold = prepare_data.get_gold_scorer(cfg.gold)
    assert [r["gold"] for r in rows] == pytest.approx(gold.score([r["prompt"] for r in rows], [r["response"] for r in rows]))
    # the reward data is the same as without SFT examples: SFT sampling draws from its own seed
    plain = prepare_data.build(_cfg(tiny_policy, *task_files), tmp_path / "plain")
    assert plain["counts"]["reward_train"] == manifest["counts"]["reward_train"]
    same = pq.read_table(tmp_path / "plain" / "samples.parquet").column("response").to_pylist()
    assert same == pq.read_table(tmp_path / "data" / "samples.parquet").column("response").to_pylist()


def test_gold_best_keeps_the_highest_scored_completion_and_skips_empty_ones():
    class Length:
        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    rows = prepare_data.gold_best(["a", "b", "c"], [["xx", "xxxx", "x"], ["  ", "y"], ["", " "]], Length())
    assert rows == [{"id": "sft0", "prompt": "a", "response": "xxxx", "gold": 4.0},
                    {"id": "sft1", "prompt": "b", "response": "y", "gold": 1.0}]


def _adapter(policy, path, seed):
    """A LoRA adapter on the tiny policy with random (not zero) B, as a PPO checkpoint's policy/ folder holds."""
    import torch
    from peft import LoraConfig, get_peft_model

    from uprlhf.models import load_policy
    from uprlhf.section import ModelConfig

    torch.manual_seed(seed)
    model = get_peft_model(load_policy(ModelConfig(name_or_path=str(policy))), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_drift_policies_add_pairs_on_training_prompts_and_keep_the_base_pairs(tiny_policy, task_files, tmp_path):
    base = prepare_data.build(_cfg(tiny_policy, *task_files), tmp_path / "base")
    adapters = [_adapter(tiny_policy, tmp_path / f"drift{i}", seed=i) for i in range(2)]
    drifted = prepare_data.build(_cfg(tiny_policy, *task_files, f"drift_policies={[str(a) for a in adapters]}"), tmp_path / "data")

    def read(folder, name):
        return pq.read_table(tmp_path / folder / f"{name}.parquet").to_pylist()

    samples = read("data", "samples")
    test_prompts = {r["prompt"] for r in read("base", "reward_test")}
    train_prompts = {s["prompt"] for s in read("base", "samples")} - test_prompts
    drift = [s for s in samples if s["source"] != "policy"]
    assert drifted["counts"]["drift_samples"] == len(drift) == 2 * 3 * len(train_prompts)
    assert {s["prompt"] for s in drift} == train_prompts and {s["source"] for s in drift} == {"drift0", "drift1"}
    # the held-out pairs and the base policy's own training pairs are what they are without drift policies
    assert read("data", "reward_test") == read("base", "reward_test")
    base_ids = {s["id"] for s in samples if s["source"] == "policy"}
    own = [r for r in read("data", "reward_train") if set(r["id"].split(">")) <= base_ids]
    assert own == read("base", "reward_train")
    # every pair of a training prompt's nine completions, from any policy, is a pair
    unused = sum(drifted["counts"]["pairs_not_used"].values()) - sum(base["counts"]["pairs_not_used"].values())
    assert drifted["counts"]["drift_pairs"] + unused == len(train_prompts) * (9 * 8 // 2 - 3)
    assert drifted["counts"]["reward_train"] == base["counts"]["reward_train"] + drifted["counts"]["drift_pairs"]
    gold = {s["id"]: s["gold"] for s in samples}
    assert all(r["gold_chosen"] == gold[r["id"].split(">")[0]] for r in read("data", "reward_train"))


def test_drift_policy_weights_decide_the_data_key(tiny_policy, task_files, tmp_path):
    adapter = _adapter(tiny_policy, tmp_path / "drift", seed=0)
    cfg = _cfg(tiny_policy, *task_files, f"drift_policies=[{adapter}]", "n_prompts=10")
    first = prepare_data.build(cfg, tmp_path / "data")
    _adapter(tiny_policy, adapter, seed=1)  # retrained in place: same path, other weights
    assert prepare_data.build(cfg, tmp_path / "data")["fingerprint"] != first["fingerprint"]


def test_drift_policy_that_is_no_safetensors_adapter_for_the_policy_is_refused_before_sampling(tiny_policy, task_files, tmp_path, monkeypatch):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text("{}")
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not read")
    elsewhere = _adapter(tiny_policy, tmp_path / "elsewhere", seed=0)
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query", "v_proj"]}))
    cfg = _cfg(tiny_policy, *task_files, f"drift_policies=[{tmp_path / 'pickled'}, {tmp_path / 'absent'}, {elsewhere}]")
    monkeypatch.setattr("uprlhf.rl.generation.sample_completions", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(DataError) as error:
        prepare_data.build(cfg, tmp_path / "data")
    assert str(error.value).splitlines() == [
        f"drift_policies.0 = '{tmp_path / 'pickled'}': no adapter_model.safetensors in {tmp_path / 'pickled'} "
        "(a LoRA adapter folder, e.g. a PPO checkpoint's policy/)",
        f"drift_policies.1 = '{tmp_path / 'absent'}': no adapter_config.json or adapter_model.safetensors in "
        f"{tmp_path / 'absent'} (a LoRA adapter folder, e.g. a PPO checkpoint's policy/)",
        f"drift_policies.2 = '{elsewhere}': its target_modules: {tiny_policy} has no module called 'query'; its linear "
        "modules are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head",
    ]
    assert not (tmp_path / "data").exists()

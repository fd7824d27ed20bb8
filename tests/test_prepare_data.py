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

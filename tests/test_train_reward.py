"""End to end: ensemble kinds through Ray Train's TorchTrainer with 2 DeepSpeed workers.

Ray Train runs the same loop for every kind; two kinds that differ in what it trains (a
backbone per member, LoRA adapters on one backbone) go through it here — ``single`` is
``independent`` with K = 1 — and ``tests/test_reward_training.py`` trains every kind in process."""

import json

import pyarrow.parquet as pq
import pytest

from jobs.drivers import train_reward
from uprlhf.data.loaders import DataError
from tests.conftest import ListeningSockets, toy_pairs
from uprlhf.config import TrainRewardConfig, load_config
from uprlhf.data.loaders import write_parquet

KINDS = ["independent", "lora"]


def _data(path, train=None):
    write_parquet(train or toy_pairs(48), path / "reward_train.parquet")
    write_parquet(toy_pairs(16, seed=9), path / "reward_test.parquet")
    write_parquet(
        [{"prompt": "the movie was", "response": t} for t in ["zz qq xx zz", "qq qq qq qq", "xx zz", "really really really"]],
        path / "ood.parquet",
    )
    return path


def _cfg(backbone, data_dir, *extra):
    return load_config(
        TrainRewardConfig,
        None,
        [
            f"data_dir={data_dir}",
            f"backbone.name_or_path={backbone}",
            "ensemble.k=2",
            "ensemble.lora_rank=2",
            "train.batch_size=8",
            "train.num_workers=2",
            "train.max_length=24",
            "train.checkpoints=2",
            *extra,
        ],
    )


def test_kinds_train_on_two_workers_and_are_tabulated(tiny_reward_backbone, local_ray, tmp_path, monkeypatch):
    data = _data(tmp_path / "data")
    out = tmp_path / "out"
    with ListeningSockets() as sockets:
        summary = train_reward.run_train_reward(_cfg(tiny_reward_backbone, data, f"kinds={KINDS}"), out)
    assert sockets.found == set()  # Ray Train's process group listens on the node's address (127.0.0.1) only
    assert list(summary["kinds"]) == KINDS
    for kind in KINDS:
        figures = summary["kinds"][kind]
        for name in ("accuracy", "ece", "ood_auroc", "trainable_params", "train_seconds"):
            assert figures[name] is not None
        assert 0 <= figures["accuracy"] <= 1 and 0 <= figures["ece"] <= 1 and 0 <= figures["ood_auroc"] <= 1
        assert (figures["diversity"] is not None) == ("lora" in kind)
        final = out / "checkpoints" / kind / "final"
        manifest = json.loads((final / "ensemble.json").read_text())
        assert manifest["kind"] == kind
        assert len(manifest["member_stats"]["std"]) == manifest["k"] and manifest["member_stats"]["responses"] > 0
        assert (figures["normalised_ood_auroc"] is not None) and 0 <= figures["normalised_accuracy"] <= 1
        assert (final / "tokenizer" / "tokenizer.json").exists()
        state = json.loads((final / "trainer_state.json").read_text())
        assert state["has_moments"] and state["mean_lr"] > 0
        assert len(figures["checkpoints"]) == 2
    assert (out / "checkpoints" / "lora" / "final" / "adapters" / "m1" / "adapter_model.safetensors").exists()
    assert "| lora |" in (out / "ensemble_table.md").read_text()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["kind"] for line in lines} == set(KINDS)

    monkeypatch.setattr(train_reward, "train_kind", lambda *a: pytest.fail("finished kinds must not retrain"))
    again = train_reward.run_train_reward(_cfg(tiny_reward_backbone, data, f"kinds={KINDS}"), out)
    assert again["kinds"] == summary["kinds"]


def test_bad_rows_stop_the_job_before_training(tiny_reward_backbone, tmp_path, monkeypatch, capsys):
    rows = toy_pairs(6)
    rows[2]["chosen"] = "  "
    rows[4]["rejected"] = rows[4]["chosen"]
    data = _data(tmp_path / "data", train=rows)
    monkeypatch.setattr(train_reward, "start_ray", lambda: pytest.fail("Ray must not start on bad data"))
    with pytest.raises(DataError) as raised:
        train_reward.run_train_reward(_cfg(tiny_reward_backbone, data), tmp_path / "out")
    err = str(raised.value)
    assert f"{data / 'reward_train.parquet'}:3: chosen: empty" in err
    assert f"{data / 'reward_train.parquet'}:5: chosen: identical to rejected" in err


def test_skip_bad_rows_counts_what_it_skipped(tiny_reward_backbone, tmp_path, monkeypatch):
    rows = toy_pairs(6)
    rows[1]["prompt"] = ""
    data = _data(tmp_path / "data", train=rows)
    monkeypatch.setattr(train_reward, "start_ray", lambda: None)
    monkeypatch.setattr(train_reward, "train_kind", lambda *a: pytest.fail("stop here"))
    cfg = _cfg(tiny_reward_backbone, data, "skip_bad_rows=true").model_copy(update={"kinds": []})
    summary = train_reward.run_train_reward(cfg, tmp_path / "out")
    assert summary["skipped_rows"] == {"reward_train": 1, "reward_test": 0, "ood": 0}
    assert pq.read_table(data / "reward_train.parquet").num_rows == 6


def test_finished_kinds_are_retrained_when_settings_or_data_change(tiny_reward_backbone, tmp_path):
    data = _data(tmp_path / "data")
    base = train_reward.training_fingerprint(_cfg(tiny_reward_backbone, data), data)
    assert train_reward.training_fingerprint(_cfg(tiny_reward_backbone, data, "kinds=[lora]"), data) == base
    assert train_reward.training_fingerprint(_cfg(tiny_reward_backbone, data, "ensemble.k=3"), data) != base
    write_parquet(toy_pairs(50), data / "reward_train.parquet")
    assert train_reward.training_fingerprint(_cfg(tiny_reward_backbone, data), data) != base


def test_reward_data_in_any_canonical_format_is_found(tiny_reward_backbone, tmp_path, monkeypatch):
    import datasets

    data = tmp_path / "data"
    data.mkdir()
    (data / "reward_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_pairs(6)))
    with open(data / "reward_test.csv", "w", newline="") as handle:
        import csv

        writer = csv.DictWriter(handle, fieldnames=["id", "prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(toy_pairs(4, seed=9))
    datasets.Dataset.from_list([{"prompt": "the movie was", "response": t} for t in ["zz qq", "xx zz"]]).save_to_disk(str(data / "ood"))
    monkeypatch.setattr(train_reward, "start_ray", lambda: pytest.fail("no kind to train"))
    cfg = _cfg(tiny_reward_backbone, data).model_copy(update={"kinds": []})
    summary = train_reward.run_train_reward(cfg, tmp_path / "out")
    assert summary["skipped_rows"] == {"reward_train": 0, "reward_test": 0, "ood": 0}
    assert train_reward.training_fingerprint(cfg, data) != train_reward.training_fingerprint(cfg, _data(tmp_path / "parquet"))


def test_unknown_lora_target_of_the_backbone_stops_before_ray(tiny_reward_backbone, tmp_path, monkeypatch):
    from uprlhf.config import ConfigError

    data = _data(tmp_path / "data")
    monkeypatch.setattr(train_reward, "start_ray", lambda: pytest.fail("Ray must not start on a bad LoRA target"))
    cfg = _cfg(tiny_reward_backbone, data, "kinds=[linear, lora]", "ensemble.lora_target_modules=[query, q_proj]")
    with pytest.raises(ConfigError) as err:
        train_reward.run_train_reward(cfg, tmp_path / "out")
    assert str(err.value) == (
        f"ensemble.lora_target_modules: {tiny_reward_backbone} has no module called 'q_proj'; "
        "its linear modules are: query, key, value, dense, classifier (kinds lora put LoRA on them)"
    )
    # kinds without LoRA never read the targets
    assert train_reward.lora_problems(cfg.replace(kinds=["linear", "independent"])) == []


def test_a_pair_budget_trains_on_its_nested_draw_and_one_past_the_file_stops_before_ray(tiny_reward_backbone, tmp_path, monkeypatch):
    from uprlhf.reward.training import pair_budget

    rows = toy_pairs(12)
    data = _data(tmp_path / "data", train=rows)
    monkeypatch.setattr(train_reward, "start_ray", lambda: pytest.fail("Ray must not start past the budget"))
    with pytest.raises(DataError, match=r"reward_train.parquet: 12 usable pairs, fewer than reward.train.max_pairs=13"):
        train_reward.run_train_reward(_cfg(tiny_reward_backbone, data, "train.max_pairs=13"), tmp_path / "out")

    trained = []

    def stop(cfg, kind, pairs, out):
        trained.extend(pairs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_reward, "start_ray", lambda: None)
    monkeypatch.setattr(train_reward, "train_kind", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        train_reward.run_train_reward(_cfg(tiny_reward_backbone, data, "train.max_pairs=5", "train.seed=2"), tmp_path / "out")
    assert [p["chosen"] for p in trained] == [rows[i]["chosen"] for i in pair_budget(12, 5, seed=2)]

import json
import os

import pytest
import torch

from uprlhf.atomic import atomic_write
from uprlhf.checkpoint import MANIFEST, flatten_state, load_state, save_state, verify_manifest, write_manifest


def checkpoint(tmp_path):
    folder = tmp_path / "step_000003"
    (folder / "learner").mkdir(parents=True)
    (folder / "learner" / "rank_0.safetensors").write_bytes(b"tensor bytes")
    (folder / "state.json").write_text('{"step": 3}')
    (folder / "policy").mkdir()
    (folder / "policy" / "adapter_config.json").write_text("{}")
    return folder


def test_a_fresh_manifest_verifies_and_names_every_file(tmp_path):
    folder = checkpoint(tmp_path)
    write_manifest(folder)
    assert verify_manifest(folder) == []
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(files) == {"learner/rank_0.safetensors", "state.json", "policy/adapter_config.json"}
    assert files["state.json"]["size"] == len('{"step": 3}') and len(files["state.json"]["sha256"]) == 64
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # the manifest went in atomically


def test_verify_reports_a_missing_manifest_file_and_checksum(tmp_path):
    folder = checkpoint(tmp_path)
    assert verify_manifest(folder) == [f"{folder}: {MANIFEST} is missing (the save did not finish)"]
    assert verify_manifest(tmp_path / "nowhere")[0].endswith("checkpoint folder is missing")
    write_manifest(folder)
    (folder / "state.json").write_text('{"step": 4}')  # same size, other bytes
    (folder / "policy" / "adapter_config.json").unlink()
    assert verify_manifest(folder) == ["policy/adapter_config.json: missing", "state.json: sha256 mismatch"]
    (folder / "state.json").write_text('{"step": 40}')
    assert "state.json: size mismatch" in verify_manifest(folder)


def test_extra_files_are_reported_unless_allowed(tmp_path):
    folder = checkpoint(tmp_path)
    write_manifest(folder)
    (folder / "learner" / "mp_rank_00_model_states.pt").write_bytes(b"planted")
    assert verify_manifest(folder) == ["learner/mp_rank_00_model_states.pt: unexpected file (not in the manifest)"]
    assert verify_manifest(folder, allow_extra=True) == []


def test_a_tampered_or_garbled_manifest_is_a_problem(tmp_path):
    folder = checkpoint(tmp_path)
    write_manifest(folder)
    document = json.loads((folder / MANIFEST).read_text())
    document["files"]["../outside"] = {"sha256": "0" * 64, "size": 0}
    (folder / MANIFEST).write_text(json.dumps(document))
    assert "../outside: manifest entry points outside the checkpoint" in verify_manifest(folder)
    (folder / MANIFEST).write_text("{not json")
    assert "is unreadable" in verify_manifest(folder)[0]


def test_links_are_refused(tmp_path):
    folder = checkpoint(tmp_path)
    (tmp_path / "elsewhere").write_text("x")
    os.symlink(tmp_path / "elsewhere", folder / "link.json")
    with pytest.raises(ValueError, match="plain files only"):
        write_manifest(folder)
    (folder / "link.json").unlink()
    write_manifest(folder)
    os.symlink(tmp_path / "elsewhere", folder / "state.json.lnk")
    assert any("state.json.lnk" in p for p in verify_manifest(folder))


def test_write_manifest_fsyncs_files_then_writes_the_manifest_last(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path)
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_manifest(folder)
    names = [os.path.basename(p) for p in synced]
    assert {"rank_0.safetensors", "state.json", "adapter_config.json"} <= set(names)
    last_manifest = max(i for i, p in enumerate(synced) if os.path.basename(p).startswith(f".{MANIFEST}."))
    assert all(i < last_manifest for i, p in enumerate(names) if p in {"rank_0.safetensors", "state.json"})
    assert os.path.basename(synced[-1]) == folder.name  # the folder itself, after the rename


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(tmp_path / "latest.json", lambda fh: fh.write("{}"), binary=False)
    assert synced[-1] == str(tmp_path) and (tmp_path / "latest.json").read_text() == "{}"
    synced.clear()
    atomic_write(tmp_path / "other.json", lambda fh: fh.write("{}"), binary=False, durable=False)
    assert str(tmp_path) not in synced


def test_state_round_trips_through_safetensors_and_json(tmp_path):
    state = {
        "weights": {"a.b": torch.randn(2, 3), "c": torch.arange(4, dtype=torch.int64)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                      "param_groups": [{"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "params": [0], "foreach": None}]},
        "rng": torch.get_rng_state(),
        "inf": float("inf"),
        "flag": True,
    }
    save_state(tmp_path / "rank_0", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0.json", "rank_0.safetensors"]
    loaded = load_state(tmp_path / "rank_0")
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 0.1 + 0.2  # exactly
    assert list(loaded["optimizer"]["state"]) == [0]  # int keys stay ints
    assert loaded["inf"] == float("inf") and loaded["flag"] is True
    assert torch.equal(loaded["rng"], state["rng"]) and loaded["rng"].dtype == torch.uint8
    for key in ("a.b", "c"):
        assert torch.equal(loaded["weights"][key], state["weights"][key])


def test_objects_that_would_need_pickle_are_refused(tmp_path):
    with pytest.raises(TypeError, match="only tensors"):
        flatten_state({"scaler": object()})
    with pytest.raises(TypeError, match="not a str or int"):
        flatten_state({(1, 2): 0})
    (tmp_path / "x.json").write_text('{"format": "pickle", "state": null}')
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a uprlhf state file"):
        load_state(tmp_path / "x")

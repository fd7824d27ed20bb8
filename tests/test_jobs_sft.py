"""jobs.sft end to end on tiny models and a 2-rank learner group: the loss falls, the export is a policy the RL jobs load,
a run stopped after a checkpoint resumes to the same steps, bad rows stop it before Ray does anything."""

import json
from pathlib import Path

import pytest
import torch

from jobs import sft as sft_job
from jobs.drivers import sft as sft_driver
from tests.conftest import GOOD, OPENINGS
from uprlhf.checkpoint import verify_manifest
from uprlhf.config import build
from uprlhf.rl.config import HFRolloutConfig, PolicyConfig
from uprlhf.rl.rollout import HFRolloutEngine
from uprlhf.sft.config import SFTConfig

pytestmark = pytest.mark.slow


def sft_rows(path: Path) -> Path:
    rows = [{"id": f"r{i}", "prompt": o, "response": f"{g} and {GOOD[(i + 1) % len(GOOD)]}"}
            for i, (o, g) in enumerate((o, g) for o in OPENINGS for g in GOOD)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tree(tiny_policy, data_file: Path, **changes) -> dict:
    return {
        "data_file": str(data_file),
        "policy": {"model": {"name_or_path": str(tiny_policy)}, "lora_rank": None, "prompt_template": "plain"},
        "learner": {"num_workers": 2, "cpus_per_worker": 0.5},
        "epochs": 2, "batch_size": 4, "lr": 1e-2, "max_length": 32, "checkpoint_every": 3, "eval_fraction": 0.2,
        **changes,
    }


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def finished(local_ray, tiny_policy, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = sft_rows(root / "sft.jsonl")
    out = root / "run"
    summary = sft_driver.run_sft(build(SFTConfig, tree(tiny_policy, data)), out)
    return out, data, summary


def test_a_run_lowers_the_held_out_loss_and_exports_a_policy_the_rollouts_load(finished, tiny_policy):
    out, data, summary = finished
    assert summary["data"]["examples"] == 20 and summary["data"]["held_out"] == 4
    assert summary["steps"] == 8 and [s for s, _ in losses(out)] == list(range(8))  # 16 rows / 4 per step x 2 epochs
    assert summary["eval_loss_final"] < 0.8 * summary["eval_loss_start"]
    assert not verify_manifest(out / "policy")
    assert summary["adapter"] is None and not (out / "adapter").exists()  # every weight trained: no adapter
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000005", "step_000007"]
    # the exported folder is a policy as the RL jobs load it (LoRA of their own on top) and it samples
    policy = PolicyConfig(model={"name_or_path": str(out / "policy")}, lora_rank=4, lora_target_modules=["q_proj", "v_proj"],
                          prompt_template="plain")
    batch = HFRolloutEngine(policy, HFRolloutConfig(max_new_tokens=4, torch_threads=1)).generate(OPENINGS, seed=0)
    assert len(batch) == 4 and batch.response_mask.sum() > 0
    # and it has learnt the examples: their response tokens are far likelier than under the base model
    examples = [json.loads(line) for line in data.read_text().splitlines()]
    assert response_nll(out / "policy", examples) < 0.8 * response_nll(tiny_policy, examples)


def response_nll(model_dir: Path, rows: list[dict]) -> float:
    """Mean negative log-likelihood per response token (and end of sequence), as the SFT loss counts it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uprlhf.sft.data import collate, encode_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = collate(encode_rows(tokenizer, str, rows, 32, "rows"), tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def test_a_second_start_on_a_finished_run_trains_nothing(finished, tiny_policy, monkeypatch):
    out, data, summary = finished
    monkeypatch.setattr(sft_driver, "start_ray", lambda: pytest.fail("a finished run must not start Ray"))
    assert sft_driver.run_sft(build(SFTConfig, tree(tiny_policy, data)), out) == summary


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_steps(finished, tiny_policy, tmp_path, monkeypatch):
    reference, data, _ = finished
    out = tmp_path / "run"
    real = sft_driver.checkpoint

    def stop_after_first(learner, paths, step, key):
        real(learner, paths, step, key)
        raise KeyboardInterrupt  # the job killed right after its first checkpoint

    monkeypatch.setattr(sft_driver, "checkpoint", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        sft_driver.run_sft(build(SFTConfig, tree(tiny_policy, data)), out)
    assert [s for s, _ in losses(out)] == [0, 1, 2]
    monkeypatch.setattr(sft_driver, "checkpoint", real)
    summary = sft_driver.run_sft(build(SFTConfig, tree(tiny_policy, data)), out)
    assert losses(out) == losses(reference)
    assert summary["eval_loss_final"] == pytest.approx(read(reference)["eval_loss_final"], rel=1e-6)
    tuned = {k: v for k, v in _weights(out / "policy").items()}
    for name, value in _weights(reference / "policy").items():
        assert torch.equal(value, tuned[name]), name
    with pytest.raises(Exception, match="holds an SFT run of another config"):
        (out / "summary.json").unlink()
        sft_driver.run_sft(build(SFTConfig, tree(tiny_policy, data, lr=2e-2)), out)


def test_bad_rows_exit_with_one_message_each_before_ray_starts(tiny_policy, tmp_path, capsys, monkeypatch):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "the movie was", "response": "great"}) + "\n" + json.dumps({"prompt": "this film is"}) + "\n")
    monkeypatch.setattr(sft_driver, "start_ray", lambda: pytest.fail("bad input must stop before Ray"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        sft_job.main(["--output-dir", str(out), f"data_file={data}", f"policy.model.name_or_path={tiny_policy}",
                      "learner.num_workers=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}:2: response" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()


def read(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))

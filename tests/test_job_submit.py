"""`ray job submit` end to end: a loopback-only head from cluster/local.sh, the tiny PPO config through the job API."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_rl_tree

ROOT = Path(__file__).resolve().parents[1]
# Every port of this head is its own, so it runs beside any other Ray on the machine.
PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def head(tmp_path):
    """cluster/local.sh start on private ports and temp dir; always stopped (its own process group only)."""
    gcs, dashboard, *others = free_ports(2 + len(PORT_FLAGS))
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "RAY_PORT": str(gcs),
        "RAY_DASHBOARD_PORT": str(dashboard),
        "RAY_TEMP_DIR": temp_dir,
        "RAY_HEAD_STATE": str(tmp_path / "head"),
        "RAY_START_ARGS": " ".join(["--num-cpus=2"] + [f"--{flag}={port}" for flag, port in zip(PORT_FLAGS, others)]),
    }
    script = str(ROOT / "cluster" / "local.sh")
    try:
        started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{dashboard}" in started.stdout
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # about 2 min on 2 cores: a head, a job driver and its actors start from scratch
def test_tiny_ppo_submitted_through_the_job_api_succeeds_and_logs_no_token(
    head, tiny_policy, tiny_reward_checkpoint, tiny_prompts, tmp_path
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    config, out = tmp_path / "ppo.yaml", tmp_path / "out"
    tree = tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, **{"ppo.steps": 2, "learner.num_workers": 1})
    config.write_text(yaml.safe_dump(tree))
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update({k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "UPRLHF_CACHE") if k in os.environ})
    # the job API refuses clients without the token (the CLI sends it given RAY_AUTH_MODE=token)
    client = JobSubmissionClient(head, headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(
        entrypoint=f"python -m jobs.ppo --config {config} --output-dir {out}",
        runtime_env={"working_dir": str(ROOT), **runtime_env},
    )
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after 300 s"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "[ppo] done" in logs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["prompts"] == str(tiny_prompts)
    assert (out / "checkpoints" / "step_000001" / "policy" / "adapter_model.safetensors").exists()
    assert token and token not in logs
    assert not [p for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]

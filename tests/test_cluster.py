"""cluster/: every YAML and manifest parses, and the fields that matter say what they must."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from tune.config import SweepConfig
from tune.trial import trial_totals
from uprlhf.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
PROJECT_IMAGE = "uprlhf:0.1.0-gpu"
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict[str, dict]:
    """Every Kubernetes object under cluster/kuberay by kind."""
    return {d["kind"]: d for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in documents(p)}


def ray_specs() -> dict[str, dict]:
    """The RayCluster specs: the standalone cluster's and the RayJob's own."""
    found = manifests()
    return {"RayCluster": found["RayCluster"]["spec"], "RayJob": found["RayJob"]["spec"]["rayClusterSpec"]}


def containers(spec: dict) -> dict[str, list[dict]]:
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {name: group["template"]["spec"]["containers"] for name, group in groups.items()}


def test_every_yaml_under_cluster_parses():
    paths = sorted(p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml"))
    assert paths == ["cluster.yaml", "kuberay/common.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "runtime_env.yaml"]
    for path in paths:
        assert documents(CLUSTER / path), path
    assert set(manifests()) == {"PersistentVolumeClaim", "NetworkPolicy", "RayCluster", "RayJob"}


def test_launcher_runs_a_cpu_head_and_gpu_workers_with_the_vllm_extra_installed_after_torch():
    launcher = documents(CLUSTER / "cluster.yaml")[0]
    assert launcher["docker"]["image"] == RAY_IMAGE
    nodes = launcher["available_node_types"]
    head, workers = nodes[launcher["head_node_type"]], nodes["gpu_workers"]
    assert head["resources"] == {"CPU": 0}
    assert workers["resources"]["GPU"] == 4 and workers["max_workers"] == launcher["max_workers"] == 4
    setup = launcher["setup_commands"]
    assert setup == ["pip install torch==2.13.0", "pip install -e '/home/ray/uprlhf[vllm]'"]
    assert launcher["file_mounts"]["/home/ray/uprlhf"] == "."


def test_launcher_keeps_the_dashboard_on_loopback_and_token_auth_on():
    launcher = documents(CLUSTER / "cluster.yaml")[0]
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in launcher["worker_start_ray_commands"] if c.strip() != "ray stop")
    assert launcher["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "security_group" not in str(launcher["provider"]).lower()  # nothing beyond the default SSH-only group


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_clusters_use_the_project_image_gpu_workers_and_token_auth(kind):
    spec = ray_specs()[kind]
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"] == {"mode": "token"}
    groups = containers(spec)
    assert {c["image"] for cs in groups.values() for c in cs} == {PROJECT_IMAGE}
    head = groups.pop("head")[0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"] and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (worker,) = groups["gpu"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "4"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_dashboard_is_not_exposed_outside_the_kubernetes_cluster(kind):
    spec = ray_specs()[kind]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert "dashboard-host" not in spec["headGroupSpec"]["rayStartParams"]  # KubeRay's default: the pod network only
    objects = [d for p in CLUSTER.rglob("*.yaml") for d in documents(p)]
    assert not [d for d in objects if d.get("kind") in {"Ingress", "Route"}]
    assert not [d for d in objects if d.get("kind") == "Service" and d["spec"].get("type") in PUBLIC_SERVICE_TYPES]
    policy = manifests()["NetworkPolicy"]["spec"]
    labels = {c.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/part-of") for rule in policy["ingress"] for c in rule["from"]}
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "uprlhf"} and "uprlhf" in labels
    operator = [rule for rule in policy["ingress"] if rule.get("ports")]
    assert operator == [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
                         "ports": [{"port": 8265}]}]
    for pods in containers(spec).values():
        assert all(c.get("ports") is None or {p["containerPort"] for p in c["ports"]} <= {6379, 8265} for c in pods)


def test_rayjob_runs_the_pipeline_with_a_config_and_overrides_jobs_accept():
    job = manifests()["RayJob"]["spec"]
    args = shlex.split(job["entrypoint"])
    assert args[:4] == ["python", "-m", "jobs.pipeline", "--config"]
    assert args[5] == "--output-dir" and args[6].startswith("/mnt/runs/")
    cfg = load_config(PipelineConfig, ROOT / args[4].removeprefix("/home/ray/uprlhf/"), args[7:])
    rl = cfg.rl.base
    assert rl.rollout.backend == "vllm" and rl.learner.use_gpu and cfg.reward.train.use_gpu
    gpus = rl.rollout.num_workers * rl.rollout.gpus_per_worker + rl.scorer_gpus + rl.learner.num_workers
    assert gpus <= 4 and cfg.reward.train.num_workers <= 4  # one 4-GPU worker holds each stage
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "HTTPMode"


def test_dockerfile_builds_the_project_image_on_ray_with_the_vllm_extra_after_torch():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.M).group(1) == RAY_IMAGE
    torch, extra = text.index("pip install --no-cache-dir torch==2.13.0"), text.index("pip install --no-cache-dir -e '.[vllm]'")
    assert torch < extra
    assert re.search(r"^vllm = \[\"vllm(>=[0-9.]+)?\"\]", (ROOT / "pyproject.toml").read_text(), re.M)


def test_gpu_sweep_validates_and_a_trial_fits_one_gpu_worker():
    cfg = load_config(SweepConfig, ROOT / "tune" / "configs" / "gpu.yaml")
    assert trial_totals(cfg.rl, cfg.resources.driver_cpus) == {"CPU": 18.0, "GPU": 4.0}
    assert cfg.rl.rollout.backend == "vllm" and cfg.rl.learner.use_gpu
    assert set(cfg.space) == {"penalty", "beta_kl", "nnm_lambda"}


def test_runtime_env_and_local_script_hold_no_secret_and_bind_loopback():
    env = documents(CLUSTER / "runtime_env.yaml")[0]["env_vars"]
    assert all(isinstance(v, str) for v in env.values())
    assert not [k for k in env if re.search("TOKEN|KEY|SECRET|PASSWORD", k)]
    script = CLUSTER / "local.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--node-ip-address=127.0.0.1" in text and "--dashboard-host=127.0.0.1" in text
    assert "export RAY_AUTH_MODE=token" in text and "ray stop" not in text.replace("`ray stop`", "")


def test_local_head_leaves_the_ray_token_readable_by_its_owner_only(tmp_path):
    """`cluster/local.sh start` with a stand-in for `ray` (no Ray starts): the token Ray wrote 0644 ends up 0600."""
    import os
    import socket
    import stat

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("secret\n")
    token.chmod(0o644)
    fake = tmp_path / "ray"
    fake.write_text('#!/usr/bin/env bash\ncase "$1" in start) exec sleep 60 ;; status) exit 0 ;; esac\n')
    fake.chmod(0o755)
    dashboard = socket.socket()
    dashboard.bind(("127.0.0.1", 0))
    dashboard.listen()
    env = {**os.environ, "HOME": str(home), "RAY": str(fake), "RAY_PORT": "6999", "RAY_HEAD_STATE": str(tmp_path / "state"),
           "RAY_DASHBOARD_PORT": str(dashboard.getsockname()[1])}
    script = str(CLUSTER / "local.sh")
    try:
        started = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stderr
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=60)
        dashboard.close()

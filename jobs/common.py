"""What every job shares: the command line, the output folder, and a loopback-only Ray.

``python -m jobs.NAME --config FILE [dotted.key=value ...] [--output-dir DIR]``;
the config is validated before Ray starts, and a bad value exits with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from uprlhf.atomic import atomic_write
from uprlhf.config import ConfigError, describe, load_config, to_yaml

# A local Ray binds every port to 127.0.0.1 and reports no usage (DESIGN §6); these
# must be set before ray starts a node, so they are set on import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

C = TypeVar("C", bound=BaseModel)

# Passed on to Ray workers so they see the same cache, offline switches and accelerator.
FORWARDED_ENV = (
    "UPRLHF_CACHE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "TRANSFORMERS_VERBOSITY",
)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse(config_cls: type[C], description: str, argv: list[str] | None = None) -> tuple[C, Path]:
    """Read ``--config``, overrides and ``--output-dir``; exit with one clear message on bad input."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (jobs/configs/*.yaml)")
    parser.add_argument("--output-dir", default=None, help="where outputs and checkpoints go (resumes if present)")
    parser.add_argument("--describe", action="store_true", help="print every config field and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    if args.describe:
        print("\n".join(describe(config_cls)))
        raise SystemExit(0)
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        fail(str(err))
    out = Path(args.output_dir or Path("runs") / config_cls.__name__.removesuffix("Config").lower()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    return cfg, out


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that readers never see half a file."""
    atomic_write(path, lambda handle: handle.write(text), binary=False)


def read_json(path: Path, default: dict | None = None) -> dict:
    return json.loads(path.read_text()) if path.exists() else dict(default or {})


def write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


class MetricsLog:
    """One JSON object per step in ``metrics.jsonl`` plus TensorBoard scalars."""

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict, tag: str, step: int) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{tag}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


def start_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under ``ray job submit``) or start a local one.

    Under a submitted job, the job's own runtime env (``cluster/runtime_env.yaml``)
    reaches every worker. A local one listens on 127.0.0.1 only (dashboard included
    unless UPRLHF_DASHBOARD=0); its workers get this process's cache and offline settings.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=os.environ.get("UPRLHF_DASHBOARD", "1") == "1",
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )

"""What every job shares: the command line, the output folder, and a loopback-only Ray.

``python -m jobs.NAME --config FILE [dotted.key=value ...] [--output-dir DIR]``;
the config is validated before Ray starts, and a bad value exits with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from uprlhf.atomic import atomic_write
from uprlhf.config import ConfigError, describe, fingerprint, load_config, to_yaml

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


log = logging.getLogger("uprlhf")


class JobFormatter(logging.Formatter):
    """``[job] message``, and ``[job] WARNING: message`` (or ERROR) for what needs a look."""

    def __init__(self, job: str):
        super().__init__()
        self.job = job

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[{self.job}] {level}{record.getMessage()}"


def setup_logging(job: str) -> None:
    """The one logger of the project (``uprlhf``), lines prefixed with the job's name, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JobFormatter(job))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)


class JobExit(SystemExit):
    """What ``fail`` raises: a SystemExit with its exit code, carrying the line it printed (a sweep trial reports it)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise JobExit(code, message)


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn the library's typed errors into one clear line and an exit code (only ``main()`` uses this).

    Bad input (ConfigError, DataError) exits 2; a plan the cluster cannot hold
    (PlacementError), a role that could not be kept alive (RoleError) or an extra
    reward rule that failed on a batch (ExtraRewardError) exits 1.
    Anything else is a bug and keeps its traceback.
    """
    from actors import PlacementError, RoleError
    from uprlhf.data.loaders import DataError
    from uprlhf.rl.extra_rewards import ExtraRewardError

    try:
        yield
    except (ConfigError, DataError) as err:
        fail(str(err), 2)
    except (PlacementError, RoleError, ExtraRewardError) as err:
        fail(str(err), 1)


def parse(config_cls: type[C], description: str, argv: list[str] | None = None) -> tuple[C, Path]:
    """Read ``--config``, overrides and ``--output-dir``; exit with one clear message on bad input.

    Also sets up the job's logging (named after the module that called ``parse``).
    """
    setup_logging(Path(sys.argv[0]).stem)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (jobs/configs/*.yaml)")
    parser.add_argument("--output-dir", default=None, help="where outputs and checkpoints go (resumes if present)")
    parser.add_argument("--describe", action="store_true", help="print every config field and exit")
    parser.add_argument(
        "--force-new-config", action="store_true",
        help="the output folder holds a run of another config: move it aside (OUTPUT_DIR.archived-<time>) and start anew",
    )
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
    if out.exists() and not out.is_dir():
        fail(f"--output-dir {out}: exists and is not a folder")
    if args.force_new_config and out.is_dir() and any(out.iterdir()):
        archived = out.with_name(f"{out.name}.archived-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(archived)
        log.info("moved the previous run in %s to %s", out, archived)
    return cfg, out


def hold_folder(out: Path, cfg: BaseModel, what: str, state_file: str) -> None:
    """Claim ``out`` for one ``what`` (a sweep, a study): started again with another config, stop instead of
    mixing its runs; otherwise write its config and the fingerprint the next start compares."""
    state = read_json(out / state_file)
    if state and state["fingerprint"] != fingerprint(cfg):
        fail(f"{out} holds a {what} of another config (its config.yaml); resume with that one, use a new --output-dir "
             "or --force-new-config")
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    write_json(out / state_file, {"fingerprint": fingerprint(cfg), "config": to_yaml(cfg)})


def write_config(out: Path, cfg: BaseModel) -> None:
    """The resolved config a job runs with, written once its inputs are checked (never before)."""
    atomic_write_text(out / "config.yaml", to_yaml(cfg))


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that readers never see half a file."""
    atomic_write(path, lambda handle: handle.write(text), binary=False)


def read_json(path: Path, default: dict | None = None) -> dict:
    return json.loads(path.read_text()) if path.exists() else dict(default or {})


def write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint a resumed run restarts from (they are redone).

    A torn last line (the job was killed while appending it) is cut off with them.
    """
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            log.warning("%s:%d: torn record cut off (the run was killed while writing it); its step is redone", path, number)
            break
        if record is not None and record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_records(out: Path) -> list[dict]:
    """A run's step records (metrics.jsonl) plus, for PPO, the final evaluation (as a record at step = steps)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = read_json(out / "final_eval.json")
    if final and records:
        last = records[-1]
        records.append({**{k: last[k] for k in ("kl", "reward_mean", "uncertainty", "penalized_reward")}, **final})
    return records


def mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


class Gauges:
    """Per-step figures as ``ray.util.metrics`` gauges (and the alarm as a counter) for the Ray dashboard.

    Ray drops a gauge from its Prometheus endpoint when it has not been set for two export
    intervals (about 20 s), and a PPO step on a CPU can take longer: a daemon thread sets
    each gauge's last value again every ``refresh_s`` seconds until ``close``.
    """

    NAMES = (
        "reward_mean", "gold", "kl", "uncertainty", "running_uncertainty", "penalized_reward", "tokens_per_second",
        "generation_tokens_per_second",
    )

    def __init__(self, run: str, stages: tuple[str, ...], refresh_s: float = 5.0):
        import threading

        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run}
        names = (*self.NAMES, *(f"seconds_{s}" for s in stages))
        self.gauges = {n: Gauge(f"uprlhf_{n}", description=f"uprlhf PPO {n}", tag_keys=("run",)) for n in names}
        self.alarms = Counter("uprlhf_hacking_alarms", description="reward-hacking alarms fired", tag_keys=("run",))
        self.last: dict[str, float] = {}
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.refresher = threading.Thread(target=self._refresh, args=(refresh_s,), name="uprlhf-gauges", daemon=True)
        self.refresher.start()

    def record(self, record: dict) -> None:
        with self.lock:
            for name, gauge in self.gauges.items():
                if record.get(name) is not None:
                    self.last[name] = float(record[name])
                    gauge.set(self.last[name], tags=self.tags)
        if record.get("alarm"):
            self.alarms.inc(1.0, tags=self.tags)

    def _refresh(self, every_s: float) -> None:
        while not self.stopped.wait(every_s):
            with self.lock:
                for name, value in self.last.items():
                    self.gauges[name].set(value, tags=self.tags)

    def close(self) -> None:
        self.stopped.set()
        self.refresher.join()


class MetricsLog:
    """One JSON object per step in ``metrics.jsonl`` plus TensorBoard scalars."""

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict, tag: str, step: int) -> None:
        """Append one line and make it durable; a line torn by a kill is cut off on resume (``keep_metrics_through``)."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{tag}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


def metrics_export_port() -> int | None:
    """The Prometheus port a local head exports its metrics on (UPRLHF_METRICS_PORT); None: one Ray picks."""
    value = os.environ.get("UPRLHF_METRICS_PORT", "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ConfigError(f"UPRLHF_METRICS_PORT={value!r}: expected a TCP port, 1-65535")
    return int(value)


def start_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under ``ray job submit``) or start a local one.

    Under a submitted job, the job's own runtime env (``cluster/runtime_env.yaml``)
    reaches every worker. A local one listens on 127.0.0.1 only (dashboard included
    unless UPRLHF_DASHBOARD=0; the Prometheus metrics endpoint, with the ``uprlhf_*``
    gauges, on port UPRLHF_METRICS_PORT if set: Ray's node agent binds it to the node's
    address, 127.0.0.1 here); its workers get this process's cache and offline settings.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    port = metrics_export_port()
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=os.environ.get("UPRLHF_DASHBOARD", "1") == "1",
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
        **({"_metrics_export_port": port} if port is not None else {}),
    )

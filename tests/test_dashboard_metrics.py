"""The dashboard gauges, verified: a tiny PPO run on a local head whose Prometheus endpoint is on 127.0.0.1.

The run goes in a child process (``start_ray`` with UPRLHF_METRICS_PORT, as ``jobs.ppo`` starts it), which keeps
its head up after the run until the test has read ``http://127.0.0.1:<port>/metrics``; the session's own local Ray
(``local_ray``) is never touched. The run is the recorded one of tests/data/ppo_golden cut to 4 steps (``ppo.steps``
changes no step's results), so the alarm fires at step 3 as recorded and the counter is exported too.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from jobs.common import Gauges
from jobs.drivers.ppo import STAGES
from tests.conftest import ListeningSockets, tiny_rl_tree

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "ppo_golden"
RUN = "dashboard-check"
PREFIX = "ray_"  # Ray's Prometheus exporter puts every application metric under the namespace "ray"

DRIVER = """
import sys
from pathlib import Path

import yaml

from jobs.drivers.ppo import run_ppo
from uprlhf.config import RLConfig, build

run_ppo(build(RLConfig, yaml.safe_load(Path(sys.argv[1]).read_text())), Path(sys.argv[2]), name=sys.argv[3])
print("RUN DONE", flush=True)
sys.stdin.read()  # the head, and its metrics endpoint, stay up until the test closes stdin
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(sample name, run tag) -> value of every ``uprlhf`` sample the endpoint shows now."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    ours = "\n".join(line for line in text.splitlines() if "uprlhf" in line)
    return {
        (sample.name, sample.labels.get("run")): sample.value
        for family in text_string_to_metric_families(ours + "\n")
        for sample in family.samples
    }


class Scraper:
    """Reads the endpoint every ``every_s`` in a thread; ``seen`` keeps each series' latest value.

    Ray drops a gauge that its driver has not refreshed for two export intervals (an idle driver
    refreshes nothing), so the last step's values are caught while the run ends, not after.
    """

    def __init__(self, port: int, every_s: float = 0.5):
        import threading

        self.port, self.every_s, self.seen, self.stop = port, every_s, {}, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            self.seen.update(scrape(self.port))
            self.stop.wait(self.every_s)

    def __enter__(self) -> "Scraper":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def last_values(records: list[dict]) -> dict[str, float]:
    """Each gauge's value as the run left it: the last record that set it."""
    values = {}
    for record in records:
        values.update({k: float(v) for k, v in record.items() if v is not None and not isinstance(v, (bool, str))})
    return values


@pytest.mark.timeout(420)  # a hung run fails here instead of holding the suite (about 45 s on 2 cores)
def test_every_gauge_and_the_alarm_counter_reach_the_prometheus_endpoint_with_the_runs_tag(tmp_path):
    started = time.monotonic()
    tree = tiny_rl_tree(GOLDEN / "policy", GOLDEN / "final", GOLDEN / "rl_prompts.parquet",
                        **{"ppo.steps": 4, "checkpoint_every": 10, "gold_every": 4})
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "UPRLHF_DASHBOARD": "0", "RAY_ADDRESS": "", "UPRLHF_METRICS_PORT": str(port),
           "RAY_metrics_report_interval_ms": "2000"}  # Ray's default is 10 s
    with ListeningSockets(every_s=1.0) as sockets, Scraper(port) as scraper:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(config), str(out), RUN], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        try:
            for line in proc.stdout:  # the child prints "RUN DONE" once run_ppo has returned
                lines.append(line)
                if line.strip() == "RUN DONE":
                    break
            assert proc.poll() is None, "".join(lines)[-3000:]
            ran = time.monotonic()
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            alarms = sum(bool(r["alarm"]) for r in records)
            assert [r["step"] for r in records] == [0, 1, 2, 3] and alarms == 1  # step 3, as recorded
            expected = last_values(records)
            names = [n for n in (*Gauges.NAMES, *(f"seconds_{s}" for s in STAGES)) if n in expected]
            assert {"kl", "reward_mean", "uncertainty", "gold", "seconds_evaluate", "tokens_per_second"} <= set(names)
            want = {(f"{PREFIX}uprlhf_{n}", RUN): expected[n] for n in names}
            want[(f"{PREFIX}uprlhf_hacking_alarms_total", RUN)] = float(alarms)

            deadline = time.monotonic() + 30  # Ray exports what the driver recorded every 2 s here
            while time.monotonic() < deadline and any(scraper.seen.get(k) != pytest.approx(v, rel=1e-6) for k, v in want.items()):
                time.sleep(0.5)
            scraped = time.monotonic()
        finally:
            try:
                lines.append(proc.communicate(timeout=60)[0])  # closes stdin: the child shuts its head down and exits
            except subprocess.TimeoutExpired:
                proc.kill()  # Ray's processes share the fate of the driver that started them
                lines.append(proc.communicate()[0])
    log, seen = "".join(lines)[-3000:], scraper.seen
    missing = sorted(k for k in want if k not in seen)
    assert not missing, f"not exported: {missing}; exported: {sorted(seen)}\n{log}"
    wrong = {k: (seen[k], v) for k, v in want.items() if seen[k] != pytest.approx(v, rel=1e-6)}
    assert not wrong, f"exported value, last recorded value: {wrong}\n{log}"
    assert {run for _, run in seen} == {RUN}
    assert sockets.found == set()  # the metrics endpoint too listens on 127.0.0.1 only
    assert proc.returncode == 0, log
    print(f"run {ran - started:.0f} s, scraped in {scraped - ran:.0f} s more; exported: {sorted(name for name, _ in seen)}")

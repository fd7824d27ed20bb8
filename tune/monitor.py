"""Watching a sweep: the live trial table and the peak of the resources Ray has handed out."""

from __future__ import annotations

import threading
import time

from ray.tune import Callback

COLUMNS = ("trial", "status", "step", "gold", "kl")


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


class LiveTable(Callback):
    """Prints one row per trial (trial, status, step, gold, KL, swept values) while the sweep runs:
    whenever a row changed, at most every ``every_s`` seconds, and once at the end."""

    def __init__(self, keys: list[str], every_s: float = 10.0):
        self.keys, self.every_s = keys, every_s
        self.shown: list[list[str]] = []
        self.shown_at = 0.0

    def rows(self, trials) -> list[list[str]]:
        rows = []
        for trial in trials:
            result = trial.last_result or {}
            cells = [str(trial), trial.status, result.get("step"), result.get("gold"), result.get("kl")]
            rows.append([_cell(c) for c in cells] + [_cell(trial.config.get(k)) for k in self.keys])
        return rows

    def show(self, rows: list[list[str]]) -> None:
        print(format_table([*COLUMNS, *self.keys], rows), flush=True)
        self.shown, self.shown_at = rows, time.monotonic()

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        rows = self.rows(trials)
        if rows != self.shown and time.monotonic() - self.shown_at >= self.every_s:
            self.show(rows)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.show(self.rows(trials))


class ResourcePeak:
    """Samples Ray's free CPUs and GPUs in a background thread: the peak in use is the total
    minus the least ever free (placement groups count as in use from the moment they are placed)."""

    def __init__(self, every_s: float = 0.5):
        import ray

        self.every_s = every_s
        self.total = {r: ray.cluster_resources().get(r, 0.0) for r in ("CPU", "GPU")}
        self.least_free = dict(self.total)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="resource-peak", daemon=True)

    def __enter__(self) -> ResourcePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import ray

        while not self._stop.is_set():
            free = ray.available_resources()
            for resource in self.least_free:
                self.least_free[resource] = min(self.least_free[resource], free.get(resource, 0.0))
            self._stop.wait(self.every_s)

    def in_use(self, resource: str) -> float:
        return self.total[resource] - self.least_free[resource]

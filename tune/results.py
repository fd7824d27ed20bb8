"""What a finished sweep leaves: the trial table (CSV, Markdown), gold against KL with the
Pareto front, and the best trial's config as a YAML that ``jobs.ppo`` takes as it is."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import yaml

from jobs.common import atomic_write_text
from tune.space import penalty_label
from uprlhf.config import RLConfig, build

COMPLETED = "completed"
FIGURES = ("gold", "kl", "reward_mean", "uncertainty")


def trial_row(name: str, params: dict, metrics: dict, error: str | None, config: RLConfig | None, steps: int) -> dict:
    """One trial as a flat row: its swept values, how far it got, and its last reported figures."""
    step = metrics.get("step")
    if error:
        status = "error"
    elif step == steps:
        status = COMPLETED
    elif step is None:
        status = "not started"
    else:
        status = f"stopped at step {step}"
    return {
        "trial": name,
        "status": status,
        "penalty": penalty_label(config.penalty) if config else None,
        **params,
        "steps_done": steps if status == COMPLETED else None if step is None else step + 1,
        **{key: metrics.get(key) for key in FIGURES},
        "error": error_line(error) if error else None,
    }


# An exception line of a traceback: ``uprlhf.data.loaders.DataError: why`` (the module path is dropped).
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Failed))(?::\s*(.*))?$")


def error_line(text: str) -> str | None:
    """Why a trial failed, in one line: the last ``error:`` line of its output, else its exception and message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    marked = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    if marked:
        return marked[-1]
    for line in reversed(lines):
        found = _EXCEPTION_LINE.match(line)
        if found:
            name, message = found.groups()
            if name == "TrialFailed" and message:  # tune.trial's own: the message is the job's error line
                return message
            return f"{name}: {message}" if message else name
    return lines[-1] if lines else None


def pareto_front(rows: list[dict]) -> list[str]:
    """Trials no other completed trial beats on both gold (higher) and KL (lower), by KL."""
    done = [r for r in rows if r["status"] == COMPLETED and r["gold"] is not None and r["kl"] is not None]

    def beaten(r: dict) -> bool:
        return any(o["gold"] >= r["gold"] and o["kl"] <= r["kl"] and (o["gold"] > r["gold"] or o["kl"] < r["kl"]) for o in done)

    return [r["trial"] for r in sorted(done, key=lambda r: r["kl"]) if not beaten(r)]


def best_row(rows: list[dict], penalty: str | None = None) -> dict | None:
    """The completed trial with the highest final gold (lower KL breaks ties), optionally of one penalty."""
    done = [r for r in rows if r["status"] == COMPLETED and r["gold"] is not None]
    if penalty is not None:
        done = [r for r in done if r["penalty"] is not None and r["penalty"].split("(")[0] == penalty]
    return max(done, key=lambda r: (r["gold"], -(r["kl"] or 0.0)), default=None)


def _text(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_tables(rows: list[dict], out: Path) -> None:
    """``results.csv`` (every field) and ``results.md`` (the same rows for reading)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_text(row.get(c)) for c in columns) + " |" for row in rows]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def plot_front(rows: list[dict], front: list[str], path: Path) -> None:
    """Gold against KL for every trial that reported both: completed trials by penalty,
    early-stopped ones hollow (their last evaluation), the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    shown = [r for r in rows if r["gold"] is not None and r["kl"] is not None]
    penalties = sorted({r["penalty"].split("(")[0] for r in shown if r["penalty"]})
    colours = dict(zip(penalties, plt.get_cmap("tab10").colors))
    for name in penalties:
        done = [r for r in shown if r["status"] == COMPLETED and r["penalty"].split("(")[0] == name]
        ax.scatter([r["kl"] for r in done], [r["gold"] for r in done], color=colours[name], label=name, zorder=3)
    stopped = [r for r in shown if r["status"] != COMPLETED]
    if stopped:
        ax.scatter([r["kl"] for r in stopped], [r["gold"] for r in stopped], facecolors="none", edgecolors="grey",
                   label="stopped early (last evaluation)", zorder=2)
    by_name = {r["trial"]: r for r in shown}
    points = [by_name[name] for name in front]
    ax.plot([r["kl"] for r in points], [r["gold"] for r in points], "k--", lw=1, zorder=1, label="Pareto front")
    ax.scatter([r["kl"] for r in points], [r["gold"] for r in points], s=160, facecolors="none", edgecolors="black", zorder=4)
    for r in shown:
        ax.annotate(r["trial"].rsplit("_", 1)[-1], (r["kl"], r["gold"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KL to the reference policy (last step)")
    ax.set_ylabel("gold reward (held-out evaluation)")
    ax.set_title("Sweep: gold against KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_best(row: dict, trial_dir: Path, path: Path) -> None:
    """The best trial's resolved PPO config, checked to load as ``jobs.ppo`` loads it."""
    text = (trial_dir / "config.yaml").read_text()
    build(RLConfig, yaml.safe_load(text), str(trial_dir / "config.yaml"))
    header = f"# best trial of the sweep: {row['trial']} ({row['penalty']}), gold {row['gold']:.4f} at KL {row['kl']:.4f}\n"
    header += "#   python -m jobs.ppo --config best.yaml --output-dir DIR\n"
    atomic_write_text(path, header + text)

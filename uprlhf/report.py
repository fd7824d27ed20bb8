"""The overoptimisation picture and summary of RL runs, one run per penalty.

Reward hacking shows as the proxy reward (ensemble mean) climbing while the gold
reward turns down, both read against how far the policy has moved, KL(π‖π_ref).
Comparing penalties at the same step would flatter the ones that simply move the
policy less, so gold is compared at one *matched* KL that every run reaches.

Each run is a list of per-step records, as written to ``metrics.jsonl``:
``step``, ``kl`` (mean KL(π‖π_ref) per sample, nats), ``reward_mean`` (proxy),
``uncertainty`` (mean u of the step's samples) and ``penalized_reward``; optionally
``gold`` (gold reward on held-out prompts, only at evaluation steps; missing or
None elsewhere), ``gold_kl`` (the KL of those held-out samples; ``kl`` if absent)
and ``alarm`` (whether the reward-hacking alarm fired at the step).
"""

from __future__ import annotations

import html
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from uprlhf.rl.alarm import steps_before_peak
from uprlhf.atomic import atomic_write

Runs = Mapping[str, Sequence[Mapping[str, Any]]]

KL_LABEL = "KL(π‖π_ref) [nats per sample]"
REWARD_UNIT = "[reward-model units]"
OVEROPTIMISATION_PNG = "overoptimisation.png"
TRAINING_CURVES_PNG = "training_curves.png"

REQUIRED_KEYS = ("step", "kl", "reward_mean", "uncertainty", "penalized_reward")

# Table headers for the keys summarize() writes; other keys show under their own name.
COLUMN_TITLES = {
    "gold_at_matched_kl": "gold at matched KL",
    "gold_final": "gold, final",
    "gold_best": "gold, best",
    "gold_peak_step": "step of best gold",
    "matched_kl": "matched KL [nats]",
    "kl_final": "KL, final [nats]",
    "proxy_final": "proxy, final",
    "uncertainty_mean": "mean u",
    "alarm_first_step": "first alarm step",
    "alarm_lead_steps": "alarm lead [steps]",
}


@dataclass(frozen=True)
class _Step:
    """One validated record."""

    step: int
    kl: float
    proxy: float
    uncertainty: float
    penalized: float
    gold: float | None
    gold_kl: float | None
    alarm: bool


def _number(name: str, index: int, record: Mapping[str, Any], key: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"run {name!r}, record {index}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def _steps(name: str, records: Sequence[Mapping[str, Any]]) -> list[_Step]:
    """Validated records in step order.

    A resumed run logs the steps after its last checkpoint again; the later
    record of a step wins, as it is the one the run went on from.
    """
    if not records:
        raise ValueError(f"run {name!r} has no records")
    by_step: dict[int, _Step] = {}
    for index, record in enumerate(records):
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ValueError(f"run {name!r}, record {index}: missing key(s) {missing}")
        step = record["step"]
        if isinstance(step, bool) or not isinstance(step, Integral):
            raise ValueError(f"run {name!r}, record {index}: 'step' must be an int, got {step!r}")
        gold = None if record.get("gold") is None else _number(name, index, record, "gold")
        kl = _number(name, index, record, "kl")
        if gold is not None:
            gold_kl = kl if record.get("gold_kl") is None else _number(name, index, record, "gold_kl")
        else:
            gold_kl = None
        by_step[int(step)] = _Step(
            step=int(step),
            kl=kl,
            proxy=_number(name, index, record, "reward_mean"),
            uncertainty=_number(name, index, record, "uncertainty"),
            penalized=_number(name, index, record, "penalized_reward"),
            gold=gold,
            gold_kl=gold_kl,
            alarm=bool(record.get("alarm", False)),
        )
    return [by_step[step] for step in sorted(by_step)]


def _gold_points(steps: Sequence[_Step]) -> list[tuple[int, float, float]]:
    """(step, KL, gold) of the gold evaluations, in step order."""
    return [(s.step, s.gold_kl, s.gold) for s in steps if s.gold is not None]  # type: ignore[misc]


def _matched_kl(all_steps: Mapping[str, Sequence[_Step]]) -> float | None:
    """The smallest of the runs' largest gold-evaluation KLs: a KL every evaluated run reaches."""
    reach = [max(kl for _, kl, _ in points) for points in map(_gold_points, all_steps.values()) if points]
    return min(reach) if reach else None


def _gold_at_kl(points: Sequence[tuple[int, float, float]], kl: float) -> float | None:
    """Gold linearly interpolated at ``kl`` where the run first reaches it.

    Walks the gold evaluations in step order and takes the first one at exactly
    ``kl`` or the first segment between consecutive evaluations that crosses it.
    None when the run's first evaluation is already past ``kl`` (nothing to
    interpolate from: evaluate gold at step 0 to anchor every run) or never reaches it.
    """
    for i, (_, kl_a, gold_a) in enumerate(points):
        if kl_a == kl:
            return gold_a
        if i + 1 < len(points):
            _, kl_b, gold_b = points[i + 1]
            if min(kl_a, kl_b) < kl < max(kl_a, kl_b):
                return gold_a + (gold_b - gold_a) * (kl - kl_a) / (kl_b - kl_a)
    return None


def summarize(runs: Runs) -> dict[str, dict[str, Any]]:
    """Final figures per penalty (JSON-able; None where a run has no gold evaluation).

    Keys: ``gold_final`` (last gold evaluation), ``gold_best``, ``gold_peak_step``,
    ``gold_at_matched_kl`` and the ``matched_kl`` it is read at (see
    :func:`_gold_at_kl`), ``kl_final``, ``proxy_final``, ``uncertainty_mean``
    (over all steps), ``alarm_first_step`` and ``alarm_lead_steps`` (step of best
    gold − first alarm step; positive means a warning before gold peaked).
    """
    if not runs:
        raise ValueError("no runs to summarize")
    all_steps = {name: _steps(name, records) for name, records in runs.items()}
    matched = _matched_kl(all_steps)
    summary: dict[str, dict[str, Any]] = {}
    for name, steps in all_steps.items():
        points = _gold_points(steps)
        alarm_first = next((s.step for s in steps if s.alarm), None)
        row: dict[str, Any] = {
            "gold_final": None,
            "gold_best": None,
            "gold_peak_step": None,
            "gold_at_matched_kl": None,
            "matched_kl": matched,
            "kl_final": steps[-1].kl,
            "proxy_final": steps[-1].proxy,
            "uncertainty_mean": statistics.fmean(s.uncertainty for s in steps),
            "alarm_first_step": alarm_first,
            "alarm_lead_steps": None,
        }
        if points:
            # ties for the best gold count their earliest step
            peak_step, _, best = max(points, key=lambda p: (p[2], -p[0]))
            row.update(
                gold_final=points[-1][2],
                gold_best=best,
                gold_peak_step=peak_step,
                gold_at_matched_kl=_gold_at_kl(points, matched),  # type: ignore[arg-type]
                alarm_lead_steps=steps_before_peak(
                    alarm_first, [p[0] for p in points], [p[2] for p in points]
                ),
            )
        summary[name] = row
    return summary


def _colours(names: Sequence[str]) -> dict[str, Any]:
    """One colour per penalty, the same in every panel and figure."""
    palette = colormaps["tab10"]
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    return atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png", dpi=110), binary=True)


def _legend(ax: Axes) -> None:
    """A legend of the labelled lines, unless there are none (matplotlib would warn)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", transform=ax.transAxes, ha="center", va="center", color="grey")


def plot_overoptimisation(runs: Runs, path: str | Path) -> Path:
    """Proxy reward, gold reward and uncertainty against KL(π‖π_ref), one line per penalty.

    A dashed vertical line marks the matched KL at which :func:`summarize` compares gold.
    """
    all_steps = {name: _steps(name, records) for name, records in runs.items()}
    colours = _colours(list(all_steps))
    matched = _matched_kl(all_steps)
    fig = Figure(figsize=(16, 4.8))
    proxy_ax, gold_ax, u_ax = fig.subplots(1, 3)
    for name, steps in all_steps.items():
        style = {"color": colours[name], "marker": "o", "markersize": 3, "label": name}
        kls = [s.kl for s in steps]
        proxy_ax.plot(kls, [s.proxy for s in steps], **style)
        u_ax.plot(kls, [s.uncertainty for s in steps], **style)
        points = _gold_points(steps)
        if points:
            gold_ax.plot([p[1] for p in points], [p[2] for p in points], **style)
    if matched is None:
        _no_data(gold_ax, "gold evaluations")
    titles = (
        (proxy_ax, "Proxy reward (ensemble mean)", f"proxy reward {REWARD_UNIT}"),
        (gold_ax, "Gold reward (held-out prompts)", "gold reward [gold-scorer units]"),
        (u_ax, "Ensemble uncertainty u", f"u = std over members {REWARD_UNIT}"),
    )
    for ax, title, ylabel in titles:
        ax.set_title(title)
        ax.set_xlabel(KL_LABEL)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if matched is not None:
            ax.axvline(
                matched, color="black", linestyle="--", linewidth=1, label=f"matched KL = {matched:.3g}"
            )
        _legend(ax)
    return _save(fig, path)


def plot_training_curves(runs: Runs, path: str | Path) -> Path:
    """Proxy (solid) and penalised (dashed) reward, gold, u and KL against step; ▲ marks alarm steps."""
    all_steps = {name: _steps(name, records) for name, records in runs.items()}
    colours = _colours(list(all_steps))
    fig = Figure(figsize=(12, 8))
    (proxy_ax, gold_ax), (u_ax, kl_ax) = fig.subplots(2, 2, sharex=True)
    for name, steps in all_steps.items():
        colour = colours[name]
        xs = [s.step for s in steps]
        proxy_ax.plot(xs, [s.proxy for s in steps], color=colour, label=name)
        proxy_ax.plot(xs, [s.penalized for s in steps], color=colour, linestyle="--")
        u_ax.plot(xs, [s.uncertainty for s in steps], color=colour, label=name)
        kl_ax.plot(xs, [s.kl for s in steps], color=colour, label=name)
        points = _gold_points(steps)
        if points:
            gold_ax.plot([p[0] for p in points], [p[2] for p in points], color=colour, marker="o",
                         markersize=3, label=name)
        alarms = [s for s in steps if s.alarm]
        if alarms:
            u_ax.scatter([s.step for s in alarms], [s.uncertainty for s in alarms], color=colour,
                         marker="^", s=40, zorder=3)
    if not any(_gold_points(steps) for steps in all_steps.values()):
        _no_data(gold_ax, "gold evaluations")
    panels = (
        (proxy_ax, "Proxy (solid) and penalised (dashed) reward", f"reward {REWARD_UNIT}"),
        (gold_ax, "Gold reward (held-out prompts)", "gold reward [gold-scorer units]"),
        (u_ax, "Ensemble uncertainty u (▲ alarm fired)", f"u {REWARD_UNIT}"),
        (kl_ax, "KL(π‖π_ref)", "KL [nats per sample]"),
    )
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _legend(ax)
    for ax in (u_ax, kl_ax):
        ax.set_xlabel("training step")
    return _save(fig, path)


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table of plain strings, every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_table(text: str) -> str:
    """A GitHub-style pipe table as HTML; any other text is shown as it is, in <pre>."""

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]

    lines = [line for line in text.strip().splitlines() if line.strip()]
    is_table = (
        len(lines) >= 2
        and all(line.lstrip().startswith("|") for line in lines)
        and all(re.fullmatch(r":?-+:?", c) for c in cells(lines[1]))
    )
    if not is_table:
        return f"<pre>{html.escape(text)}</pre>"
    return _html_table(cells(lines[0]), [cells(line) for line in lines[2:]])


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
"""


def write_report(
    out_dir: str | Path,
    runs: Runs,
    summary: Mapping[str, Mapping[str, Any]],
    *,
    title: str,
    extra_markdown_tables: Mapping[str, str] | None = None,
) -> Path:
    """Write ``report.html`` and its two PNGs into ``out_dir``; returns the HTML path.

    The page needs nothing but the PNGs beside it (referenced by file name), so the
    folder can be copied or served as it is. ``extra_markdown_tables`` maps a
    heading to a pipe table in Markdown (e.g. from a sweep), shown after the summary.
    """
    out_dir = Path(out_dir)
    plot_overoptimisation(runs, out_dir / OVEROPTIMISATION_PNG)
    plot_training_curves(runs, out_dir / TRAINING_CURVES_PNG)

    columns: list[str] = []
    for row in summary.values():
        columns += [key for key in row if key not in columns]
    table = _html_table(
        ["penalty", *(COLUMN_TITLES.get(key, key) for key in columns)],
        [[name, *(_format(row.get(key)) for key in columns)] for name, row in summary.items()],
    )
    extras = "".join(
        f"<h2>{html.escape(heading)}</h2>{_markdown_table(text)}"
        for heading, text in (extra_markdown_tables or {}).items()
    )
    explanation = (
        "Each line is one penalty. x is the mean KL(π‖π_ref) per sample in nats: how far the "
        "policy has moved from the reference. The proxy reward is the ensemble mean the policy "
        "is trained on, the gold reward is the gold scorer on held-out prompts (x: the KL of "
        "those samples), u is the ensemble std over members. Reward hacking shows as the proxy "
        "still rising while gold turns down, usually as u rises. The dashed line is the matched "
        "KL, the smallest of the runs' largest gold-evaluation KLs, so every run reaches it; "
        "'gold at matched KL' is gold interpolated there, the fair comparison between penalties. "
        "Alarm lead is the step of best gold minus the first alarm step (positive: it warned first)."
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Summary</h2>
{table}
<p>{html.escape(explanation)}</p>
<h2>Overoptimisation</h2>
<img src="{html.escape(OVEROPTIMISATION_PNG)}" alt="proxy, gold and uncertainty against KL">
<h2>Training curves</h2>
<img src="{html.escape(TRAINING_CURVES_PNG)}" alt="proxy, gold, uncertainty and KL against step">
{extras}
</body>
</html>
"""
    return atomic_write(out_dir / "report.html", lambda fh: fh.write(page), binary=False)

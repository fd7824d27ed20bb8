"""A study's figures over seeds: per arm mean ± std and a 95 % interval, paired differences, claims decided.

Pure functions over per-cell figures (``cells[arm][seed][metric]``), so the aggregation
a study writes is the one its tests recompute by hand. Intervals are Student-t over
seeds: with n seeds, mean ± t(0.975, n − 1) · std / √n, std with ddof = 1; a claim about
spread uses the F interval of the ratio of two arms' variances (``variance_ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from uprlhf.rl.gold_metrics import gold_at_kl, pairwise_win_rate
from uprlhf.studies.config import STUDY_METRICS, ClaimConfig

Cells = Mapping[str, Mapping[int, Mapping[str, Any]]]
# A win rate is compared with an even split, every other figure with the baseline's (a difference of 0).
NO_EFFECT = {"win_rate": 0.5}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, std (ddof = 1) and the 95 % Student-t interval of ``values``; None figures are left out."""
    kept = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(kept.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(kept.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = float(kept.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def matched_kl(curves: Mapping[str, Mapping[int, Sequence[tuple[float, float]]]]) -> float | None:
    """The smallest of every cell's largest evaluated KL: a KL that every cell reached."""
    reach = [max(kl for kl, _ in points) for seeds in curves.values() for points in seeds.values() if points]
    return min(reach) if reach else None


def rank_correlation(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Spearman's ρ of (x, y) pairs; None with fewer than three pairs or a constant side."""
    if len(pairs) < 3:
        return None
    x, y = np.asarray(pairs, dtype=np.float64).T
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rho = float(stats.spearmanr(x, y)[0])
    return rho if math.isfinite(rho) else None


def cell_figures(
    summary: Mapping[str, Any], curve: Sequence[tuple[float, float]], kl: float | None, baseline_gold: Sequence[float] | None,
    uncertainty: Sequence[tuple[float, float]] = (), metrics: Sequence[str] = STUDY_METRICS,
) -> dict[str, Any]:
    """One cell's figures: its summary's ``metrics``, gold read at the study's matched ``kl`` along its (KL, gold)
    ``curve``, its pairwise gold win rate against the baseline cell of its seed (per-prompt gold) and
    the rank correlation of its per-step (KL, u) ``uncertainty`` (paper 000 Fig. 3: does u rise with KL?)."""
    figures = {m: summary.get(m) for m in metrics}
    figures["gold_at_matched_kl"] = (
        gold_at_kl([k for k, _ in curve], [g for _, g in curve], kl) if curve and kl is not None else None
    )
    own = summary.get("gold_per_prompt_final")
    figures["win_rate"] = pairwise_win_rate(own, baseline_gold) if own and baseline_gold else None
    figures["u_kl_spearman"] = rank_correlation(uncertainty)
    return figures


def paired_difference(cells: Cells, arm: str, against: str, metric: str) -> dict[str, Any]:
    """The spread of ``arm`` − ``against`` in ``metric``, paired by seed; a win rate (taken against the
    baseline) is compared with ½, the baseline against itself."""
    differences = []
    for seed in sorted(cells[arm]):
        value = cells[arm][seed].get(metric)
        reference = NO_EFFECT.get(metric, cells[against].get(seed, {}).get(metric))
        if value is not None and reference is not None:
            differences.append(value - reference)
    return spread(differences)


def aggregate(cells: Cells, baseline: str, metrics: Sequence[str] = STUDY_METRICS) -> dict[str, Any]:
    """Per arm and metric the spread over seeds, and the spread of the difference to ``baseline`` paired by seed."""
    arms: dict[str, Any] = {}
    for arm, seeds in cells.items():
        row: dict[str, Any] = {"seeds": sorted(seeds), "metrics": {}, "versus_baseline": {}}
        for metric in metrics:
            row["metrics"][metric] = spread([seeds[s].get(metric) for s in sorted(seeds)])
            if arm != baseline:
                row["versus_baseline"][metric] = paired_difference(cells, arm, baseline, metric)
        arms[arm] = row
    return {"baseline": baseline, "metrics": list(metrics), "arms": arms}


def variance_ratio(arm: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """The ratio of two arms' variances over seeds (each a ``spread``) and its 95 % F interval.

    With n₁, n₂ seeds and sample variances s₁², s₂², the interval of σ₁²/σ₂² is
    [R / F(0.975; n₁−1, n₂−1), R / F(0.025; n₁−1, n₂−1)], R = s₁²/s₂² (normal figures,
    independent arms; seeds that pair the arms make it conservative). None without two
    seeds on each side or with a zero variance below.
    """
    n1, n2, s1, s2 = arm["n"], other["n"], arm["std"], other["std"]
    stds = [s1, s2]
    if n1 < 2 or n2 < 2 or s1 is None or not s2:
        return {"n": [n1, n2], "std": stds, "value": None, "ci95": None}
    ratio = (s1 / s2) ** 2
    interval = [ratio / float(stats.f.ppf(0.975, n1 - 1, n2 - 1)), ratio / float(stats.f.ppf(0.025, n1 - 1, n2 - 1))]
    return {"n": [n1, n2], "std": stds, "value": ratio, "ci95": interval}


def decide(claim: ClaimConfig, aggregated: Mapping[str, Any], cells: Cells | None = None) -> dict[str, Any]:
    """``holds`` when the 95 % interval lies wholly on the claimed side of no effect, ``does not hold``
    when wholly on the other, else ``inconclusive`` (also with under two seeds).

    ``compare: mean``: the interval of the differences paired by seed (no effect: 0); a claim
    against another arm than the baseline (``claim.against``) is paired over ``cells``.
    ``compare: spread``: the F interval of the variance ratio (no effect: 1).
    """
    against = claim.against or aggregated["baseline"]
    if claim.compare == "spread":
        ratio = variance_ratio(aggregated["arms"][claim.arm]["metrics"][claim.metric],
                               aggregated["arms"][against]["metrics"][claim.metric])
        verdict = "inconclusive"
        if ratio["ci95"] is not None:
            low, high = ratio["ci95"]
            above, below = low > 1.0, high < 1.0
            verdict = "holds" if (below if claim.direction == "lower" else above) else \
                "does not hold" if (above if claim.direction == "lower" else below) else "inconclusive"
        return {**claim.model_dump(), "against": against, "ratio": ratio, "verdict": verdict}
    if against == aggregated["baseline"]:
        difference = aggregated["arms"][claim.arm]["versus_baseline"][claim.metric]
    elif cells is None:
        raise ValueError(f"claim {claim.text!r} is against {against!r}, not the baseline: its cells are needed")
    else:
        difference = paired_difference(cells, claim.arm, against, claim.metric)
    sign = 1.0 if claim.direction == "higher" else -1.0
    verdict = "inconclusive"
    if difference["ci95"] is not None:
        low, high = sorted(sign * v for v in difference["ci95"])
        verdict = "holds" if low > 0 else "does not hold" if high < 0 else "inconclusive"
    return {**claim.model_dump(), "against": against, "difference": difference, "verdict": verdict}


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _cell(figure: Mapping[str, Any]) -> str:
    """``mean ± std [low, high]`` of one spread."""
    if figure["mean"] is None:
        return "–"
    text = _number(figure["mean"])
    if figure["std"] is not None:
        text += f" ± {_number(figure['std'])} [{_number(figure['ci95'][0])}, {_number(figure['ci95'][1])}]"
    return text


def markdown(aggregated: Mapping[str, Any], claims: Sequence[Mapping[str, Any]], command: str) -> str:
    """study.md: the per-arm table (mean ± std [95 % interval], n seeds), the differences, one line per claim."""
    metrics = aggregated["metrics"]
    lines = [f"# Study\n\n`{command}`\n", "## Arms (mean ± std [95 % interval] over seeds)\n",
             "| arm | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for arm, row in aggregated["arms"].items():
        lines.append(f"| {arm} | {len(row['seeds'])} | " + " | ".join(_cell(row["metrics"][m]) for m in metrics) + " |")
    lines += ["", f"## Differences to {aggregated['baseline']} (paired by seed; win_rate: minus ½)\n",
              "| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm, row in aggregated["arms"].items():
        if row["versus_baseline"]:
            lines.append(f"| {arm} | " + " | ".join(_cell(row["versus_baseline"][m]) for m in metrics) + " |")
    if claims:
        lines += ["", "## Claims\n"]
        for claim in claims:
            paper = f" ({claim['paper']})" if claim["paper"] else ""
            if claim["compare"] == "spread":
                ratio = claim["ratio"]
                stds = " against ".join(_number(v) for v in ratio["std"])
                interval = "–" if ratio["ci95"] is None else f"[{_number(ratio['ci95'][0])}, {_number(ratio['ci95'][1])}]"
                lines.append(f"- **{claim['verdict']}**: {claim['text']}{paper}. Measured: std of {claim['metric']} over seeds, "
                             f"{claim['arm']} against {claim['against']}: {stds}; variance ratio {_number(ratio['value'])} "
                             f"{interval} (claimed {claim['direction']}, n = {ratio['n'][0]} and {ratio['n'][1]}).")
                continue
            lines.append(f"- **{claim['verdict']}**: {claim['text']}{paper}. Measured: {claim['metric']} of "
                         f"{claim['arm']} − {claim['against']} = {_cell(claim['difference'])} "
                         f"(claimed {claim['direction']}, n = {claim['difference']['n']}).")
    return "\n".join(lines) + "\n"

"""Reward-hacking alarm: flags the step where the policy starts to fool the ensemble.

When the policy begins to exploit the reward models it reaches responses they were
not trained on; the members disagree there, so the ensemble uncertainty u of fresh
samples rises out of its usual band while the proxy reward (the ensemble mean)
keeps climbing. KL(π‖π_ref) only shows the drift afterwards, once the policy has
already moved. The alarm fires when both signs hold at the same step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from uprlhf.rl.config import AlarmConfig


class HackingAlarm:
    """Fires when u leaves its running band while the proxy reward is climbing.

    The band is the mean and sample std of u over the previous non-firing steps
    (the last ``band_window`` of them). Steps that fire are kept out of the band:
    otherwise a sustained rise would widen the band until it stopped firing, and
    the alarm would go quiet exactly while the hacking goes on.
    """

    def __init__(self, config: AlarmConfig | None = None) -> None:
        self.config = config or AlarmConfig()
        self.fired_steps: list[int] = []
        self._band: deque[float] = deque(maxlen=self.config.band_window)
        self._trend: deque[tuple[int, float]] = deque(maxlen=self.config.trend_window)
        self._steps_seen = 0
        self._last_step: int | None = None

    @property
    def threshold(self) -> float | None:
        """The u above which the alarm may fire now; None during warm-up."""
        if self._steps_seen < self.config.warmup_steps:
            return None
        std = max(statistics.stdev(self._band), self.config.min_std)
        return statistics.fmean(self._band) + self.config.band_sigmas * std

    def update(self, step: int, uncertainty: float, proxy: float) -> bool:
        """Record one step's mean u and proxy reward; True when the alarm fires at it."""
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"steps must increase: got step {step} after step {self._last_step}")
        uncertainty, proxy = float(uncertainty), float(proxy)
        for name, value in (("uncertainty", uncertainty), ("proxy", proxy)):
            # one NaN in the band would disable the alarm for the rest of the run
            if not math.isfinite(value):
                raise ValueError(f"{name} at step {step} is not finite: {value}")
        threshold = self.threshold
        self._trend.append((step, proxy))
        fired = (
            threshold is not None
            and uncertainty > threshold
            and len(self._trend) == self.config.trend_window
            and _slope(self._trend) > 0
        )
        if fired:
            self.fired_steps.append(step)
        else:
            self._band.append(uncertainty)
        self._steps_seen += 1
        self._last_step = step
        return fired

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state, so a resumed run continues the same band."""
        return {
            "band": list(self._band),
            "trend": [[step, proxy] for step, proxy in self._trend],
            "steps_seen": self._steps_seen,
            "last_step": self._last_step,
            "fired_steps": list(self.fired_steps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a smaller window than the saved one keeps the newest values."""
        self._band = deque((float(u) for u in state["band"]), maxlen=self.config.band_window)
        self._trend = deque(
            ((int(step), float(proxy)) for step, proxy in state["trend"]),
            maxlen=self.config.trend_window,
        )
        self._steps_seen = int(state["steps_seen"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self.fired_steps = [int(step) for step in state["fired_steps"]]


def _slope(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of proxy against step (steps need not be evenly spaced)."""
    xs = [float(step) for step, _ in points]
    ys = [proxy for _, proxy in points]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
    den = sum((x - x_mean) ** 2 for x in xs)
    return num / den


def steps_before_peak(
    first_fire_step: int | None, steps: Sequence[int], gold: Sequence[float | None]
) -> int | None:
    """(step of the best gold reward) − (first alarm step); None if the alarm never fired.

    Positive means the alarm fired before the gold reward peaked, i.e. it gave that
    many steps of warning. Gold entries that are None (steps without a gold
    evaluation) are skipped; a tie for the best gold counts its earliest step.
    """
    if len(steps) != len(gold):
        raise ValueError(f"steps and gold differ in length: {len(steps)} != {len(gold)}")
    if first_fire_step is None:
        return None
    evaluated = sorted((step, g) for step, g in zip(steps, gold) if g is not None)
    if not evaluated:
        raise ValueError("gold has no evaluations, so it has no peak")
    peak_step = max(evaluated, key=lambda point: (point[1], -point[0]))[0]
    return peak_step - first_fire_step

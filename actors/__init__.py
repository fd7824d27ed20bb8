"""One Ray role per module, each a thin adapter over a plain class in ``uprlhf``.

Methods that do work return ``(result, seconds)``: the compute time measured inside
the actor, so the driver can tell compute from Ray's own overhead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")


def timed(fn: Callable[..., R], *args, **kwargs) -> tuple[R, float]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


class PlacementError(RuntimeError):
    """The cluster cannot hold a placement plan, or a given group does not match it."""


class RoleError(RuntimeError):
    """An actor of role ``role`` died (or hung) and could not be brought back within the restart policy."""

    def __init__(self, message: str, role: str = ""):
        super().__init__(message)
        self.role = role

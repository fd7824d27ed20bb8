"""Role groups: one handle for every actor of a role, so the driver's loop reads like one process.

A role's actor class declares, per method, how one call on the group is split over
its actors and how their answers are joined (``@dispatch(scatter=..., gather=...)``,
after veRL's ``@register(dispatch_mode=...)``). ``group.generate(prompts, seed)`` then
fans out to every rollout worker and returns one batch; ``group.train(batch, ...)``
shards the batch over the learner ranks and returns their averaged statistics.

The restart policy lives here too: when an actor of a restartable role has died, the
group rebuilds it in the same bundle, brings it up to date (``on_restart``) and
retries the call, up to ``max_retries`` times per call.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors import RoleError

log = logging.getLogger("uprlhf")
_REDO = object()  # what a join returns when the call must be made again

Scatter = Callable[..., list[tuple[tuple, dict]]]  # (n_actors, *args, **kwargs) -> per-actor (args, kwargs)
Gather = Callable[[list], Any]


def broadcast(n: int, *args, **kwargs) -> list[tuple[tuple, dict]]:
    """Every actor gets the same arguments."""
    return [(args, kwargs)] * n


def to_first(n: int, *args, **kwargs) -> list[tuple[tuple, dict]]:
    """Only the first actor is called (rank 0 answers for the role)."""
    return [(args, kwargs)]


def every(results: list) -> list:
    return results


def first(results: list) -> Any:
    return results[0]


@dataclass(frozen=True)
class Dispatch:
    """How one call on a group becomes calls on its actors and how their answers are joined.

    ``timed``: the actor method returns ``(result, seconds)``; the group joins the results
    and reports the slowest actor's seconds, so the driver can tell compute from Ray's overhead.
    """

    scatter: Scatter = broadcast
    gather: Gather = every
    timed: bool = False


def dispatch(scatter: Scatter = broadcast, gather: Gather = every, *, timed: bool = False) -> Callable:
    """Declare a role method's dispatch (read by ``RoleGroup``; a plain method otherwise)."""

    def mark(method: Callable) -> Callable:
        method.__dispatch__ = Dispatch(scatter, gather, timed)
        return method

    return mark


class Pending:
    """A call in flight on a group: its object refs and how to join them."""

    def __init__(self, refs: list[ray.ObjectRef], how: Dispatch):
        self.refs, self.how = refs, how

    def ready(self) -> bool:
        """Whether every actor has answered (never waits)."""
        return len(ray.wait(self.refs, num_returns=len(self.refs), timeout=0)[0]) == len(self.refs)

    def wait(self, timeout: float | None, slice_s: float = 1.0) -> list[int]:
        """Wait until every actor has answered or ``timeout`` seconds of waiting passed; the indices still unanswered.

        The wait runs in slices, and a slice that overran (the driver itself was stopped or
        starved) counts only as the time it asked for: a held-up driver never takes its
        actors for hung.
        """
        if timeout is None:
            ray.wait(self.refs, num_returns=len(self.refs))
            return []
        waited = 0.0
        while True:
            ask = max(0.0, min(slice_s, timeout - waited))
            started = time.perf_counter()
            ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=ask)
            if len(ready) == len(self.refs):
                return []
            waited += min(time.perf_counter() - started, ask + 0.5)
            if waited >= timeout:
                return [i for i, ref in enumerate(self.refs) if not ray.wait([ref], timeout=0)[0]]

    def died(self) -> list[int]:
        """Indices of the actors that died instead of answering (call once every actor has answered)."""
        dead = []
        for i, ref in enumerate(self.refs):
            try:
                ray.get(ref, timeout=0)
            except RayActorError:
                dead.append(i)
            except RayTaskError:
                pass
        return dead

    def result(self, timeout: float | None = None) -> Any:
        results = ray.get(self.refs, timeout=timeout)
        if not self.how.timed:
            return self.how.gather(results)
        return self.how.gather([value for value, _ in results]), max(seconds for _, seconds in results)


@dataclass
class Deadline:
    """How long a call may take: ``multiple`` × the median of the method's past calls, never under ``floor_s``.

    Until a method has ``warmup`` past calls (the first loads models, compiles, fills caches)
    its deadline is ``first_s``.
    """

    multiple: float = 10.0
    floor_s: float = 120.0
    first_s: float = 900.0
    warmup: int = 2
    history: dict[str, list[float]] = field(default_factory=dict)

    def seconds(self, method: str) -> float:
        past = self.history.get(method, [])
        if len(past) < self.warmup:
            return self.first_s
        return max(self.floor_s, self.multiple * statistics.median(past[-50:]))

    def observe(self, method: str, seconds: float) -> None:
        self.history.setdefault(method, []).append(seconds)


class RoleGroup:
    """The actors of one role, built by ``make(i)`` (in its bundle), called as one.

    ``on_restart(handle)`` brings a rebuilt actor up to date (weights, ensemble version);
    ``max_retries`` bounds the rebuild-and-retry rounds of one call (0: a death is raised).
    With a ``deadline``, an actor that has not answered in time is taken as hung: a
    warning names it, it is killed and rebuilt like a dead one, and the call retried.
    """

    def __init__(
        self,
        name: str,
        role: type,
        make: Callable[[int], Any],
        count: int,
        *,
        max_retries: int = 0,
        on_restart: Callable[[Any], None] | None = None,
        deadline: Deadline | None = None,
    ):
        self.name, self.role, self.make, self.max_retries = name, role, make, max_retries
        self.on_restart = on_restart or (lambda handle: None)
        self.deadline = deadline
        self.handles = [make(i) for i in range(count)]

    def __len__(self) -> int:
        return len(self.handles)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_") or not callable(getattr(self.role, method, None)):
            raise AttributeError(f"{self.name}: role {self.role.__name__} has no method {method!r}")
        return lambda *args, **kwargs: self.call(method, *args, **kwargs)

    def how(self, method: str) -> Dispatch:
        return getattr(getattr(self.role, method), "__dispatch__", Dispatch())

    def submit(self, method: str, *args, **kwargs) -> Pending:
        """Start ``method`` on the role's actors (split as declared) without waiting."""
        how = self.how(method)
        calls = how.scatter(len(self.handles), *args, **kwargs)
        refs = [getattr(handle, method).remote(*a, **kw) for handle, (a, kw) in zip(self.handles, calls)]
        return Pending(refs, how)

    def call(self, method: str, *args, **kwargs) -> Any:
        """``method`` on the role's actors, joined as declared; a dead or hung actor is rebuilt and the call retried."""
        for attempt in range(self.max_retries + 1):
            pending = self.submit(method, *args, **kwargs)
            result = self._join(pending, time.perf_counter(), method, attempt)
            if result is not _REDO:
                return result
        raise AssertionError("unreachable")

    def finish(self, pending: Pending, started: float, method: str, *args, **kwargs) -> Any:
        """The result of ``method`` ``submit``ted at ``started`` (``time.perf_counter``) with these arguments,
        under its deadline; a dead or hung actor is rebuilt and the call redone through ``call``."""
        result = self._join(pending, started, method, attempt=-1)
        return self.call(method, *args, **kwargs) if result is _REDO else result

    def _join(self, pending: Pending, started: float, method: str, attempt: int) -> Any:
        """``pending``'s result, or ``_REDO`` once its dead or hung actors are rebuilt (RoleError on the last attempt)."""
        timeout = None
        if self.deadline:
            timeout = max(0.0, self.deadline.seconds(method) - (time.perf_counter() - started))
        hung = pending.wait(timeout)
        if hung:
            if attempt == self.max_retries:
                raise RoleError(f"{self.name} {hung}: {method} gave no answer within {self.deadline.seconds(method):.0f} s, "
                                f"{attempt} restart(s) tried", self.name)
            log.warning("%s %s: %s gave no answer within %.0f s; killing and rebuilding it, then retrying",
                        self.name, hung, method, self.deadline.seconds(method))
            for i in hung:
                self.replace(i)
            return _REDO
        try:
            result = pending.result()
        except (RayActorError, RayTaskError) as err:
            # a rank that lost its peer fails its own task: the peer's death is what happened
            if not isinstance(err, RayActorError) and not pending.died():
                raise
            if attempt == self.max_retries:
                raise RoleError(f"{self.name}: {method} failed after {attempt} restart(s): {type(err).__name__}: {err}",
                                self.name) from err
            log.warning("%s died (%s); restarting it and retrying %s", self.name, type(err).__name__, method)
            self.replace_dead()
            return _REDO
        if self.deadline:
            self.deadline.observe(method, time.perf_counter() - started)
        return result

    def replace_dead(self, timeout_s: float = 60.0) -> list[int]:
        """Rebuild every actor of the role that no longer answers; returns their indices."""
        replaced = []
        for i, handle in enumerate(self.handles):
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
            except (RayActorError, GetTimeoutError):
                ray.kill(handle)
                self.handles[i] = self.make(i)
                self.on_restart(self.handles[i])
                replaced.append(i)
        return replaced

    def replace(self, index: int = 0) -> None:
        """Rebuild actor ``index`` whatever its state (a role whose actor failed in a way it cannot recover from)."""
        ray.kill(self.handles[index])
        self.handles[index] = self.make(index)
        self.on_restart(self.handles[index])

    def kill(self) -> None:
        for handle in self.handles:
            ray.kill(handle)


def split(items: Sequence, parts: int) -> list[list]:
    """``items`` in at most ``parts`` contiguous, nearly equal, non-empty slices."""
    size = -(-len(items) // parts)
    return [list(items[i * size : (i + 1) * size]) for i in range(parts) if items[i * size : (i + 1) * size]]

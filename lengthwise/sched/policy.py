"""Scheduling policies: which waiting request is admitted next, and which running one yields.

The `Scheduler` does the mechanics (token budget, sequence limit, KV blocks, chunked prefill,
preemption); a policy only decides order. It owns the waiting queue, so a policy can keep it in
whatever structure its order needs (a FIFO, bins, a sorted window). Continuous batching admits
every step; a static-batching policy is one that offers nothing until its batch has drained.
Pure Python: no torch.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import count

from lengthwise.sequence import Request


@dataclass(frozen=True)
class SchedulerView:
    """What a policy may look at when it offers requests for admission."""

    now: float
    num_running_requests: int
    num_running_seqs: int
    num_free_blocks: int
    num_blocks: int
    seq_slots: int  # how many more sequences max_num_seqs allows this step


class SchedulingPolicy(ABC):
    """Orders admission and preemption. Subclasses register under `name` for `make_policy`."""

    name: str = ""
    registry: dict[str, type[SchedulingPolicy]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            SchedulingPolicy.registry[cls.name] = cls

    @abstractmethod
    def add(self, request: Request) -> None:
        """A request arrives (or comes back after a preemption) and waits."""

    @abstractmethod
    def remove(self, request: Request) -> bool:
        """Take a waiting request out (abort). `False` if it was not waiting."""

    @abstractmethod
    def candidates(self, view: SchedulerView) -> Iterable[Request]:
        """Waiting requests in the order to try admitting them now. The scheduler stops at the
        first one that does not fit, so the order is also a promise of fairness."""

    @abstractmethod
    def admitted(self, request: Request) -> None:
        """The scheduler admitted `request` (one that `candidates` offered): stop offering it."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of waiting requests."""

    def preempted(self, request: Request) -> None:
        """A running request lost its KV blocks and must wait again (to be recomputed)."""
        self.add(request)

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt when blocks run out: by default the newest arrival,
        which has the least work to lose and the most time left to wait."""
        return max(running, key=lambda r: r.arrival_time)

    def finished(self, request: Request) -> None:  # noqa: B027 (optional hook)
        """A running request finished; policies that track batches or lengths may note it."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: arrival order, preempted requests back in their arrival place."""

    name = "fcfs"

    def __init__(self) -> None:
        self._queue: list[tuple[float, int, Request]] = []
        self._keys: dict[int, tuple[float, int]] = {}
        self._tiebreak = count()

    def add(self, request: Request) -> None:
        key = self._keys.setdefault(id(request), (request.arrival_time, next(self._tiebreak)))
        bisect.insort(self._queue, (*key, request), key=lambda e: e[:2])

    def remove(self, request: Request) -> bool:
        key = self._keys.get(id(request))
        if key is None:
            return False
        i = bisect.bisect_left(self._queue, key, key=lambda e: e[:2])
        if i < len(self._queue) and self._queue[i][2] is request:
            del self._queue[i]
            del self._keys[id(request)]
            return True
        return False

    def candidates(self, view: SchedulerView) -> Iterable[Request]:
        # A copy (admission mutates the queue), and no longer than could possibly be admitted.
        return [e[2] for e in self._queue[:max(view.seq_slots, 0)]]

    def admitted(self, request: Request) -> None:
        self.remove(request)

    def __len__(self) -> int:
        return len(self._queue)


def make_policy(name: str) -> SchedulingPolicy:
    """The policy registered under `name` (e.g. "fcfs"), with default settings."""
    cls = SchedulingPolicy.registry.get(name)
    if cls is None:
        raise ValueError(f"policy {name!r} is unknown; available: {sorted(SchedulingPolicy.registry)}")
    return cls()

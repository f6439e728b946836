"""Scheduling policies: which waiting request is admitted next, and which running one yields.

The `Scheduler` does the mechanics (token budget, sequence limit, KV blocks, chunked prefill,
preemption, failure collection); a policy only decides order. It owns the waiting queue, so a
policy can keep it in whatever structure its order needs (a FIFO, bins, a sorted window).
Continuous batching admits every step; a batch policy (`sched/batching.py`) offers nothing new
until its batch has drained, and may cap a batch's length (`cap`), which makes the scheduler
collect the rows that reach it (FCR). Pure Python: no torch.
"""

from __future__ import annotations

import bisect
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

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
    block_size: int = 16
    max_num_seqs: int = 256
    running: tuple[Request, ...] = field(default=(), repr=False)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


class SchedulingPolicy(ABC):
    """Orders admission and preemption. Subclasses register under `name` for `make_policy`;
    their keyword-only `__init__` arguments are the policy's options."""

    name: str = ""
    registry: dict[str, type[SchedulingPolicy]] = {}
    # How rows that reach their `cap` are collected: "recompute" (start again from scratch, as
    # the first paper) or "continue" (keep the KV segments and resume later).
    fcr: str | None = None
    # Whether it orders by `Request.priority` (lower first): the engine refuses a nonzero priority
    # under a policy that would ignore it (vLLM's rule), and the scheduler lets a waiting request
    # preempt running ones of a lower priority class (`most_urgent`).
    supports_priority: bool = False

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

    def stop_may_admit(self) -> bool:
        """Whether a running sequence that stops could let a waiting request in at the next step
        (the engine launches no decode step ahead then: it would be wasted). Here: anything waits."""
        return len(self) > 0

    def preempted(self, request: Request) -> None:
        """A running request lost its KV blocks and must wait again (to be recomputed)."""
        self.add(request)

    def victim(self, running: list[Request], now: float) -> Request:
        """The running request to preempt when blocks run out (`now`: the scheduler's clock): by
        default the newest arrival, which has the least work to lose and the most time left to wait
        (among equal arrivals the last admitted: `running` is in admission order)."""
        return max(reversed(running), key=lambda r: r.arrival_time)

    def most_urgent(self, now: float) -> Request | None:
        """The waiting request this policy would offer first (only policies that
        `supports_priority` need say: the scheduler preempts for it across priority classes)."""
        return None

    def admits(self, request: Request, view: SchedulerView) -> bool:
        """Whether this policy's own admission test (beyond slots and blocks, which the scheduler
        checks) would let `request` in given `view`: the scheduler asks before preempting for it."""
        return True

    def finished(self, request: Request) -> None:  # noqa: B027 (optional hook)
        """A running request finished (or was aborted); policies that track batches may note it."""

    def cap(self, request: Request) -> int | None:
        """The most tokens `request` may have generated in its current batch (None: no cap). A
        running request that reaches its cap unfinished is collected (`collected`)."""
        return None

    def collected(self, request: Request) -> None:
        """A running request reached its cap and left the batch: queue it to finish later."""
        self.add(request)

    def rows(self, num_running_seqs: int) -> int:
        """Batch rows this decode step occupies, idle (finished, padded) rows included: a static
        batch keeps its size until its last row ends. Continuous batching has no idle rows."""
        return num_running_seqs

    def padding_rows(self, num_running_seqs: int) -> int:
        """Idle rows the executor should compute anyway, as padding (`static:pad=true`, the papers'
        vanilla executor); 0 for every policy that lets finished rows go."""
        return 0

    @property
    def options(self) -> dict[str, Any]:
        """The settings this instance was built with (for reports)."""
        return {k: getattr(self, k) for k in _option_names(type(self)) if hasattr(self, k)}


def predicted_need(request: Request, view: SchedulerView, quantile: float) -> int:
    """KV blocks `request` will hold at its predicted length's `quantile` (its prompt segment once,
    a response segment per sample); without a prediction, at its `max_tokens`."""
    pred = request.prediction
    if pred is not None:
        length = pred.quantile(quantile)
    elif request.predicted_length is not None:
        length = request.predicted_length
    else:
        length = request.max_tokens
    out = min(request.max_tokens, max(1, request.params.min_tokens, int(length + 0.999)))
    return view.blocks_for(request.prompt_len) + sum(
        view.blocks_for(max(out, len(s.output_ids) + 1)) for s in request.active_seqs)


def predictive_admission(candidates: list[Request], view: SchedulerView, quantile: float) -> list[Request]:
    """Predictive admission: the prefix of `candidates` whose predicted KV needs fit in the blocks
    that should still be free once every running request has grown to its predicted length."""
    held = sum(view.blocks_for(r.prompt_len) + sum(view.blocks_for(len(s.output_ids)) for s in r.active_seqs)
               for r in view.running)
    reserved = sum(predicted_need(r, view, quantile) for r in view.running) - held
    free = view.num_free_blocks - max(0, reserved)
    out = []
    for r in candidates:
        need = predicted_need(r, view, quantile)
        if need > free and (out or view.running):
            break  # an empty engine always admits its first candidate: nothing else could make room
        free -= need
        out.append(r)
    return out


def check_quantile(quantile: float) -> None:
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: arrival order, preempted requests back in their arrival place.

    `predictive=True` adds predictive admission: a request is admitted only when the blocks its
    predicted length (at the prediction's `quantile`, the safety margin) will need should still be
    free after the running requests reach theirs; vLLM instead admits whenever the prompt fits
    and preempts when the cache runs out. Sequences that outgrow their prediction are preempted.
    """

    name = "fcfs"

    def __init__(self, *, predictive: bool = False, quantile: float = 0.9) -> None:
        check_quantile(quantile)
        self.predictive = predictive
        self.quantile = quantile
        self._queue: list[tuple[tuple[float, ...], Request]] = []  # sorted by key
        self._keys: dict[int, tuple[float, ...]] = {}
        self._tiebreak = count()

    def order(self, request: Request) -> tuple[float, ...]:
        """The queue's sort key (the first sequence number breaks ties)."""
        return (request.arrival_time,)

    def add(self, request: Request) -> None:
        # Keyed once, the key kept while it runs: a preempted request goes back to its first place
        # (ahead of its equals that arrived with it, as vLLM puts it back at the queue's front).
        key = self._keys.setdefault(id(request), (*self.order(request), next(self._tiebreak)))
        bisect.insort(self._queue, (key, request), key=lambda e: e[0])

    def _unqueue(self, request: Request) -> bool:
        key = self._keys.get(id(request))
        if key is None:
            return False
        i = bisect.bisect_left(self._queue, key, key=lambda e: e[0])
        if i < len(self._queue) and self._queue[i][1] is request:
            del self._queue[i]
            return True
        return False

    def remove(self, request: Request) -> bool:
        if not self._unqueue(request):
            return False
        del self._keys[id(request)]
        return True

    def candidates(self, view: SchedulerView) -> Iterable[Request]:
        # A copy (admission mutates the queue), and no longer than could possibly be admitted.
        out = [e[1] for e in self._queue[:max(view.seq_slots, 0)]]
        return predictive_admission(out, view, self.quantile) if self.predictive else out

    def admits(self, request: Request, view: SchedulerView) -> bool:
        return not self.predictive or bool(predictive_admission([request], view, self.quantile))

    def admitted(self, request: Request) -> None:
        self._unqueue(request)

    def finished(self, request: Request) -> None:
        self._keys.pop(id(request), None)

    def __len__(self) -> int:
        return len(self._queue)


class PriorityPolicy(FCFSPolicy):
    """vLLM's `priority` scheduling: the lowest `Request.priority` first, arrival order within a
    priority. When the cache runs out, the running request of the highest priority value (the
    newest among equals) is preempted; a waiting request that does not fit is let in by
    preempting running requests of a strictly higher priority value (the scheduler's priority
    preemption). Options as for `fcfs`."""

    name = "priority"
    supports_priority = True

    def order(self, request: Request) -> tuple[float, ...]:
        return (request.priority, request.arrival_time)

    def victim(self, running: list[Request], now: float) -> Request:
        return max(reversed(running), key=lambda r: (r.priority, r.arrival_time))

    def most_urgent(self, now: float) -> Request | None:
        return self._queue[0][1] if self._queue else None


SchedulingPolicy.registry["continuous"] = FCFSPolicy  # the name for continuous FCFS


def _option_names(cls: type[SchedulingPolicy]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def make_policy(name: str, options: dict[str, Any] | None = None) -> SchedulingPolicy:
    """The policy registered under `name` (e.g. "fcfs", "sequence"), built with `options`."""
    cls = SchedulingPolicy.registry.get(name)
    if cls is None:
        raise ValueError(f"policy {name!r} is unknown; available: {sorted(SchedulingPolicy.registry)}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"policy_options must be a dict of option -> value, got {type(options).__name__}")
    options = dict(options or {})
    unknown = set(options) - set(_option_names(cls))
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {sorted(unknown)}; its options are "
                         f"{_option_names(cls) or 'none'}")
    return cls(**options)

"""`AsyncEngine`: the engine behind the HTTP server.

`LLMEngine` is single-threaded and steps synchronously. The server's asyncio event loop must stay
responsive while a step runs (tens of milliseconds on the CPU), so one dedicated thread owns the
`LLMEngine` and does everything with it: adding requests, aborting them, stepping. Coroutines on
the event loop talk to that thread through a command inbox and get results back on asyncio
futures and per-request queues:

    engine = AsyncEngine(llm_engine, max_waiting=64)
    engine.start()
    async for delta in engine.generate(prompt_ids, params):   # one `StreamDelta` per step
        ...
    await engine.shutdown(grace_s=30)

Back-pressure: a request is refused with `QueueFull` when `max_waiting` requests already wait to
be scheduled; once accepted, it is either completed or aborted (by the caller, or by `shutdown`
after its grace period), never dropped. Per-step observations go to an optional `EngineObserver`
(the server's Prometheus metrics) from the engine thread.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from lengthwise.beam_search import BeamSearchParams
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.lora.request import LoRARequest
from lengthwise.pooling import PoolingParams
from lengthwise.sampling_params import SamplingParams
from lengthwise.sequence import Request


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the request was not accepted (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has stopped: no new requests (HTTP 503)."""


@dataclass
class SampleDelta:
    """What one sample gained in one step."""

    index: int
    text: str                      # new text (held back while a stop string may still match)
    token_ids: list[int]
    logprobs: list[Any] | None     # new `TokenLogprobs`, when asked for
    finish_reason: str | None      # "stop", "length" or "abort" once the sample has ended
    prev_token_id: int = 0         # the token before `token_ids` (to render a token's text in context)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's field)


@dataclass
class StreamDelta:
    """One step's news for one request; `finished` on the last one, which carries the totals."""

    request_id: str
    samples: list[SampleDelta]
    finished: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    predicted_length: float | None = None
    num_cached_tokens: int = 0
    # With `SamplingParams.prompt_logprobs`: the prompt's `TokenLogprobs` (None first), once, on the
    # first delta after the prompt is computed (or on the last, if it ended before).
    prompt_logprobs: list[Any] | None = None
    # An embedding request's vector (float32, on the CPU), on its one, final delta.
    embedding: Any = None


class EngineObserver(Protocol):
    """Told about the engine from its thread (the server's metrics implement this)."""

    def on_step(self, engine: LLMEngine, seconds: float) -> None: ...

    def on_finish(self, request: Request) -> None: ...


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent_text: list[int] = field(default_factory=list)    # per sample: characters sent so far
    sent_tokens: list[int] = field(default_factory=list)  # per sample: tokens sent so far
    sent_prompt_logprobs: bool = False


class RequestStream:
    """An accepted request's `StreamDelta`s, in order, the last one `finished`. `close()` (or
    leaving an `async for` over it early, e.g. a client that went away) aborts the request if it
    has not finished; its KV blocks are freed at once."""

    def __init__(self, engine: AsyncEngine, request_id: str, deltas: asyncio.Queue) -> None:
        self.engine, self.request_id, self._deltas = engine, request_id, deltas
        self.finished = False

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamDelta]:
        try:
            while not self.finished:
                yield await self.next()
        finally:
            self.close()

    async def next(self) -> StreamDelta:
        """The next delta (waits for the next step that touches the request)."""
        item = await self._deltas.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Owns an `LLMEngine` on a thread of its own; see the module docstring."""

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None,
                 observer: EngineObserver | None = None, idle_wait_s: float = 0.05) -> None:
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                        or max_waiting < 1):
            raise ValueError(f"max_waiting must be a positive integer or None, got {max_waiting!r}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what killed the engine thread, if anything

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lengthwise-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (`EngineStopped`); accepted ones carry on."""
        self._accepting = False

    async def drain(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s` seconds, then abort
        the rest: their streams end with finish_reason "abort", so every response completes."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if self._streams and self.alive:
            await asyncio.wrap_future(self._call(self._abort_all))

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """`drain` for up to `grace_s` seconds, then stop the engine thread."""
        await self.drain(grace_s)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    # -- requests ----------------------------------------------------------------------------------

    async def add(self, prompt: str | Sequence[int], params: SamplingParams | BeamSearchParams | PoolingParams,
                  request_id: str | None = None, messages: list[dict[str, Any]] | None = None,
                  lora_request: LoRARequest | None = None, priority: int = 0) -> RequestStream:
        """Add a request (with `lora_request`, generated with that adapter; `priority` as in
        `LLMEngine.add_request`; `params` a `BeamSearchParams`: a beam search, whose one delta
        carries its answers when it ends; a `PoolingParams`: an embedding, whose one delta carries
        the vector); returns its
        `RequestStream` once the engine has accepted it. Raises `ValueError` (a bad request),
        `QueueFull` or `EngineStopped` if it is not accepted."""
        rid = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        await asyncio.wrap_future(self._call(lambda: self._add(rid, prompt, params, stream, messages, lora_request,
                                                                     priority)))
        return RequestStream(self, rid, stream.queue)

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str | None = None,
                       lora_request: LoRARequest | None = None, priority: int = 0) -> AsyncIterator[StreamDelta]:
        """`add`, then yield the request's deltas until it finishes (closing early aborts it)."""
        stream = await self.add(prompt, params, request_id, lora_request=lora_request, priority=priority)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request if it is still running (from any thread; returns at once)."""
        if self.alive:
            self._call(lambda: self._abort(request_id))

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Load and pin `lora_request`'s adapter (it stays loaded until `remove_lora`: a served
        adapter is never re-read on the engine thread): read and checked on a worker thread (the
        engine keeps stepping), then added on the engine thread. Raises ValueError naming what is
        wrong."""
        registry = self.engine.loras
        if registry is None:
            raise ValueError("LoRA adapters need an engine with enable_lora=True")
        adapter = await asyncio.to_thread(registry.read, lora_request)
        await asyncio.wrap_future(self._call(lambda: self.engine.add_lora(lora_request, adapter)
                                             and self.engine.pin_lora(lora_request.lora_int_id)))

    async def remove_lora(self, lora_id: int) -> bool:
        """Drop adapter `lora_id` (requests using it finish with it first); False if not loaded."""
        return await asyncio.wrap_future(self._call(lambda: self.engine.remove_lora(lora_id)))

    # -- the engine thread -------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread; its result (or exception) on the returned future."""
        fut: Future = Future()
        if not self.alive:
            fut.set_exception(EngineStopped("the engine is not running" + (
                f" ({type(self.error).__name__}: {self.error})" if self.error else "")))
            return fut

        def task() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                fut.set_exception(e)

        self._inbox.put(task)
        self._wake.set()
        return fut

    def _add(self, rid: str, prompt: str | Sequence[int], params: SamplingParams | BeamSearchParams | PoolingParams,
             stream: _Stream,
             messages: list[dict[str, Any]] | None = None, lora_request: LoRARequest | None = None,
             priority: int = 0) -> None:
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        waiting = len(self.engine.length.pending) + self.engine.scheduler.num_waiting
        if self.max_waiting is not None and waiting >= self.max_waiting:
            raise QueueFull(f"{waiting} requests are waiting (the bound is {self.max_waiting})")
        request = self.engine.add_request(prompt if isinstance(prompt, str) else list(prompt), params,
                                          request_id=rid, messages=messages, lora_request=lora_request,
                                          priority=priority)
        stream.sent_text = [0] * request.params.n
        stream.sent_tokens = [0] * request.params.n
        self._streams[rid] = stream

    def _abort(self, rid: str) -> None:
        if rid in self._streams and self.engine.abort_request(rid):
            self._emit(self.engine.requests[rid])
            if self.observer is not None:  # its blocks are free now: let the gauges say so
                self.observer.on_step(self.engine, 0.0)

    def _abort_all(self) -> None:
        for rid in list(self._streams):
            self._abort(rid)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        self._inbox.get_nowait()()
                    except queue.Empty:
                        break
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                touched = self.engine.step()
                dt = time.perf_counter() - t0
                for request in touched:
                    self._emit(request)
                if self.observer is not None:
                    self.observer.on_step(self.engine, dt)
        except BaseException as e:  # noqa: BLE001 (a bug or an OOM: every waiter must hear of it)
            self.error = e
            for rid, stream in list(self._streams.items()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, RuntimeError(
                    f"the engine stopped: {type(e).__name__}: {e}"))
                self._streams.pop(rid, None)
        finally:
            while True:  # commands that arrived after the loop ended: fail them, never leave them hanging
                try:
                    self._inbox.get_nowait()()
                except queue.Empty:
                    break

    def _emit(self, request: Request) -> None:
        """Send `request`'s news since the last emission to its stream; forget it when finished."""
        rid = request.request_id
        stream = self._streams.get(rid)
        if stream is None:
            return
        samples = []
        for seq in request.seqs:
            i = seq.index
            text = seq.state.get("text", "")
            matcher = seq.state.get("stop")
            if matcher is not None and not seq.finished:  # it may yet be cut by a stop string
                text = text[:len(text) - matcher.hold_back(text)]
            lps = seq.state.get("logprobs")
            sent = stream.sent_tokens[i]
            prev = seq.output_ids[sent - 1] if sent else request.prompt_ids[-1]
            samples.append(SampleDelta(i, text[stream.sent_text[i]:], seq.output_ids[sent:],
                                       None if lps is None else lps[sent:], seq.finish_reason, prev,
                                       seq.state.get("stop_reason")))
            stream.sent_text[i], stream.sent_tokens[i] = len(text), len(seq.output_ids)
        delta = StreamDelta(rid, samples, request.finished, len(request.prompt_ids),
                            sum(len(s.output_ids) for s in request.seqs), request.predicted_length,
                            request.num_cached_tokens)
        if request.prompt_logprobs is not None and not stream.sent_prompt_logprobs and (
                request.prompt_done or request.finished):
            delta.prompt_logprobs = list(request.prompt_logprobs)
            stream.sent_prompt_logprobs = True
        if request.finished:
            delta.embedding = request.seqs[0].state.get("embedding") if request.pooling is not None else None
            self._streams.pop(rid)
            self.engine.forget(rid)
            if self.observer is not None:
                self.observer.on_finish(request)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

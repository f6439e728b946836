"""Prometheus metrics of a serving engine, vLLM's names with a `lengthwise:` prefix.

Gauges are set after every step, on the engine thread; counters advance by what the step did;
histograms are observed when a request finishes. Each server has its own `CollectorRegistry`, so
several servers (or tests) in one process do not share counts.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lengthwise.sequence import Request

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_ERROR_BUCKETS = (-512, -256, -128, -64, -32, -16, -8, 0, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The server's metrics; `on_step`/`on_finish` make it an `EngineObserver`."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self._model_name = model_name

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"lengthwise:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(f"lengthwise:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(f"lengthwise:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.running = gauge("num_requests_running", "Requests holding KV blocks and taking part in steps")
        self.kv_used = gauge("kv_cache_blocks_used", "KV cache blocks in use")
        self.kv_free = gauge("kv_cache_blocks_free", "KV cache blocks free (cached prefix blocks count as free)")
        self.preemptions = counter("num_preemptions", "Requests preempted for KV space")
        self.fcr_failures = counter("num_fcr_failures", "Rows collected at their batch's cap (FCR)")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", _LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "(finish - first token) / (tokens - 1), per request",
                              _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish", _LATENCY_BUCKETS)
        self.length_error = histogram("predicted_minus_actual_length_tokens",
                                      "Predicted response length minus the longest sample's real length",
                                      _ERROR_BUCKETS)
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative decoding: tokens drafted and verified")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                       "Speculative decoding: drafted tokens kept (the model sampled the same)")
        self._seen_drafts = self._seen_accepted = 0
        self._seen_preemptions = 0
        self._seen_collected = 0
        self._seen_tokens = 0
        self.lora_info: Gauge | None = None  # describe_loras
        self._lora_labels: dict[str, str] = {}

    def describe_cache(self, engine: Any) -> None:
        """`lengthwise:cache_config_info` (vLLM's `cache_config_info`): a gauge at 1 whose labels say
        how the KV cache is held: its dtype (the effective one: `kv_cache_dtype="fp8"` shows as
        float8_e4m3fn), block size, blocks and the tokens they hold."""
        labels = {"model_name": self._model_name, "cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
                  "block_size": str(engine.config.block_size), "num_blocks": str(engine.num_blocks),
                  "num_tokens": str(engine.num_blocks * engine.config.block_size)}
        Gauge("lengthwise:cache_config_info", "How the KV cache is held (the labels); always 1", list(labels),
              registry=self.registry).labels(**labels).set(1)

    def describe_loras(self, max_loras: int) -> None:
        """Add `lengthwise:lora_requests_info` (vLLM's `lora_requests_info`): labels `max_lora` and
        the names of the adapters among the running and the waiting requests (comma-separated),
        valued the time they were last seen; one label set, the current one."""
        self.lora_info = Gauge("lengthwise:lora_requests_info",
                               "LoRA adapters of the running and the waiting requests (the labels); the value "
                               "is when they were last seen",
                               ["model_name", "max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                               registry=self.registry)
        self._lora_labels = {"model_name": self._model_name, "max_lora": str(max_loras),
                             "waiting_lora_adapters": "", "running_lora_adapters": ""}
        self.lora_info.labels(**self._lora_labels).set_to_current_time()

    def _observe_loras(self, engine: Any) -> None:
        running = {id(r) for r in engine.scheduler.running}
        names: dict[str, set[str]] = {"running_lora_adapters": set(), "waiting_lora_adapters": set()}
        for r in engine.requests.values():
            if r.lora_request is not None and not r.finished:
                names["running_lora_adapters" if id(r) in running else "waiting_lora_adapters"].add(
                    r.lora_request.lora_name)
        labels = self._lora_labels | {k: ",".join(sorted(v)) for k, v in names.items()}
        self.lora_info.labels(**labels).set_to_current_time()
        if labels != self._lora_labels:  # one label set at a time, the state now (the new one set
            self.lora_info.remove(*self._lora_labels.values())  # first: a scrape never finds none)
            self._lora_labels = labels

    def on_step(self, engine: Any, seconds: float) -> None:
        s = engine.scheduler
        self.waiting.set(s.num_waiting + len(engine.length.pending))
        self.running.set(len(s.running))
        free = s.kv.num_free_blocks
        self.kv_free.set(free)
        self.kv_used.set(engine.num_blocks - free)
        self.preemptions.inc(s.num_preemptions - self._seen_preemptions)
        self._seen_preemptions = s.num_preemptions
        self.fcr_failures.inc(s.num_collected - self._seen_collected)
        self._seen_collected = s.num_collected
        st = engine.stats
        self.draft_tokens.inc(st.draft_tokens - self._seen_drafts)
        self.accepted_tokens.inc(st.accepted_tokens - self._seen_accepted)
        self._seen_drafts, self._seen_accepted = st.draft_tokens, st.accepted_tokens
        if self.lora_info is not None:
            self._observe_loras(engine)

    def on_finish(self, request: Request) -> None:
        n_out = [len(s.output_ids) for s in request.seqs]
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.generation_tokens.inc(sum(n_out))
        end = request.finish_time
        if request.first_token_time is not None and request.pooling is None:  # (an embedding has no token)
            self.ttft.observe(request.first_token_time - request.arrival_time)
            if end is not None and max(n_out) > 1:
                self.tpot.observe((end - request.first_token_time) / (max(n_out) - 1))
        if end is not None:
            self.e2e.observe(end - request.arrival_time)
        if request.predicted_length is not None and any(s.finish_reason != "abort" for s in request.seqs):
            self.length_error.observe(request.predicted_length - max(n_out))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The engine's side of length perception.

- Requests are predicted in one batch per step *before* they reach the scheduler, so every
  policy sees `Request.predicted_length` (and `Request.prediction`, with its distribution) from
  the moment a request can be admitted. The time this takes is spent inside `step()`, so it
  counts in throughput and in each request's latency, as the first paper counts it.
- The `probe` predicts at the end of prefill from the final hidden state of the last prompt
  token, which the step computed anyway.
- With `record_lengths=FILE`, every finished request appends `{id, prompt, features, length,
  lengths, predicted, lora}` (and a chat request's `messages`) to FILE: the training data for
  `lengthwise predictor train --kind probe` or `--kind pia` (`lora`: the adapter's name, or null
  for the base model; `messages`: so PiA asks its training questions as a chat request is asked).
- A request with a LoRA adapter is predicted for the adapted model: the `self` predictor asks
  through the adapter (a PiA predictor always asks through its own length adapter), and the probe
  reads the adapted model's hidden states.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lengthwise.predict import LengthQuery, make_predictor
from lengthwise.predict.base import PredictorStats
from lengthwise.sequence import Request

if TYPE_CHECKING:
    from lengthwise.engine.llm_engine import LLMEngine


class LengthPerception:
    def __init__(self, engine: LLMEngine, spec: Any, record_path: str | Path | None) -> None:
        self.engine = engine
        self.predictor = None if spec is None else make_predictor(
            spec, engine, allow_benchmark_only=engine.config.allow_benchmark_predictors)
        self.stats = PredictorStats()
        self.pending: list[Request] = []          # predicted before scheduling, at the next step
        self.true_lengths: dict[str, float] = {}  # the oracle's knowledge, per request
        self.record_path = None if record_path is None else Path(record_path)
        self.features: dict[str, list[float]] = {}  # request id -> hidden state, kept for recording

    @property
    def predicts_before_scheduling(self) -> bool:
        return self.predictor is not None and not self.predictor.needs_features

    @property
    def wants_hidden(self) -> bool:
        return self.record_path is not None or (self.predictor is not None and self.predictor.needs_features)

    def query(self, request: Request, features: list[float] | None = None) -> LengthQuery:
        text = request.prompt
        if text is None and self.engine.tokenizer is not None:
            text = self.engine.tokenizer.decode(request.prompt_ids, skip_special_tokens=True)
        return LengthQuery(prompt=text or "", prompt_ids=request.prompt_ids, features=features,
                           true_length=self.true_lengths.get(request.request_id), request_id=request.request_id,
                           messages=request.messages, lora_request=request.lora_request)

    def predict_pending(self) -> list[Request]:
        """Predict every queued request in one batch; returns them, ready for the scheduler."""
        batch, self.pending = self.pending, []
        if batch:
            self._predict(batch, [self.query(r) for r in batch])
        return batch

    def on_prefill_done(self, requests: list[Request], hidden: torch.Tensor) -> None:
        """`hidden[i]` is the final hidden state at the last prompt token of `requests[i]`."""
        feats = hidden.float().cpu().tolist()
        if self.record_path is not None:
            for r, f in zip(requests, feats, strict=True):
                self.features[r.request_id] = f
        if self.predictor is not None and self.predictor.needs_features:
            todo = [(r, f) for r, f in zip(requests, feats, strict=True) if r.prediction is None]
            if todo:
                self._predict([r for r, _ in todo], [self.query(r, f) for r, f in todo])

    def _predict(self, requests: list[Request], queries: list[LengthQuery]) -> None:
        start = time.perf_counter()
        for r, p in zip(requests, self.predictor.predict(queries), strict=True):
            r.prediction, r.predicted_length = p, p.length
        self.stats.seconds += time.perf_counter() - start
        self.stats.num_predicted += len(requests)
        self.stats.num_fallbacks = getattr(self.predictor, "num_fallbacks", 0)

    def discard(self, request_id: str) -> bool:
        """Forget a request (aborted or finished); True if it was still waiting for its prediction."""
        self.true_lengths.pop(request_id, None)
        self.features.pop(request_id, None)
        for i, r in enumerate(self.pending):
            if r.request_id == request_id:
                del self.pending[i]
                return True
        return False

    def on_finish(self, request: Request) -> None:
        features = self.features.pop(request.request_id, None)
        if self.record_path is not None and features is not None:
            lengths = [len(s.output_ids) for s in request.seqs]
            record = {"id": request.request_id, "prompt": self.query(request).prompt, "features": features,
                      "length": max(lengths), "lengths": {f"s{i}": n for i, n in enumerate(lengths)},
                      "predicted": request.predicted_length,
                      # the features are the adapted model's hidden states: a probe per adapter
                      # trains on its own records
                      "lora": None if request.lora_request is None else request.lora_request.lora_name}
            if request.messages is not None:
                record["messages"] = request.messages
            with self.record_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")
        self.true_lengths.pop(request.request_id, None)

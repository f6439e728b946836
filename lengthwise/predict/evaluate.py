"""Evaluate a predictor on a length dataset: accuracy metrics and prediction latency."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from lengthwise.predict.base import LengthPrediction, LengthPredictor
from lengthwise.predict.data import LengthDataset
from lengthwise.predict.metrics import length_metrics


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: list[LengthPrediction]


def predict_dataset(predictor: LengthPredictor, data: LengthDataset, batch_size: int = 64,
                    progress: bool = True) -> list[LengthPrediction]:
    out: list[LengthPrediction] = []
    queries = data.queries
    for s in tqdm(range(0, len(queries), batch_size), desc=f"predicting ({predictor.kind})", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        out.extend(predictor.predict(queries[s:s + batch_size]))
    return out


def latency_ms(predictor: LengthPredictor, data: LengthDataset, batch_size: int, max_requests: int) -> float:
    """Mean wall-clock milliseconds per request when predicting in batches of `batch_size`
    (after one warm-up batch), over at most `max_requests` requests."""
    queries = data.queries
    predictor.predict(queries[:batch_size])  # warm-up: lazy init, allocator, kernel caches
    n = min(len(queries), max(batch_size, max_requests))
    start = time.perf_counter()
    for s in range(0, n, batch_size):
        predictor.predict(queries[s:s + batch_size])
    return (time.perf_counter() - start) * 1000 / n


def evaluate(predictor: LengthPredictor, data: LengthDataset, measure_latency: bool = True,
             progress: bool = True) -> Evaluation:
    """Metrics of `predictor` on `data` (see `length_metrics`), plus `latency_ms_b1` and `latency_ms_b64`."""
    preds = predict_dataset(predictor, data, progress=progress)
    metrics = length_metrics([p.length for p in preds], data.lengths)
    metrics["mean_predicted"] = float(np.mean([p.length for p in preds]))
    if measure_latency:
        metrics["latency_ms_b1"] = latency_ms(predictor, data, 1, 100)
        metrics["latency_ms_b64"] = latency_ms(predictor, data, 64, 640)
    fallbacks = getattr(predictor, "num_fallbacks", None)
    if fallbacks is not None:
        metrics["fallback_rate"] = predictor.fallback_rate  # type: ignore[attr-defined]
    return Evaluation(metrics, preds)

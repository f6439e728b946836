"""The two reference predictors: `oracle` (the truth, a ceiling) and `constant` (a floor to beat)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lengthwise.predict.base import LengthPrediction, LengthPredictor, LengthQuery
from lengthwise.predict.data import LengthDataset
from lengthwise.predict.heads import default_edges


class OraclePredictor(LengthPredictor):
    """Returns each query's `true_length`. For benchmarks only: the server refuses it."""

    kind = "oracle"
    benchmark_only = True

    def predict(self, queries: Sequence[LengthQuery]) -> list[LengthPrediction]:
        out = []
        for i, q in enumerate(queries):
            if q.true_length is None:
                raise ValueError(f"the oracle predictor needs true_length on every query; query {i} has none")
            out.append(LengthPrediction(float(q.true_length), source=self.kind))
        return out


class ConstantPredictor(LengthPredictor):
    """Predicts the training median for everyone, with the training histogram as its distribution."""

    kind = "constant"

    def __init__(self, value: float, probs: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value = float(value)
        self.probs = tuple(float(p) for p in probs) if probs is not None else None

    @classmethod
    def fit(cls, data: LengthDataset) -> ConstantPredictor:
        lengths = np.asarray(data.lengths)
        edges = default_edges(lengths)
        hist, _ = np.histogram(np.minimum(lengths, edges[-1] - 1e-6), bins=edges)
        return cls(float(np.median(lengths)), (hist / hist.sum()).tolist(), edges=edges, target=data.target,
                   data_hash=data.data_hash)

    def predict(self, queries: Sequence[LengthQuery]) -> list[LengthPrediction]:
        p = LengthPrediction(self.value, self.edges, self.probs, self.kind)
        return [p] * len(queries)

    def state_config(self) -> dict[str, Any]:
        return {"value": self.value, "probs": list(self.probs) if self.probs else None}

    @classmethod
    def from_saved(cls, directory: Path, manifest: dict[str, Any]) -> ConstantPredictor:
        cfg = manifest.get("config") or {}
        if "value" not in cfg:
            raise ValueError(f"{directory}: constant predictor manifest has no config.value")
        return cls(cfg["value"], cfg.get("probs"), edges=manifest.get("bins"), target=manifest.get("target", ""),
                   data_hash=manifest.get("data_hash", ""), metrics=manifest.get("metrics"))

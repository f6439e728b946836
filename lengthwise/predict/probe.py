"""`probe`: a small head on the served model's own last-layer hidden state at the end of prefill.

Prefill computes that state anyway (it is what the first token is sampled from), so the probe
costs one tiny MLP per request. Its prediction arrives when the prompt is done, not before
admission: it orders and caps decoding (sequence scheduling, preemption choice), not the first
admission. Its training data is what the deployment really generates: run the engine with
`record_lengths=FILE` and fit with `lengthwise predictor train --kind probe --data FILE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lengthwise.predict.base import LengthPrediction, LengthQuery
from lengthwise.predict.data import LengthDataset
from lengthwise.predict.head_predictor import HeadPredictor, stack_features
from lengthwise.predict.heads import LengthHead, default_edges
from lengthwise.predict.training import TrainConfig, fit_head


class ProbePredictor(HeadPredictor):
    kind = "probe"
    needs_features = True

    def __init__(self, head: LengthHead, readout: str, **kwargs: Any) -> None:
        super().__init__(head, readout, **kwargs)
        self.dim = head.body[0].in_features

    def predict(self, queries: Sequence[LengthQuery]) -> list[LengthPrediction]:
        if not queries:
            return []
        missing = [i for i, q in enumerate(queries) if q.features is None]
        if missing:
            raise ValueError(f"the probe predictor needs the model's hidden state (features) on every query; "
                             f"queries {missing[:5]} have none")
        return self.predict_features(stack_features([q.features for q in queries], self.dim))

    def state_config(self) -> dict[str, Any]:
        return self.head_config()

    def save_state(self, directory: Path) -> None:
        self.save_head(directory)

    @classmethod
    def from_saved(cls, directory: Path, manifest: dict[str, Any]) -> ProbePredictor:
        head, readout = cls.load_head(directory, manifest)
        return cls(head, readout, **cls.common(manifest))


def train_probe(data: LengthDataset, cfg: TrainConfig | None = None) -> ProbePredictor:
    """Fit a probe head on a dataset with `features` (as the engine records them)."""
    cfg = cfg or TrainConfig(epochs=30, batch_size=64)
    dims = {len(r.query.features or ()) for r in data.records}
    if len(dims) != 1 or 0 in dims:
        raise ValueError(f"{data.path}: every record needs 'features' of one common size, found sizes {sorted(dims)}")
    feats = np.asarray([r.query.features for r in data.records], dtype=np.float32)
    lengths = np.asarray(data.lengths, dtype=np.float32)
    edges = default_edges(lengths, width=max(1.0, float(np.ceil(lengths.max() / 20))))
    head, readout, maes = fit_head(feats, lengths, edges, cfg, desc="training probe head")
    return ProbePredictor(head, readout, edges=edges, target=data.target, data_hash=data.data_hash,
                          metrics={"heldout_mae": maes})

"""`HeadPredictor`: the shared half of `proxy` and `probe`: features -> trained `LengthHead` ->
predictions, and saving/loading that head (safetensors + its shape in the manifest)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lengthwise.predict.base import LengthPrediction, LengthPredictor, finite_length
from lengthwise.predict.heads import READOUTS, LengthHead, readout_all

HEAD_FILE = "head.safetensors"


class HeadPredictor(LengthPredictor):
    """A predictor whose last stage is a `LengthHead` read out with `readout`."""

    def __init__(self, head: LengthHead, readout: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if self.edges is None or len(self.edges) != head.num_bins + 1:
            raise ValueError("bins (edges) must have one more entry than the head has bins")
        self.head = head.eval()
        self.readout = readout
        self._edges_t = torch.tensor(self.edges, dtype=torch.float32)

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor) -> list[LengthPrediction]:
        """Predictions from a batch of feature vectors `[B, dim]`."""
        points, probs = readout_all(self.head(features.float()), self._edges_t)
        point = points[self.readout].tolist()
        return [LengthPrediction(finite_length(v), self.edges, tuple(p), self.kind)
                for v, p in zip(point, probs.tolist(), strict=True)]

    def head_config(self) -> dict[str, Any]:
        first = self.head.body[0]
        return {"readout": self.readout, "head": {"dim": first.in_features, "hidden": first.out_features,
                                                  "num_bins": self.head.num_bins}}

    def save_head(self, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(directory / HEAD_FILE))

    @staticmethod
    def load_head(directory: Path, manifest: dict[str, Any]) -> tuple[LengthHead, str]:
        cfg = manifest.get("config") or {}
        shape = cfg.get("head")
        if not isinstance(shape, dict) or not (directory / HEAD_FILE).is_file():
            raise ValueError(f"{directory}: predictor has no head ({HEAD_FILE} and config.head are needed)")
        head = LengthHead(int(shape["dim"]), int(shape["num_bins"]), int(shape["hidden"]))
        head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        return head, str(cfg.get("readout", "bins"))

    @staticmethod
    def common(manifest: dict[str, Any]) -> dict[str, Any]:
        return {"edges": manifest.get("bins"), "target": manifest.get("target", ""),
                "data_hash": manifest.get("data_hash", ""), "metrics": manifest.get("metrics")}


def stack_features(rows: Sequence[Sequence[float]], dim: int | None = None) -> torch.Tensor:
    x = torch.tensor([list(r) for r in rows], dtype=torch.float32)
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"features have {x.shape[1]} dimensions but the head expects {dim}")
    return x

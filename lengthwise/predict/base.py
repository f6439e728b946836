"""The length-predictor protocol: `LengthPredictor.predict(queries) -> [LengthPrediction]`.

A prediction is a point estimate (the median of the predicted distribution: the target is a
maximum over samples, heavily skewed, and the median beats the mean in absolute error) plus a
distribution over length bins, so schedulers can use the uncertainty (quantiles for a safety
margin, bucket probabilities for failure rates).

A predictor lives in a directory: `manifest.json` (kind, version, bins, target, training-data
hash, metrics, kind-specific config) next to whatever state the kind needs (head weights, a
fine-tuned encoder). `load_predictor(dir)` reads the manifest and dispatches on `kind`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from lengthwise.lora.request import LoRARequest

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LengthQuery:
    """What a predictor may look at for one request.

    `prompt` is the text the model sees (the Alpaca template, a chat rendering...). When the
    caller knows the bare `instruction` and `input` (dataset records do), text predictors embed
    those instead of the fixed template. `features` is the served model's hidden state at the end
    of prefill (the probe's input); `true_length` is known only to benchmarks (the oracle).
    `messages` is the conversation a chat template rendered into `prompt` (chat requests only).
    `lora_request` is the LoRA adapter the request runs with: the `self` predictor asks the model
    through it, since the adapted model is the one that will write the answer.
    """

    prompt: str = ""
    instruction: str | None = None
    input: str | None = None
    prompt_ids: Sequence[int] | None = None
    features: Sequence[float] | None = None
    true_length: float | None = None
    messages: Sequence[dict[str, Any]] | None = None  # the conversation, for chat requests
    request_id: str | None = None
    lora_request: LoRARequest | None = None


@dataclass(frozen=True)
class LengthPrediction:
    """A response-length estimate in tokens: `length` (point estimate) and, where the predictor
    has one, a distribution `probs` over the bins `[edges[i], edges[i+1])`."""

    length: float
    edges: tuple[float, ...] | None = None
    probs: tuple[float, ...] | None = None
    source: str = ""  # the kind that made it ("self" may fall back to another kind)

    def quantile(self, q: float) -> float:
        """The q-quantile of the predicted length, linear within a bin; `length` without a distribution."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if self.probs is None or self.edges is None:
            return self.length
        return distribution_quantile(self.edges, self.probs, q)

    def prob_at_most(self, length: float) -> float:
        """P(response <= length) under the bin distribution (a step function without one)."""
        if self.probs is None or self.edges is None:
            return float(self.length <= length)
        total = 0.0
        for lo, hi, p in zip(self.edges, self.edges[1:], self.probs, strict=False):
            if length >= hi:
                total += p
            elif length > lo:
                total += p * (length - lo) / (hi - lo)
        return min(1.0, total)


def distribution_quantile(edges: Sequence[float], probs: Sequence[float], q: float) -> float:
    """Quantile of a piecewise-uniform distribution over bins `edges` with masses `probs`."""
    acc = 0.0
    for i, p in enumerate(probs):
        if p > 0 and acc + p >= q:
            return float(edges[i] + (q - acc) / p * (edges[i + 1] - edges[i]))
        acc += p
    return float(edges[-1])


class LengthPredictor(ABC):
    """Estimates response lengths before (or, for `probe`, at the end of) prefill.

    Subclasses set `kind` (which registers them for `load_predictor`), implement `predict`, and
    keep what `save` must write in `state_config()` / `save_state()` / `from_saved()`.
    """

    kind: ClassVar[str] = ""
    version: ClassVar[int] = FORMAT_VERSION
    needs_features: ClassVar[bool] = False   # True: predict() needs LengthQuery.features (the probe)
    benchmark_only: ClassVar[bool] = False   # True: refused where real traffic is served (the oracle)
    _registry: ClassVar[dict[str, type[LengthPredictor]]] = {}

    def __init__(self, edges: Sequence[float] | None = None, target: str = "", data_hash: str = "",
                 metrics: dict[str, Any] | None = None) -> None:
        self.edges = tuple(float(e) for e in edges) if edges is not None else None
        self.target = target
        self.data_hash = data_hash
        self.metrics: dict[str, Any] = dict(metrics or {})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            LengthPredictor._registry[cls.kind] = cls

    @abstractmethod
    def predict(self, queries: Sequence[LengthQuery]) -> list[LengthPrediction]:
        """One prediction per query, in order."""

    # -- persistence ----------------------------------------------------------------------------

    def state_config(self) -> dict[str, Any]:
        """Kind-specific settings written into the manifest's `config`."""
        return {}

    def save_state(self, directory: Path) -> None:  # noqa: B027 (optional hook: most kinds have no files)
        """Write kind-specific files (weights) into `directory`."""

    @classmethod
    def from_saved(cls, directory: Path, manifest: dict[str, Any]) -> LengthPredictor:
        """Rebuild from `directory` and its parsed manifest."""
        return cls(manifest.get("bins"), manifest.get("target", ""), manifest.get("data_hash", ""),
                   manifest.get("metrics"))

    def manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "bins": list(self.edges) if self.edges else None,
                "target": self.target, "data_hash": self.data_hash, "metrics": self.metrics,
                "config": self.state_config()}

    def save(self, directory: str | Path) -> Path:
        """Write the predictor to `directory` (created if needed); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_state(directory)
        (directory / MANIFEST).write_text(json.dumps(self.manifest(), indent=2) + "\n")
        return directory


@dataclass
class PredictorStats:
    """Running totals an engine keeps about its predictor: requests predicted, seconds spent in
    `predict`, and (for `self`) answers that fell back."""

    num_predicted: int = 0
    seconds: float = 0.0
    num_fallbacks: int = 0


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """A predictor directory's parsed manifest; None if `directory` holds none."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def load_predictor(directory: str | Path, allow_benchmark_only: bool = True) -> LengthPredictor:
    """Load the predictor saved in `directory` (any kind). `allow_benchmark_only=False` (the server)
    refuses kinds such as `oracle` that only make sense in benchmarks."""
    directory = Path(directory)
    path = directory / MANIFEST
    manifest = read_manifest(directory)
    if manifest is None:
        raise ValueError(f"length predictor directory {directory} has no {MANIFEST}")
    kind = manifest.get("kind")
    cls = LengthPredictor._registry.get(kind)
    if cls is None:
        raise ValueError(f"{path}: unknown predictor kind {kind!r}; known: {sorted(LengthPredictor._registry)}")
    if manifest.get("version", 0) > cls.version:
        raise ValueError(f"{path}: format version {manifest['version']} is newer than this lengthwise "
                         f"supports ({cls.version})")
    check_allowed(cls, allow_benchmark_only)
    return cls.from_saved(directory, manifest)


def check_allowed(cls: type[LengthPredictor], allow_benchmark_only: bool) -> None:
    if cls.benchmark_only and not allow_benchmark_only:
        raise ValueError(f"length predictor {cls.kind!r} knows the true lengths and is for benchmarks only; "
                         f"it cannot serve real requests")


def registered_kinds() -> list[str]:
    return sorted(LengthPredictor._registry)


def finite_length(value: float) -> float:
    """A length estimate clamped to >= 1 token, rejecting NaN (a broken head must not reach a policy)."""
    if not math.isfinite(value):
        raise ValueError(f"predicted length is not finite: {value}")
    return max(1.0, float(value))

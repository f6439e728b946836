"""Length perception: predictors that estimate each request's response length before decoding.

    from lengthwise.predict import load_length_data, train_proxy, load_predictor
    data = load_length_data("train.jsonl", target="L_max")
    train_proxy(data).save("predictors/proxy")
    p = load_predictor("predictors/proxy")
    p.predict([LengthQuery(prompt="Name five animals.")])[0].length

Kinds: `oracle` (truth; benchmarks only), `constant` (training median), `proxy` (a small text
encoder + head), `probe` (a head on the served model's hidden state at the end of prefill),
`self` (the served model asked for its own length), `pia` (`self` through a LoRA adapter trained
to answer it, as the first paper does: `train_pia`). See docs/predictors.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lengthwise.predict.base import (
    LengthPrediction,
    LengthPredictor,
    LengthQuery,
    check_allowed,
    load_predictor,
    registered_kinds,
)
from lengthwise.predict.data import LengthDataset, LengthRecord, load_length_data
from lengthwise.predict.metrics import kendall_tau, length_metrics
from lengthwise.predict.pia import PiAPredictor, is_pia_dir, train_pia
from lengthwise.predict.probe import ProbePredictor, train_probe
from lengthwise.predict.proxy import ProxyPredictor, train_proxy
from lengthwise.predict.self_predict import SelfPredictor
from lengthwise.predict.simple import ConstantPredictor, OraclePredictor
from lengthwise.predict.training import TrainConfig

if TYPE_CHECKING:
    from lengthwise.engine.llm_engine import LLMEngine

__all__ = [
    "ConstantPredictor", "LengthDataset", "LengthPrediction", "LengthPredictor", "LengthQuery", "LengthRecord",
    "OraclePredictor", "PiAPredictor", "ProbePredictor", "ProxyPredictor", "SelfPredictor", "TrainConfig",
    "is_pia_dir", "is_self_spec", "kendall_tau", "length_metrics", "load_length_data", "load_predictor",
    "make_predictor", "train_pia", "train_probe", "train_proxy",
]


def is_self_spec(spec: str | Path | LengthPredictor) -> bool:
    """Whether `spec` asks the served model, so needs an engine: the `self` predictor (`self`,
    `self-greedy`, either with `:DIR`) or a PiA predictor's directory."""
    return (isinstance(spec, str) and spec.partition(":")[0] in ("self", "self-greedy")) or is_pia_dir(spec)


def make_predictor(spec: str | Path | LengthPredictor, engine: LLMEngine | None = None,
                   allow_benchmark_only: bool = True) -> LengthPredictor:
    """A predictor from a spec: a saved predictor directory, `"oracle"`, `"self"`, or
    `"self:DIR"` (self with the predictor in DIR as the fallback for unparsable answers);
    `"self-greedy"` and `"self-greedy:DIR"` read the model's greedy answer instead of its
    answer distribution's median (see `SelfPredictor`). A PiA directory (`train_pia`) asks
    `engine`'s model through its adapter."""
    if isinstance(spec, LengthPredictor):
        check_allowed(type(spec), allow_benchmark_only)
        return spec
    text = str(spec)
    if text == "oracle":
        check_allowed(OraclePredictor, allow_benchmark_only)
        return OraclePredictor()
    if is_pia_dir(text):
        if engine is None:
            raise ValueError(f"length_predictor {text!r} is a PiA predictor: it asks the served model, so it "
                             f"needs an engine")
        return PiAPredictor(engine, text)
    if is_self_spec(text):
        if engine is None:
            raise ValueError(f"length_predictor {text!r} asks the served model, so it needs an engine")
        name, _, fallback_dir = text.partition(":")
        if fallback_dir and is_pia_dir(fallback_dir):
            raise ValueError(f"length_predictor {text!r}: {fallback_dir} is a PiA predictor, not a fallback; "
                             f"pass the directory itself")
        fallback = load_predictor(fallback_dir, allow_benchmark_only) if fallback_dir else None
        return SelfPredictor(engine, fallback, read="greedy" if name == "self-greedy" else "median")
    if text in registered_kinds():
        raise ValueError(f"length_predictor {text!r} must be trained first: `lengthwise predictor train --kind "
                         f"{text} ... --out DIR`, then pass DIR")
    if not Path(text).is_dir():
        raise ValueError(f"length_predictor {text!r} is neither a predictor directory nor one of 'oracle', "
                     "'self', 'self-greedy'")
    return load_predictor(text, allow_benchmark_only)

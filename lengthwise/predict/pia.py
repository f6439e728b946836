"""`pia`: Perception in Advance as the first paper trains it, for any served dense checkpoint.

The served model gets a LoRA adapter (r=8, alpha=16, q and v projections, 3 epochs by default)
trained to answer the length query (`self_predict.QUERY`, asked exactly as `length_query` asks
it) with the length of its own response, rounded to a multiple of `rounding` (the paper: 50).
The lengths come from the model itself: `lengthwise predictor record --n 4` writes what it
generates, and the paper's label is the maximum over four samples (`L_max`). At serving time the
`self` predictor asks through the adapter while the requests themselves run on the base model
(or their own adapters): the adapter lives in the asking engine only.

    lengthwise predictor record --model M --data prompts.jsonl --out lengths.jsonl --n 4 --temperature 0.7
    lengthwise predictor train --kind pia --model M --data lengths.jsonl --target length --out pia/
    lengthwise serve M --length-predictor pia/

A PiA directory holds the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) and
the predictor manifest (rounding, the read, the fallback length, which model it was trained on).
It asks the served model, so it is loaded with an engine (`make_predictor(dir, engine)`), never
alone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lengthwise.predict.base import MANIFEST, LengthPredictor, read_manifest
from lengthwise.predict.data import LengthDataset
from lengthwise.predict.self_predict import MAX_ANSWER_TOKENS, READS, SelfPredictor, length_query

if TYPE_CHECKING:
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.lora.train import LoRATrainConfig
    from lengthwise.model.config import ModelConfig
    from lengthwise.tokenizer import Tokenizer

KIND = "pia"
DEFAULT_ROUNDING = 50.0  # the paper's label granularity


def length_label(length: float, rounding: float) -> int:
    """The number the adapter learns to answer for a response of `length` tokens: the nearest
    multiple of `rounding` (halves up; 0 or 1: the length itself). Nearest, not the paper's
    ceiling, so the `self` predictor's median read (each answer spread over its rounding
    interval) is centred on the truth; a short answer may be labelled 0, which the predictor
    reads as 1 token, as the built-in model was trained (`lengthwise.tiny.train.round10`)."""
    if rounding <= 1:
        return round(length)
    return int(math.floor(length / rounding + 0.5) * rounding)


def model_fingerprint(config: ModelConfig) -> dict[str, Any]:
    """What a PiA adapter must match in the model it asks (checked when it is loaded)."""
    return {"model_type": config.model_type, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
            "vocab_size": config.vocab_size}


def answer_eos(tokenizer: Tokenizer, eos_token_ids: Sequence[int]) -> int:
    """The token that ends a trained answer: the tokenizer's EOS where the model stops on it (a chat
    model's turn end, e.g. `<|eot_id|>` or `<|im_end|>`), else the first stop id of the model's
    configs (never BOS, which generation_config.json may list among them)."""
    tok_eos = tokenizer.eos_token_id
    if tok_eos is not None and (not eos_token_ids or tok_eos in eos_token_ids):
        return tok_eos
    ids = [i for i in eos_token_ids if i != tokenizer.bos_token_id] or list(eos_token_ids)
    if not ids:
        raise ValueError("neither config.json nor the tokenizer names an EOS token to end the answer")
    return ids[0]


def answer_ids(tokenizer: Tokenizer, number: int) -> list[int]:
    """The tokens of `number` as an answer, digits first: a SentencePiece tokenizer's lone
    word-start piece ("▁") is dropped, so the answer's first token already carries its leading
    digit and the `self` predictor's median read, which branches on the first token, sees the
    model's spread over numbers rather than one shared prefix token."""
    ids = tokenizer.encode(str(number), add_special_tokens=False)
    if len(ids) > 1 and not tokenizer.decode(ids[:1], skip_special_tokens=True).strip() \
            and tokenizer.decode(ids[1:], skip_special_tokens=True).strip() == str(number):
        ids = ids[1:]
    return ids


def pia_examples(tokenizer: Tokenizer, data: LengthDataset, eos_token_id: int, max_model_len: int,
                 rounding: float = DEFAULT_ROUNDING) -> list[tuple[list[int], list[int]]]:
    """(question ids, answer ids) per record: the length query as the `self` predictor asks it
    (clipped from the front to `max_model_len` as it clips, so pass the serving engine's), answered
    by the rounded length's digits and EOS. Records generated with a LoRA adapter are refused: the
    adapter learns the base model's lengths."""
    adapted = [r.id for r in data.records if r.lora is not None]
    if adapted:
        raise ValueError(f"{len(adapted)} records (first: id {adapted[0]!r}) were generated with a LoRA adapter "
                         f"(their 'lora' field); PiA learns the base model's own lengths: drop them from the data")
    limit = max_model_len - MAX_ANSWER_TOKENS
    out = []
    for r in data.records:
        question = length_query(tokenizer, r.query)
        ids = tokenizer.encode(question) if isinstance(question, str) else list(question)
        label = length_label(r.length, rounding)
        answer = answer_ids(tokenizer, label) + [eos_token_id]
        if len(answer) > MAX_ANSWER_TOKENS:
            raise ValueError(f"record {r.id}: the answer {label} takes {len(answer)} tokens; the self predictor "
                             f"reads at most {MAX_ANSWER_TOKENS}")
        out.append((ids[-limit:], answer))
    return out


def train_pia(model_dir: str | Path, data: LengthDataset, out: str | Path, config: LoRATrainConfig | None = None,
              rounding: float = DEFAULT_ROUNDING, read: str = "median", dtype: str = "auto", device: str = "auto",
              max_model_len: int | None = None, progress: bool = True) -> Path:
    """Train a PiA adapter for the checkpoint in `model_dir` on `data` (its own response lengths)
    and save it, with its manifest, in `out`. Returns `out`. `max_model_len`: the serving engine's
    (default: the model's context), which clips long questions as the predictor will."""
    import torch

    from lengthwise.lora.train import LoRATrainConfig, save_peft_adapter, train_lora
    from lengthwise.model import load_model
    from lengthwise.predict.simple import ConstantPredictor
    from lengthwise.tokenizer import Tokenizer

    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    if not 0 <= rounding < math.inf:
        raise ValueError(f"rounding must be a finite number >= 0, got {rounding}")
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json: the length query is asked in text")
    tokenizer = Tokenizer(model_dir)
    model = load_model(model_dir, dtype, device)
    context = max_model_len or model.config.max_context
    if not 0 < context <= model.config.max_context:
        raise ValueError(f"max_model_len must be in 1..{model.config.max_context}, got {max_model_len}")
    examples = pia_examples(tokenizer, data, answer_eos(tokenizer, model.config.eos_token_ids), context, rounding)
    cfg = config or LoRATrainConfig()
    start = time.perf_counter()
    trained = train_lora(model, examples, cfg, progress=progress)
    seconds = round(time.perf_counter() - start, 1)
    out = Path(out)
    save_peft_adapter(trained, out, base_model=str(model_dir))
    manifest = {"kind": KIND, "version": PiAPredictor.version, "bins": None, "target": data.target,
                "data_hash": data.data_hash,
                "metrics": {"train_seconds": seconds, "train_records": len(data), "train_steps": trained.steps,
                            "epoch_losses": [round(x, 4) for x in trained.epoch_losses],
                            "device": str(model.device), "threads": torch.get_num_threads()},
                "config": {"rounding": float(rounding), "read": read,
                           "fallback_length": ConstantPredictor.fit(data).value, "max_model_len": context,
                           "model": model_fingerprint(model.config), "base_model": str(model_dir),
                           "lora": asdict(cfg)}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def add_metrics(directory: str | Path, **metrics: Any) -> None:
    """Add `metrics` (an evaluation after training) to the manifest in `directory`."""
    path = Path(directory) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("metrics", {}).update(metrics)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def is_pia_dir(spec: object) -> bool:
    """Whether `spec` is a directory holding a PiA predictor."""
    if not isinstance(spec, (str, Path)) or not Path(spec).is_dir():
        return False
    manifest = read_manifest(spec)
    return manifest is not None and manifest.get("kind") == KIND


class PiAPredictor(SelfPredictor):
    """The `self` predictor asking through a trained PiA adapter (see the module docstring)."""

    kind = KIND

    def __init__(self, engine: LLMEngine, directory: str | Path, **kwargs: Any) -> None:
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("kind") != KIND:
            raise ValueError(f"{directory} holds no PiA predictor (its {MANIFEST} has another kind or is absent)")
        if manifest.get("version", 0) > self.version:
            raise ValueError(f"{directory / MANIFEST}: format version {manifest['version']} is newer than this "
                             f"lengthwise supports ({self.version})")
        cfg = manifest.get("config") or {}
        want, have = cfg.get("model") or {}, model_fingerprint(engine.model.config)
        differs = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
        if differs:
            raise ValueError(f"PiA predictor {directory} was trained on another model: "
                             + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differs.items()))
        super().__init__(engine, read=cfg.get("read", "median"), rounding=cfg.get("rounding", DEFAULT_ROUNDING),
                         fallback_length=cfg.get("fallback_length", 128.0), adapter=directory,
                         target=manifest.get("target", ""), data_hash=manifest.get("data_hash", ""),
                         metrics=manifest.get("metrics"), **kwargs)
        self.directory = directory

    def save_state(self, directory: Any) -> None:
        raise ValueError(f"a PiA predictor is saved by train_pia (`lengthwise predictor train --kind pia`); this one "
                         f"lives in {self.directory}")

    @classmethod
    def from_saved(cls, directory: Path, manifest: dict[str, Any]) -> LengthPredictor:
        raise ValueError(f"the PiA predictor in {directory} asks the served model: give it to an engine as its "
                         f"length predictor (length_predictor={str(directory)!r}, or --model with predictor eval)")

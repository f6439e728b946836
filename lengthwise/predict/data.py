"""Length datasets: JSONL records of a prompt and the response lengths it produced.

The alpaca-lengths format (`../shared/data/alpaca-lengths`): `id`, `instruction`, `input`,
`prompt`, `lengths: {"t0.0": ..}`, `L_max`, `L_gt`. Files that the engine records for the probe
add `features` (the hidden state at the end of prefill) and `length`. A target names a top-level
field (`L_max`, `L_gt`, `length`) or a key of `lengths` (`t0.0`). Errors name the line and field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lengthwise.predict.base import LengthQuery


@dataclass(frozen=True)
class LengthRecord:
    """One prompt and its observed response length under the chosen target."""

    id: str
    query: LengthQuery
    length: float
    lora: str | None = None  # the LoRA adapter the length was generated with (recorded files), if any


@dataclass(frozen=True)
class LengthDataset:
    records: list[LengthRecord]
    target: str
    data_hash: str  # sha256 of the file's bytes: the manifest says what a predictor was trained on
    path: str = ""

    @property
    def lengths(self) -> list[float]:
        return [r.length for r in self.records]

    @property
    def queries(self) -> list[LengthQuery]:
        return [r.query for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def file_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def load_length_data(path: str | Path, target: str = "L_max", need_features: bool = False,
                     limit: int | None = None) -> LengthDataset:
    """Read and validate a length JSONL file. Raises `ValueError` naming the file, line and field
    for a missing or malformed field, a negative length, or an empty file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    records: list[LengthRecord] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(records) >= limit:
                break
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: a record must be a JSON object")
            records.append(_record(obj, target, need_features, where, len(records)))
    if not records:
        raise ValueError(f"data file {path} has no records")
    return LengthDataset(records, target, file_hash(path), str(path))


def _record(obj: dict, target: str, need_features: bool, where: str, index: int) -> LengthRecord:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: field 'prompt' is missing or not a non-empty string")
    length = _target(obj, target, where)
    features = obj.get("features")
    if need_features:
        if not isinstance(features, list) or not features or not all(isinstance(v, (int, float)) for v in features):
            raise ValueError(f"{where}: field 'features' (a list of numbers, recorded by the engine) is missing "
                             f"or malformed; record a dataset with `record_lengths`")
    for name in ("instruction", "input"):
        if name in obj and not isinstance(obj[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string")
    messages = obj.get("messages")
    if messages is not None and (not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise ValueError(f"{where}: field 'messages' must be a list of chat messages with a 'role' each")
    query = LengthQuery(prompt=prompt, instruction=obj.get("instruction"), input=obj.get("input"),
                        features=features if need_features else None, true_length=length,
                        request_id=str(obj.get("id", index)), messages=messages)
    lora = obj.get("lora")
    if lora is not None and not isinstance(lora, str):
        raise ValueError(f"{where}: field 'lora' must be an adapter name or null")
    return LengthRecord(str(obj.get("id", index)), query, length, lora)


def _target(obj: dict, target: str, where: str) -> float:
    if target in obj:
        value = obj[target]
    elif isinstance(obj.get("lengths"), dict) and target in obj["lengths"]:
        value = obj["lengths"][target]
    else:
        raise ValueError(f"{where}: target field {target!r} is missing (neither a field nor a key of 'lengths')")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: target field {target!r} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: target field {target!r} is negative ({value})")
    return float(value)


def write_predictions(path: str | Path, ids: Sequence[str], predicted: Sequence[float]) -> None:
    """One `{"id", "predicted"}` per line, so metrics can be recomputed outside lengthwise."""
    with Path(path).open("w", encoding="utf-8") as f:
        for i, p in zip(ids, predicted, strict=True):
            f.write(json.dumps({"id": i, "predicted": round(float(p), 3)}) + "\n")

"""Embeddings: how a prompt's final hidden states become one vector (vLLM's pooling API).

`PoolerConfig` is the model's side (set once per engine): which position(s) to pool (`last`,
`mean` or `cls`) and whether to L2-normalize. By default it is read from the checkpoint's
sentence-transformers files, as vLLM and sentence-transformers do (`modules.json` names a
`Pooling` module whose `config.json` sets the mode, and a `Normalize` module when vectors are
normalized); a checkpoint without them gets last-token pooling, normalized (the setting of
decoder embedding models such as Qwen3-Embedding). `PoolingParams` is the request's side:
`dimensions` (matryoshka truncation, for models that say they support it), `normalize` (None:
the model's) and `truncate_prompt_tokens` (keep only the prompt's last k tokens).

Stdlib only: the scheduler reads `PoolingTask.reads_every_position` (no cached prefix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLING_TYPES = ("last", "mean", "cls")

# sentence-transformers' Pooling config keys, by the pooling type they select.
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolerConfig:
    """How the engine pools: `pooling_type` (`"last"`, `"mean"` over every prompt token, or
    `"cls"`, the first token; vLLM's upper-case names are accepted) and `normalize` (L2). As
    `EngineConfig.pooler_config`, a field left None keeps what the checkpoint says."""

    pooling_type: str | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        kind = self.pooling_type.lower() if isinstance(self.pooling_type, str) else self.pooling_type
        if kind is not None and kind not in POOLING_TYPES:
            raise ValueError(f"pooler_config.pooling_type must be one of {', '.join(POOLING_TYPES)}, "
                             f"got {self.pooling_type!r}")
        object.__setattr__(self, "pooling_type", kind)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"pooler_config.normalize must be true or false, got {self.normalize!r}")

    @classmethod
    def parse(cls, value: PoolerConfig | dict[str, Any] | None) -> PoolerConfig | None:
        """`EngineConfig.pooler_config` as given: a PoolerConfig, a dict of its fields, or None."""
        if value is None or isinstance(value, PoolerConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"pooler_config must be a PoolerConfig or a dict, got {type(value).__name__}")
        unknown = set(value) - {"pooling_type", "normalize"}
        if unknown:
            raise ValueError(f"pooler_config has unknown field(s) {sorted(unknown)}; "
                             f"expected pooling_type and/or normalize")
        return cls(**value)


@dataclass(frozen=True)
class PoolingParams:
    """A request's embedding options (vLLM's names).

    - `dimensions`: keep the first `dimensions` components (then normalize, if normalizing):
      matryoshka truncation, refused for a model whose config.json does not declare it
      (`is_matryoshka` or `matryoshka_dimensions`), as vLLM does.
    - `normalize`: L2-normalize the vector; None takes the model's `PoolerConfig`.
    - `truncate_prompt_tokens`: embed only the prompt's last k tokens (-1: the last
      `max_model_len`); None refuses a prompt longer than the context.
    """

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"dimensions must be a positive integer, got {d!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens must be a positive integer or -1, got {t!r}")


@dataclass(frozen=True)
class PoolingTask:
    """What one request's embedding is made of, resolved by the engine from its `PoolerConfig`
    and the request's `PoolingParams`."""

    pooling_type: str
    normalize: bool
    dimensions: int | None = None

    @property
    def reads_every_position(self) -> bool:
        """Mean and CLS pooling read prompt positions a cached prefix would skip; the last token
        is always computed."""
        return self.pooling_type != "last"


@dataclass(frozen=True)
class ModelPooling:
    """What a checkpoint says about embedding with it: its `PoolerConfig`, both fields set (None,
    with `problem` saying why, when its sentence-transformers files ask for something lengthwise
    cannot do or cannot be read) and which matryoshka dimensions it supports (`matryoshka`:
    False, True for any, or a tuple)."""

    config: PoolerConfig | None
    matryoshka: bool | tuple[int, ...] = False
    problem: str | None = None

    def check_dimensions(self, dimensions: int, hidden_size: int) -> None:
        if self.matryoshka is False:
            raise ValueError(f"dimensions={dimensions}: this model does not support matryoshka representation "
                             f"(config.json declares neither is_matryoshka nor matryoshka_dimensions); "
                             f"its embeddings have {hidden_size} dimensions")
        if dimensions > hidden_size:
            raise ValueError(f"dimensions={dimensions} is more than the model's {hidden_size}")
        if isinstance(self.matryoshka, tuple) and dimensions not in self.matryoshka:
            raise ValueError(f"dimensions={dimensions}: this model supports only the matryoshka dimensions "
                             f"{list(self.matryoshka)}")


def read_model_pooling(model_dir: str | Path | None, override: PoolerConfig | None = None) -> ModelPooling:
    """The checkpoint's pooling (see the module docstring); each field `override`
    (EngineConfig.pooler_config) sets replaces what its sentence-transformers files say. A file
    that cannot be read leaves embeddings refused (`problem`), never generation."""
    override = override or PoolerConfig()
    kind, normalize, problem = "last", True, None
    matryoshka: bool | tuple[int, ...] = False
    if model_dir is not None:
        model_dir = Path(model_dir)
        try:
            raw = _json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
            dims = raw.get("matryoshka_dimensions")
            if isinstance(dims, list) and dims and all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
                matryoshka = tuple(dims)
            elif raw.get("is_matryoshka") is True:
                matryoshka = True
            kind, normalize, problem = _sentence_transformers_pooling(model_dir, override.pooling_type is not None)
        except ValueError as e:
            problem = str(e)
    if problem is not None:
        return ModelPooling(None, matryoshka, problem)
    return ModelPooling(PoolerConfig(override.pooling_type or kind,
                                     normalize if override.normalize is None else override.normalize), matryoshka)


def _sentence_transformers_pooling(model_dir: Path, type_given: bool) -> tuple[str, bool, str | None]:
    """(pooling type, normalize, a problem or None) from `modules.json`; `type_given`: the pooling
    type is overridden, so a mode lengthwise lacks is no problem."""
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return "last", True, None
    modules = _json(modules_path)
    if not isinstance(modules, list):
        return "last", True, f"{modules_path} is not a list of modules"
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    normalize = "Normalize" in kinds
    extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        return "last", normalize, (f"{modules_path} lists sentence-transformers module(s) {extra} after pooling, "
                                   f"which lengthwise does not run; its embeddings would differ from the model's")
    pooling = kinds.get("Pooling")
    if pooling is None:
        return "last", normalize, None
    path = model_dir / str(pooling.get("path", "")) / "config.json"
    cfg = _json(path) if path.is_file() else {}
    chosen = [t for key, t in _ST_MODES.items() if cfg.get(key)]
    unsupported = [key for key in _ST_UNSUPPORTED if cfg.get(key)]
    if (unsupported or len(chosen) > 1) and not type_given:
        return "last", normalize, (f"{path} asks for pooling {unsupported + [k for k in _ST_MODES if cfg.get(k)]}; "
                                   f"lengthwise pools with one of {', '.join(POOLING_TYPES)} (pass pooler_config "
                                   f"to choose)")
    return (chosen[0] if len(chosen) == 1 else "last"), normalize, None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from e

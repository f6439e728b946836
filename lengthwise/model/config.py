"""`ModelConfig`: the parts of a Hugging Face `config.json` that the executor needs, validated.

One config class covers every supported family (Llama, Mistral, Qwen2, Qwen3 and the mixture-of-
experts Mixtral, Qwen2-MoE, Qwen3-MoE); the family only switches features on (q/k/v bias, q/k
norm, sliding window, sparse MLP layers). Both the transformers 4.x layout
(`rope_theta` + `rope_scaling`) and the 5.x layout (`rope_parameters`) are read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds something we cannot serve."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. `type` is one of `SUPPORTED_ROPE_TYPES`."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3 and yarn: the context the model was pretrained for
    original_max_position_embeddings: int = 8192
    # yarn only: the band of rotations ramped from extrapolated to interpolated frequencies, and
    # the factor on cos and sin (YaRN's attention temperature, 0.1 ln(factor) + 1 unless given)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


@dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of a mixture-of-experts family. A sparse layer routes each token to `top_k`
    of `num_experts` SwiGLU experts (of `expert_intermediate_size`) and sums their outputs weighted
    by the router's softmax probabilities, renormalised over the chosen k when `norm_topk_prob`.
    Qwen2-MoE adds a shared expert every token takes (`shared_expert_intermediate_size`, 0 for
    none), scaled by a sigmoid gate. Layers with `sparse_layers[i]` False keep a dense MLP."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]
    shared_expert_intermediate_size: int = 0
    # Mixtral keeps the top-k weights in float32 and sums the experts' outputs in float32 (one
    # rounding); Qwen casts the weights to the model's dtype first (transformers does each so).
    float32_weights: bool = False


# The `quantization_config` methods whose checkpoints load (4-bit, see lengthwise.model.int4).
CHECKPOINT_QUANTIZATIONS = ("gptq", "awq")


@dataclass(frozen=True)
class CheckpointQuantization:
    """How a quantized checkpoint stores its decoder projections (config.json's
    `quantization_config`): GPTQ or AWQ, 4 bits, in groups of `group_size` inputs (-1: one group
    per row). GPTQ's original format stores zero points minus one (`zero_offset` 1; its v2 and
    AWQ store them as they are); `desc_act` GPTQ checkpoints may order the groups by activation."""

    method: str
    group_size: int
    desc_act: bool = False
    zero_offset: int = 0

    def num_groups(self, k: int) -> int:
        return 1 if self.group_size <= 0 else -(-k // self.group_size)

    @classmethod
    def from_hf(cls, raw: Any) -> CheckpointQuantization:
        """Parse `quantization_config`; anything we cannot load exactly is refused, naming the field."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"config.json: quantization_config must be an object, got {raw!r}")
        method = raw.get("quant_method")
        if method not in CHECKPOINT_QUANTIZATIONS:
            raise CheckpointError(f"config.json: quantization_config quant_method {method!r} is not supported "
                                  f"(supported: {', '.join(CHECKPOINT_QUANTIZATIONS)}; or serve a bfloat16, "
                                  f"float16 or float32 checkpoint)")
        bits = raw.get("bits", raw.get("w_bit"))
        if bits != 4:
            raise CheckpointError(f"config.json: quantization_config bits {bits!r} is not supported ({method} "
                                  f"checkpoints load with 4 bits)")
        group = raw.get("group_size", raw.get("q_group_size"))
        if isinstance(group, bool) or not isinstance(group, int) or (group <= 0 and group != -1):
            raise CheckpointError(f"config.json: quantization_config group_size must be a positive integer or "
                                  f"-1, got {group!r}")
        if method == "gptq":
            fmt = raw.get("checkpoint_format") or "gptq"
            if fmt not in ("gptq", "gptq_v2"):
                raise CheckpointError(f"config.json: quantization_config checkpoint_format {fmt!r} is not "
                                      f"supported (gptq or gptq_v2)")
            if raw.get("lm_head"):
                raise CheckpointError("config.json: quantization_config lm_head true (a 4-bit LM head) is "
                                      "not supported")
            if raw.get("dynamic"):
                raise CheckpointError("config.json: quantization_config dynamic (per-module settings) is not "
                                      "supported")
            return cls("gptq", group, bool(raw.get("desc_act", False)), 1 if fmt == "gptq" else 0)
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"config.json: quantization_config version {version!r} is not supported "
                                  f"(AWQ checkpoints load in the gemm layout)")
        if raw.get("zero_point", True) is not True:
            raise CheckpointError("config.json: quantization_config zero_point false is not supported "
                                  "(AWQ checkpoints load with zero points)")
        return cls("awq", group)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model in the Llama family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: the sliding-window size, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    moe: MoeConfig | None = None  # mixture-of-experts families only
    quantization: CheckpointQuantization | None = None  # a GPTQ or AWQ checkpoint's 4-bit projections

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if len(self.sliding_windows) != self.num_layers:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)

    @property
    def max_context(self) -> int:
        """The longest context the model is meant for, as vLLM derives it: `max_position_embeddings`,
        times the factor of linear RoPE scaling, which stretches positions by it; for YaRN the
        pretrained context times its factor (Qwen2.5's 32,768 x 4); llama3's scaling is already in
        max_position_embeddings."""
        if self.rope.type == "linear":
            return int(self.max_position_embeddings * self.rope.factor)
        if self.rope.type == "yarn":
            return int(self.rope.original_max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read `config.json` (and the EOS ids of `generation_config.json`) from a checkpoint directory."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"model directory {str(model_dir)!r} does not exist")
        path = model_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: config.json is missing; is this a Hugging Face checkpoint?")
        gen_path = model_dir / "generation_config.json"
        raw = read_json(path)
        if not raw.get("quantization_config"):
            # Older AutoGPTQ and AutoAWQ exports keep their settings beside config.json (vLLM reads them too).
            for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
                if (model_dir / name).is_file():
                    raw = {**raw, "quantization_config": {"quant_method": method, **read_json(model_dir / name)}}
                    break
        return cls.from_hf(raw, read_json(gen_path) if gen_path.is_file() else {})

    @classmethod
    def from_hf(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Build from the dicts of `config.json` and (optionally) `generation_config.json`."""
        generation = generation or {}
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        quant = raw.get("quantization_config")
        quantization = CheckpointQuantization.from_hf(quant) if quant else None
        architectures = raw.get("architectures") or []
        if architectures and not any(str(a).endswith("ForCausalLM") for a in architectures):
            raise CheckpointError(f"config.json: architectures {architectures} has no *ForCausalLM: lengthwise "
                                  f"serves causal language models, not classifiers or headless models")
        for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "max_window_layers"):
            if key in raw and raw[key] is None:  # (transformers refuses these too)
                raise CheckpointError(f"config.json: {key} is null; give a number or leave the field out")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in raw:
                raise CheckpointError(f"config.json: required field {key!r} is missing")
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
            if isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] <= 0:
                raise CheckpointError(f"config.json: {key} must be a positive integer, got {raw[key]!r}")
        num_heads = raw["num_attention_heads"]
        num_layers = raw["num_hidden_layers"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos_ids):
            raise CheckpointError(f"eos_token_id must be a token id or a list of token ids, got {eos!r}")
        bos = generation.get("bos_token_id", raw.get("bos_token_id"))
        bias = bool(raw.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias (and no o bias); Llama-style configs say so with attention_bias.
            qkv_bias=True if model_type in ("qwen2", "qwen2_moe") else bias,
            o_bias=False if model_type in ("qwen2", "qwen2_moe") else bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_windows=_sliding_windows_from_hf(raw, model_type, num_layers),
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            moe=_moe_from_hf(raw, model_type, num_layers) if model_type in MOE_MODEL_TYPES else None,
            quantization=quantization,
        )


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from a checkpoint file; errors name the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x writes `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    kwargs: dict[str, Any] = {"theta": theta, "type": rope_type}
    if rope_type == "yarn":
        return RopeConfig(**kwargs, **_yarn_from_hf(raw, params))
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise CheckpointError(f"config.json: rope scaling of type {rope_type!r} needs 'factor'")
        kwargs["factor"] = float(params["factor"])
        if not kwargs["factor"] > 0:
            raise CheckpointError(f"config.json: rope scaling factor must be positive, got {params['factor']!r}")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise CheckpointError(f"config.json: llama3 rope scaling needs {key!r}")
        kwargs["low_freq_factor"] = float(params["low_freq_factor"])
        kwargs["high_freq_factor"] = float(params["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


def _yarn_from_hf(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """YaRN's settings as transformers reads them: the pretrained context defaults to
    max_position_embeddings, a missing factor is the ratio of the two (DeepSeek's convention), and
    the attention factor is 0.1 ln(factor) + 1, or the ratio of two such with mscale/mscale_all_dim."""
    def number(key: str, default: float | None) -> float | None:
        value = params.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise CheckpointError(f"config.json: yarn rope scaling's {key} must be a positive number, got {value!r}")
        return float(value)

    max_pos = raw.get("max_position_embeddings")
    max_pos = float(max_pos) if isinstance(max_pos, int) and not isinstance(max_pos, bool) and max_pos > 0 else None
    original = number("original_max_position_embeddings", max_pos)
    if original is None:
        raise CheckpointError("config.json: yarn rope scaling needs 'original_max_position_embeddings'")
    factor = number("factor", None if max_pos is None else max_pos / original)
    if factor is None:
        raise CheckpointError("config.json: yarn rope scaling needs 'factor'")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = number("attention_factor", None)
    if attention is None:
        m, m_all = number("mscale", None), number("mscale_all_dim", None)
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    # (transformers reads a zero beta as unset too)
    return {"factor": factor, "original_max_position_embeddings": int(original),
            "beta_fast": number("beta_fast", 32.0) if params.get("beta_fast") != 0 else 32.0,
            "beta_slow": number("beta_slow", 1.0) if params.get("beta_slow") != 0 else 1.0,
            "truncate": bool(params.get("truncate", True)), "attention_factor": attention}


def _moe_from_hf(raw: dict[str, Any], model_type: str, num_layers: int) -> MoeConfig:
    """The sparse MLP as transformers builds it. Mixtral: every layer sparse, experts of
    `intermediate_size`, top-k renormalised. Qwen2/3-MoE: experts of `moe_intermediate_size`; layer
    i is sparse unless listed in `mlp_only_layers`, and only every `decoder_sparse_step`-th layer
    ((i + 1) % step == 0); `norm_topk_prob` as configured (transformers' default False)."""
    def count(key: str, default: int | None = None, minimum: int = 1) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CheckpointError(f"config.json: {key} must be an integer >= {minimum}, got {value!r}")
        return value

    experts_key = "num_local_experts" if "num_local_experts" in raw else "num_experts"
    num_experts = count(experts_key)
    top_k = count("num_experts_per_tok")
    if top_k > num_experts:
        raise CheckpointError(f"config.json: num_experts_per_tok ({top_k}) exceeds {experts_key} ({num_experts})")
    if model_type == "mixtral":
        return MoeConfig(num_experts, top_k, count("intermediate_size"), True, (True,) * num_layers,
                         float32_weights=True)
    step = count("decoder_sparse_step", 1)
    dense = raw.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise CheckpointError(f"config.json: mlp_only_layers must be a list of layer indices, got {dense!r}")
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    shared = count("shared_expert_intermediate_size", 0, 0) if model_type == "qwen2_moe" else 0
    return MoeConfig(num_experts, top_k, count("moe_intermediate_size"), bool(raw.get("norm_topk_prob", False)),
                     sparse, shared)


def _sliding_windows_from_hf(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if model_type == "llama" or not window:
        return (None,) * num_layers
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise CheckpointError("config.json: layer_types must have one entry per layer")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("mistral", "mixtral"):
        return (window,) * num_layers
    # Qwen (transformers 4.x layout): sliding only when enabled: Qwen3-MoE on every layer, Qwen2-MoE
    # on the even layers below max_window_layers (transformers 5's reading), Qwen2/3 from layer
    # max_window_layers on.
    if not raw.get("use_sliding_window", False):
        return (None,) * num_layers
    first = raw.get("max_window_layers", num_layers)
    if model_type == "qwen3_moe":
        return (window,) * num_layers
    if model_type == "qwen2_moe":
        return tuple(window if i % 2 == 0 and i < first else None for i in range(num_layers))
    return tuple(window if i >= first else None for i in range(num_layers))

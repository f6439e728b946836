"""`EngineConfig`: how an engine instance is set up. Validated on construction; errors name the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# `EngineConfig.quantization`'s methods (`lengthwise.model.quantize` implements them).
QUANTIZATION_METHODS = ("int8",)
# `EngineConfig.kv_cache_dtype`'s choices: "auto" is the model's dtype.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, with vLLM's names where vLLM has one.

    `kv_cache_memory`: the KV cache's size, allocated once at start-up: an int is bytes, a float
    in (0, 1] a fraction of the device's free memory, `None` the default (90% of free GPU memory;
    on the CPU, the smaller of 4 GiB and half the available memory). The cache is never larger
    than `max_num_seqs` full-length contexts need.
    `max_num_batched_tokens`: the token budget of one forward pass; longer prompts are prefilled
    in chunks of at most this many tokens.
    `enable_prefix_caching`: full prompt blocks are kept (until their space is needed) and reused
    by later requests whose prompts start with the same tokens, as vLLM's automatic prefix caching.
    `policy`/`policy_options`: the scheduling policy by name (`fcfs`/`continuous`,
    `continuous-sjf`, `static`, `sequence`, `multibin`) and its keyword options.
    `length_predictor`: a saved predictor directory, `"oracle"`, `"self"`, `"self-greedy"`
    (either with `":DIR"`, a fallback predictor), or a `LengthPredictor`; every request gets a
    predicted length before it is scheduled. `allow_benchmark_predictors=False` (the server)
    refuses predictors that only benchmarks can feed, such as the oracle, at start-up.
    `record_lengths`: a JSONL file to which each finished request appends its prompt, the
    model's hidden state at the end of prefill and its real length (the probe's training data).
    `enforce_eager`: on CUDA, run every step eagerly instead of replaying decode steps as CUDA
    graphs (vLLM's name); graphs are captured at start-up for batches of up to
    `min(max_num_seqs, 256)` rows and need the Triton kernels.
    `quantization`: `"int8"` stores the decoder's projections as int8 with a scale per output
    row (weight-only; `lengthwise.model.quantize`): a quarter of float32's bytes for the CPU's
    batch-1 decode to stream, at some accuracy (docs/benchmarks.md measures both). CPU and
    float32 only; `None` (default) serves the checkpoint's weights as they are.
    `kv_cache_dtype`: the dtype keys and values are held in (vLLM's name). `"auto"` (default) is
    the model's dtype; `"bfloat16"` under a float32 model on the CPU halves the cache's bytes:
    twice the tokens in the same `kv_cache_memory`, and half the bytes for decode attention to
    read, at the cost of rounding each key and value to bfloat16 (docs/benchmarks.md measures
    both). On CUDA the cache takes the model's dtype.
    `async_decode`: with those graphs, launch the next decode step before reading this step's
    tokens back, so the host's per-step work overlaps the GPU's (vLLM's async scheduling, for
    steps whose rows are predictable; `False` for the A/B).
    """

    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | float | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    policy: str = "fcfs"
    enable_prefix_caching: bool = True
    policy_options: dict[str, Any] | None = None
    length_predictor: Any = None
    record_lengths: str | None = None
    enforce_eager: bool = False
    async_decode: bool = True
    allow_benchmark_predictors: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive_int(name, getattr(self, name))
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        m = self.kv_cache_memory
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)):
                raise ValueError(f"kv_cache_memory must be bytes (int) or a fraction (float), got {m!r}")
            if isinstance(m, float) and not 0 < m <= 1:
                raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {m}")
            if isinstance(m, int) and m <= 0:
                raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {m}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        for name in ("enforce_eager", "async_decode", "allow_benchmark_predictors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} or None, "
                             f"got {self.quantization!r}")
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"policy must be a policy name, got {self.policy!r}")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")

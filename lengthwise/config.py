"""`EngineConfig`: how an engine instance is set up. Validated on construction; errors name the field."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lengthwise.pooling import PoolerConfig

# `EngineConfig.quantization`'s methods (`lengthwise.model.quantize` implements them).
QUANTIZATION_METHODS = ("int8", "int4", "gptq", "awq")
# `EngineConfig.kv_cache_dtype`'s choices (vLLM's names): "auto" is the model's dtype; "fp8" is
# "fp8_e4m3" (torch.float8_e4m3fn), "fp8_e5m2" torch.float8_e5m2.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
# `SpeculativeConfig.method`s: draft-free n-gram lookup (vLLM's "ngram", prompt lookup decoding).
SPECULATIVE_METHODS = ("ngram",)
# One verify step feeds a sequence 1 + num_speculative_tokens tokens; the CPU's fused decode takes
# up to 16 tokens per sequence (`ops.cpu.decode.MAX_QUERY_LEN`).
MAX_SPECULATIVE_TOKENS = 15


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config`): each decode step also feeds up to
    `num_speculative_tokens` drafted tokens and keeps those the model would have produced itself.

    `method="ngram"` drafts without a second model (prompt lookup decoding): the sequence's last
    n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) are looked up in its
    prompt and output so far, and the tokens that followed their latest earlier occurrence are
    the draft. Verification samples every fed position with the request's own sampling rule and
    keeps the draft up to the first token the sample disagrees with, so the output has exactly
    the distribution of plain decoding (greedy or seeded: the same tokens, up to floating-point
    near-ties); only the number of steps falls.

    A verify step costs little more than a plain one only while the step is bound by reading the
    weights (small batches); in a large batch the drafted tokens cost compute of their own.
    `disable_by_batch_size` (vLLM's name): steps with more running sequences than this decode
    without drafts (None: always draft). docs/benchmarks.md measures where the gain ends.

    `adaptive` (default False: vLLM's behaviour, every row verifies what the lookup finds, up
    to `num_speculative_tokens`; not a vLLM key): each step each row verifies only as many
    drafted tokens as pay for themselves, from that sequence's acceptance so far and the step
    time the engine measures (a row whose drafts keep failing, or a batch large enough that a
    verified token costs its own compute, drafts less or nothing; sched/draft_length.py).
    docs/benchmarks.md measures both: adaptive avoids most of fixed drafts' losses at large
    batches, but its step-cost fit is noisy on a busy host.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 0
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    disable_by_batch_size: int | None = None
    adaptive: bool = False

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPECULATIVE_METHODS)} "
                             f"(draft-model methods are not implemented), got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        # One bound given sets the other; neither gives n-grams of 4 down to 2 tokens.
        hi, lo = self.prompt_lookup_max, self.prompt_lookup_min
        hi, lo = (4, 2) if hi is None and lo is None else (lo if hi is None else hi, hi if lo is None else lo)
        for name, value in (("prompt_lookup_max", hi), ("prompt_lookup_min", lo)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive integer, got {value!r}")
        if lo > hi:
            raise ValueError(f"speculative_config.prompt_lookup_min={lo} is above prompt_lookup_max={hi}")
        b = self.disable_by_batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size must be a positive integer or None, got {b!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be a bool, got {self.adaptive!r}")
        object.__setattr__(self, "prompt_lookup_max", hi)
        object.__setattr__(self, "prompt_lookup_min", lo)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | None) -> SpeculativeConfig | None:
        """A `SpeculativeConfig` from itself, vLLM's dict form, or None (no speculation)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                             f"'num_speculative_tokens': 4}}, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; expected some of {sorted(known)}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings, with vLLM's names where vLLM has one.

    `kv_cache_memory`: the KV cache's size, allocated once at start-up: an int is bytes, a float
    in (0, 1] a fraction of the device's free memory, `None` the default (90% of free GPU memory;
    on the CPU, the smaller of 4 GiB and half the available memory). The cache is never larger
    than `max_num_seqs` full-length contexts need. With `enable_lora` on a GPU, what
    `max_cpu_loras` adapters of `max_lora_rank` can take comes out of that share of free memory.
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
    row, `"int4"` as 4 bits with a scale and zero point per row and group of 128 inputs
    (weight-only; `lengthwise.model.quantize`): a quarter or an eighth of float32's bytes for the
    CPU's batch-1 decode to stream, at some accuracy (docs/benchmarks.md measures both). On the
    CPU in float32; `"int4"` also on CUDA in the model's dtype (the Triton W4A16 kernel). `None`
    (default) serves the checkpoint's weights as they are: a GPTQ or AWQ checkpoint's 4-bit
    projections stay 4-bit on the CPU in float32 and on CUDA (`"gptq"`/`"awq"` may name its
    method, as in vLLM) and are dequantized into the model's dtype elsewhere.
    `kv_cache_dtype`: the dtype keys and values are held in (vLLM's name). `"auto"` (default) is
    the model's dtype; `"bfloat16"` under a float32 model on the CPU halves the cache's bytes:
    twice the tokens in the same `kv_cache_memory`, and half the bytes for decode attention to
    read, at the cost of rounding each key and value to bfloat16 (docs/benchmarks.md measures
    both). `"fp8"` (= `"fp8_e4m3"`: 3 mantissa bits, values up to 448) and `"fp8_e5m2"` (2 mantissa
    bits, up to 57344) hold one byte per value under any model dtype, on the CPU and on CUDA
    (the Triton kernels): four times float32's tokens, twice bfloat16's, rounded to nearest and
    saturated at the format's largest value with no scale (vLLM's default k/v scale of 1.0).
    Otherwise on CUDA the cache takes the model's dtype.
    `speculative_config`: speculative decoding (`SpeculativeConfig`, or vLLM's dict form such
    as `{"method": "ngram", "num_speculative_tokens": 4}`); `None` (default) decodes one token
    per sequence and step.
    `enable_lora`: serve LoRA adapters (PEFT saves) over the model: each request may name one
    (`LoRARequest`); batches mix adapters and the base model. `max_loras`: the most adapters among
    the requests running at once (others wait for a place; vLLM's meaning), `max_lora_rank`: the
    highest rank an adapter may have, `max_cpu_loras`: the most adapters kept loaded (default
    `max_loras`; the least recently used one no live request needs is dropped first). Decode steps
    with adapters take the fused CPU decode step; on a GPU they run eagerly, outside CUDA graphs.
    `async_decode`: with those graphs, launch the next decode step before reading this step's
    tokens back, so the host's per-step work overlaps the GPU's (vLLM's async scheduling, for
    steps whose rows are predictable; `False` for the A/B).
    `pooler_config`: how embeddings (`LLM.embed`, `/v1/embeddings`) pool the final hidden states
    (`lengthwise.pooling.PoolerConfig`, or a dict such as `{"pooling_type": "mean", "normalize":
    false}`); `None` (default) reads the checkpoint's sentence-transformers files, else pools the
    last token and normalizes.
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
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    pooler_config: PoolerConfig | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        object.__setattr__(self, "pooler_config", PoolerConfig.parse(self.pooler_config))
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank"):
            _positive_int(name, getattr(self, name))
        if self.max_cpu_loras is not None:
            _positive_int("max_cpu_loras", self.max_cpu_loras)
            if self.max_cpu_loras < self.max_loras:
                raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
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
        for name in ("enforce_eager", "async_decode", "allow_benchmark_predictors", "enable_lora"):
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

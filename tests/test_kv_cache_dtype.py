"""`kv_cache_dtype`: a bfloat16 KV cache under a float32 model on the CPU (twice the tokens per
byte, half the bytes for decode attention to read), and float8 ones ("fp8" = "fp8_e4m3",
"fp8_e5m2": four times the tokens). The kernels' reads and writes of them are tested in
test_ops_attention.py and test_cpu_decode.py; here, what the engine plans, what it refuses, the
rounding itself, and what it does to a real model's answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import STORIES, requires_stories

from lengthwise import LLM, load_model
from lengthwise.bench.agreement import llm_agreement
from lengthwise.config import EngineConfig
from lengthwise.engine.llm_engine import LLMEngine, _kv_cache_dtype
from lengthwise.ops import triton as triton_ops
from lengthwise.ops.attention import to_fp8
from lengthwise.ops.cpu import kernel_rounding, segment_attention_kernel

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def test_narrow_kv_caches_hold_more_blocks(hf_checkpoint):
    """The same kv_cache_memory plans twice the blocks (and tokens) in bfloat16 and four times in
    float8; 'auto' is the model's dtype."""
    model = load_model(hf_checkpoint("llama")[1], "float32", "cpu")
    engines = {kv: LLMEngine(model, None, EngineConfig(kv_cache_memory=1 << 20, kv_cache_dtype=kv))
               for kv in ("auto", "float32", "bfloat16", *FP8)}
    assert engines["auto"].kv_cache_dtype == engines["float32"].kv_cache_dtype == torch.float32
    for name, dtype, times in (("bfloat16", torch.bfloat16, 2), *((n, d, 4) for n, d in FP8.items())):
        assert engines[name].num_blocks == times * engines["float32"].num_blocks
        cache = engines[name].runner.cache
        assert cache.dtype == dtype and all(t.dtype == dtype for t in (*cache.k, *cache.v))
        assert engines[name].scheduler.kv.pool.num_blocks == engines[name].num_blocks


def test_kv_cache_dtype_is_refused_where_it_does_not_apply(monkeypatch):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16, fp8, fp8_e4m3, "
                       "fp8_e5m2, got 'fp8_e4m3fnuz'"):
        EngineConfig(kv_cache_dtype="fp8_e4m3fnuz")
    # On CUDA the Triton kernels and the CUDA graphs read the cache in the model's dtype or float8.
    gpu_model = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda"))
    assert _kv_cache_dtype("auto", gpu_model) == _kv_cache_dtype("bfloat16", gpu_model) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype='float32': on cuda the KV cache is held in the model's dtype"):
        _kv_cache_dtype("float32", gpu_model)
    # float8 there too: the Triton kernels read and write it (e4m3 from compute capability 8.9)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _kv_cache_dtype("fp8", gpu_model) == torch.float8_e4m3fn
    assert _kv_cache_dtype("fp8_e5m2", gpu_model) == torch.float8_e5m2
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8': float8 e4m3 needs a GPU of compute capability "
                       r"8.9 or newer, this one is 8.0; use 'fp8_e5m2'"):
        _kv_cache_dtype("fp8", gpu_model)
    assert _kv_cache_dtype("fp8_e5m2", gpu_model) == torch.float8_e5m2
    # On the CPU the one other cache is bfloat16 under float32: a wider cache only costs memory.
    cpu_bf16_model = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="kv_cache_dtype='float32' under a bfloat16 model"):
        _kv_cache_dtype("float32", cpu_bf16_model)
    fp16_model = SimpleNamespace(dtype=torch.float16, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="bfloat16 under float32 only"):
        _kv_cache_dtype("bfloat16", fp16_model)
    # float8 under any model dtype on the CPU (the torch reference reads it under half precision)
    assert _kv_cache_dtype("fp8", fp16_model) == _kv_cache_dtype("fp8_e4m3", cpu_bf16_model) == torch.float8_e4m3fn
    assert _kv_cache_dtype("fp8_e5m2", cpu_bf16_model) == torch.float8_e5m2
    # The Triton entry points say so too, before any kernel runs (LENGTHWISE_KERNELS=triton on the CPU).
    q, cache = torch.zeros(1, 2, 8), torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="activations' dtype"):
        triton_ops.paged_attention(q, cache, cache, None, None, 1.0)
    with pytest.raises(ValueError, match="activations' dtype"):
        triton_ops.rotary_and_write_kv(q, q, q, None, None, cache, cache, None)


@requires_stories
def test_bfloat16_kv_cache_stories260k_answers_as_float32_does():
    """On a real trained model the cache's rounding moves the logprobs a little (teacher-forced over
    its own greedy stories: mean |change| of the top-5 candidates well under 0.1 nats, the top-1
    token nearly always the same)."""
    prompts = ["Once upon a time", "The little dog", "One day, a boy named Tom", "Lily wanted to"]
    full, half = (LLM(STORIES, device="cpu", kv_cache_dtype=kv) for kv in ("auto", "bfloat16"))
    assert half.engine.runner.cache.dtype == torch.bfloat16
    q = llm_agreement(full, half, prompts, greedy_tokens=100)
    assert q["positions"] > 300
    assert 1e-4 < q["mean_abs_logprob_change"] < 0.1, q  # changed (really rounded), but little
    assert q["top1_agreement"] >= 0.97, q


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_rounding_is_torch_rounding_saturated(dtype):
    """The kernels' float8 writes (`kernel_rounding`, what the fused decode step stores) and the
    torch path's (`to_fp8`) give the same bytes: every finite value, every midpoint between
    neighbours (ties to even) and the floats beside it, random values at several scales,
    subnormals, signed zeros; beyond the largest finite value both saturate (torch alone would
    give infinity in e5m2), NaN stays NaN."""
    if segment_attention_kernel() is None:
        pytest.skip("the CPU kernels could not be built here (no C++ compiler?)")
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = values[torch.isfinite(values)].unique()  # sorted
    mids = (finite[1:] + finite[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    x = torch.cat([finite, mids, torch.nextafter(mids, torch.tensor(float("inf"))),
                   torch.nextafter(mids, torch.tensor(float("-inf"))), torch.randn(20000, generator=g) * 10,
                   torch.randn(20000, generator=g) * 1e-3, torch.randn(2000, generator=g) * 1e5,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-42, big * 1.01, -big * 3, float("inf"), float("-inf")])])
    ours, torchs = kernel_rounding(x, dtype), to_fp8(x, dtype)
    assert torch.equal(ours.view(torch.uint8), torchs.view(torch.uint8))
    assert ours.float()[-4:].tolist() == [big, -big, big, -big]
    assert kernel_rounding(torch.tensor([float("nan")]), dtype).float().isnan().all()
    assert to_fp8(torch.tensor([float("nan")]), dtype).float().isnan().all()


@requires_stories
def test_float8_kv_cache_under_a_bfloat16_model():
    """Under a half-precision model on the CPU the torch reference writes and reads the float8
    cache (torch has no float8 index_copy_: bytes are copied): stories260k in bfloat16 answers
    close to its bfloat16 cache's answers."""
    prompts = ["Once upon a time", "The little dog", "Lily wanted to"]
    half, narrow = (LLM(STORIES, dtype="bfloat16", device="cpu", kv_cache_dtype=d) for d in ("auto", "fp8"))
    assert half.engine.runner.cache.dtype == torch.bfloat16
    assert narrow.engine.runner.cache.dtype == torch.float8_e4m3fn
    q = llm_agreement(half, narrow, prompts, greedy_tokens=60)
    assert 1e-3 < q["mean_abs_logprob_change"] < 0.3, q
    assert q["top1_agreement"] >= 0.9, q


@requires_stories
@pytest.mark.parametrize("kv, top1, change", [("fp8", 0.95, 0.3), ("fp8_e5m2", 0.85, 0.6)])
def test_float8_kv_cache_stories260k_answers_close_to_float32(kv, top1, change):
    """What a byte per value costs a real trained model (teacher-forced over its own greedy
    stories, against a float32 cache): e4m3 keeps 3 mantissa bits, e5m2 2, so e4m3 stays closer
    (measured: top-1 97% and 91%, mean change 0.18 and 0.35 nats; bfloat16's: 99.8%, 0.011)."""
    prompts = ["Once upon a time", "The little dog", "One day, a boy named Tom", "Lily wanted to"]
    full, narrow = (LLM(STORIES, device="cpu", kv_cache_dtype=d) for d in ("auto", kv))
    assert narrow.engine.runner.cache.dtype == FP8[kv]
    q = llm_agreement(full, narrow, prompts, greedy_tokens=100)
    assert q["positions"] > 300
    assert 1e-3 < q["mean_abs_logprob_change"] < change, q
    assert q["top1_agreement"] >= top1, q

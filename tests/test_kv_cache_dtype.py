"""`kv_cache_dtype`: a bfloat16 KV cache under a float32 model on the CPU (twice the tokens per
byte, half the bytes for decode attention to read). The kernels' reads and writes of it are tested
in test_ops_attention.py and test_cpu_decode.py; here, what the engine plans, what it refuses, and
what the rounding does to a real model's answers."""

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


def test_a_bfloat16_kv_cache_holds_twice_the_blocks(hf_checkpoint):
    """The same kv_cache_memory plans twice the blocks (and tokens) in bfloat16; 'auto' is the
    model's dtype."""
    model = load_model(hf_checkpoint("llama")[1], "float32", "cpu")
    engines = {kv: LLMEngine(model, None, EngineConfig(kv_cache_memory=1 << 20, kv_cache_dtype=kv))
               for kv in ("auto", "float32", "bfloat16")}
    assert engines["auto"].kv_cache_dtype == engines["float32"].kv_cache_dtype == torch.float32
    assert engines["bfloat16"].num_blocks == 2 * engines["float32"].num_blocks
    cache = engines["bfloat16"].runner.cache
    assert cache.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in (*cache.k, *cache.v))
    assert engines["bfloat16"].scheduler.kv.pool.num_blocks == engines["bfloat16"].num_blocks


def test_kv_cache_dtype_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16, got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    # On CUDA the Triton kernels and the CUDA graphs read the cache in the model's dtype.
    gpu_model = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda"))
    assert _kv_cache_dtype("auto", gpu_model) == _kv_cache_dtype("bfloat16", gpu_model) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype='float32': on cuda the KV cache is held in the model's dtype"):
        _kv_cache_dtype("float32", gpu_model)
    # On the CPU the one other cache is bfloat16 under float32: a wider cache only costs memory.
    cpu_bf16_model = SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="kv_cache_dtype='float32' under a bfloat16 model"):
        _kv_cache_dtype("float32", cpu_bf16_model)
    fp16_model = SimpleNamespace(dtype=torch.float16, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="bfloat16 under float32 only"):
        _kv_cache_dtype("bfloat16", fp16_model)
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

"""The fused CPU decode forward (`decode_forward.cpp`) against the op-by-op path it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FAMILIES,
    LORA_MODULES,
    MOE_FAMILIES,
    assert_same_generations,
    make_hf_model,
    save_adapter,
    save_hf_model,
)

from lengthwise import SamplingParams, load_model
from lengthwise.config import EngineConfig
from lengthwise.engine.llm import run_to_completion
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model.int4 import quantize_int4
from lengthwise.model.quantize import quantize_int8
from lengthwise.ops import AttentionMetadata
from lengthwise.ops import cpu as cpu_kernels
from lengthwise.ops.attention import to_fp8
from lengthwise.ops.cpu import decode as cpu_decode

pytestmark = pytest.mark.skipif(cpu_kernels.segment_attention_kernel() is None,
                                reason="the CPU kernels could not be built here (no C++ compiler?)")


FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8, "int4": cpu_kernels.INT4,
           "int4-g32": cpu_kernels.INT4}


def _packed(w: torch.Tensor, fmt: str) -> tuple[cpu_kernels.PackedWeight, torch.Tensor]:
    """`w` packed in format `fmt`, with the float32 weight that stands for (int4: groups of 128
    inputs, or 32 for "int4-g32": several groups per k-block, and a short last group)."""
    if fmt == "float32":
        return cpu_kernels.pack_panels(w), w
    if fmt == "bfloat16":
        return cpu_kernels.pack_panels(w.bfloat16()), w.bfloat16().float()
    if fmt == "int8":
        q = quantize_int8(w)
        return cpu_kernels.pack_panels(q.q, q.scales), q.dequantize()
    return _packed_int4(w, 32 if fmt == "int4-g32" else 128)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 12, 13, 30, 64, 200])
@pytest.mark.parametrize("k, n", [(768, 64), (37, 5), (16, 1), (300, 70)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_packed_linear_matches_f_linear(fmt, m, k, n, with_bias):
    """The fused path's GEMM in each weight format: row chunks of every size up to 12 (4-bit: the
    few-row kernel up to 4 rows, then the dequantized k-blocks), k past one k-block, n past panels
    (and not a multiple of 16 within one)."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    packed, reference = _packed(w, fmt)
    assert packed.n == n and packed.k == k and packed.dtype == FORMATS[fmt]
    got = cpu_kernels.packed_linear(x, packed, b)
    torch.testing.assert_close(got, F.linear(x, reference, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_long_prefill_products_unpack_for_mkl_with_the_same_result(fmt, with_bias, monkeypatch):
    """`linear` on packed weights: from `DENSE_FROM_ROWS` rows (float32 768, bfloat16 and int8
    1536) the weight is unpacked for MKL, below it the panels run; 4-bit panels always run; the
    LENGTHWISE_DENSE_ROWS switch moves the threshold (0: never). Either way the product is the
    weight's."""
    import importlib

    linear_module = importlib.import_module("lengthwise.ops.linear")  # (the package exports the function)
    calls = []
    real = linear_module.packed_linear
    monkeypatch.setattr(linear_module, "packed_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(70, 96, generator=g), torch.randn(70, generator=g) if with_bias else None
    packed, reference = _packed(w, fmt)
    threshold = linear_module.DENSE_FROM_ROWS.get(packed.dtype)
    for m in (1, 767, 768, 1536):
        x = torch.randn(m, 96, generator=g)
        torch.testing.assert_close(linear_module.linear(x, packed, b), F.linear(x, reference, b), rtol=1e-5,
                                   atol=1e-4)
    assert calls == [m for m in (1, 767, 768, 1536) if threshold is None or m < threshold]
    calls.clear()
    monkeypatch.setenv(linear_module.DENSE_ROWS_ENV, "0")
    linear_module.linear(torch.randn(1536, 96), packed)
    monkeypatch.setenv(linear_module.DENSE_ROWS_ENV, "2")
    linear_module.linear(torch.randn(2, 96), packed)
    assert calls == [1536] + ([] if threshold is not None else [2])


@pytest.mark.parametrize("group_size", [96, 200, 512, 1000])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 7, 40])
def test_int4_groups_that_straddle_k_blocks(group_size, m):
    """4-bit groups that do not divide the kernel's 256-input k-blocks (a group split between two
    blocks), one longer than a block, one longer than k; and no rows at all. (Up to 4 rows the
    kernel sums x * q, q in [0, 15], over a whole group and applies the zero point at its end: over
    groups of 512 its float32 rounding reaches about 1e-4 of the outputs, a few times that of the
    product on the dequantized weights; 4-bit rounding itself is ~1e-2.)"""
    g = torch.Generator().manual_seed(group_size + m)
    x, w = torch.randn(m, 600, generator=g), torch.randn(45, 600, generator=g)
    packed, reference = _packed_int4(w, group_size)
    got = cpu_kernels.packed_linear(x, packed)
    assert got.shape == (m, 45)
    torch.testing.assert_close(got, F.linear(x, reference), rtol=1e-4, atol=3e-4)
    torch.testing.assert_close(packed.unpack(), reference, rtol=0, atol=1e-6)


def _packed_int4(w: torch.Tensor, group_size: int) -> tuple[cpu_kernels.PackedWeight, torch.Tensor]:
    q = quantize_int4(w, group_size=group_size)
    return cpu_kernels.pack_int4_panels(q.q, q.scales, q.zeros, q.group_size), q.dequantize()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n, k", [(64, 8), (70, 37), (1, 5)])
def test_unpack_gives_back_the_packed_weight(fmt, n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    packed, reference = _packed(w, fmt)
    torch.testing.assert_close(packed.unpack(), reference, rtol=0, atol=1e-6 if fmt.startswith("int4") else 0)


def test_loaded_cpu_models_hold_their_projections_once(hf_checkpoint, monkeypatch):
    """On the CPU the loader packs the projections and the LM head and drops their dense copies; the
    model keeps the checkpoint's parameters (counted as transformers counts them) and its outputs.
    `LENGTHWISE_CPU_PACKED_WEIGHTS=0` keeps them dense (the fused path then packs a second copy)."""
    hf, path = hf_checkpoint("qwen2")  # untied LM head, biases
    packed = load_model(path, "float32", "cpu")
    monkeypatch.setenv(cpu_decode.PACKED_WEIGHTS_ENV, "0")
    plain = load_model(path, "float32", "cpu")
    assert cpu_decode.is_packed(packed) and not cpu_decode.is_packed(plain)
    layer = packed.layers[0]
    assert isinstance(layer.qkv_weight, cpu_kernels.PackedWeight) and len(layer.gate_up_weight) == 2
    assert isinstance(packed.lm_head, cpu_kernels.PackedWeight)
    dense_count = sum(p.numel() for p in packed.parameters())
    assert dense_count == sum(p.numel() for n, p in plain.named_parameters()
                              if not n.endswith(cpu_decode.PROJECTIONS) and n != "lm_head")
    n_hf = sum(p.numel() for p in hf.parameters())
    assert packed.num_parameters() == plain.num_parameters() == n_hf
    for name in cpu_decode.PROJECTIONS:
        assert torch.equal(cpu_kernels.dense(getattr(layer, name)), getattr(plain.layers[0], name))
    # every path on the packed model matches the dense one: prefill (op-by-op) and decode (fused)
    prompts, params = [list(range(5, 40)), [7, 8, 9]], SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)
    outs = [run_to_completion(LLMEngine(m, None, EngineConfig(block_size=4)), prompts, [params] * 2)
            for m in (packed, plain)]
    assert_same_generations(outs[0], outs[1], logprob_tol=1e-4)
    cpu_decode.unpack_model(packed)
    assert not cpu_decode.is_packed(packed)
    for name in cpu_decode.PROJECTIONS:
        assert torch.equal(getattr(packed.layers[0], name), getattr(plain.layers[0], name))
    assert torch.equal(packed.lm_head, plain.lm_head)


def test_panel_bytes_per_format():
    """bfloat16 panels take half the bytes of float32 ones, int8 a quarter (plus a scale per column,
    padded to whole panels) and 4-bit an eighth (plus a scale and offset per column and group):
    what a batch-1 step streams."""
    w = torch.randn(64, 256)
    i8, i4 = _packed(w, "int8")[0], _packed(w, "int4")[0]
    assert (_packed(w, "float32")[0].nbytes, _packed(w, "bfloat16")[0].nbytes, i8.nbytes, i4.nbytes) == (
        64 * 256 * 4, 64 * 256 * 2, 64 * 256 + 64 * 4, 64 * 256 // 2 + 64 * 2 * 2 * 4)


def test_pack_panels_rejects_what_it_cannot_pack():
    with pytest.raises(ValueError, match="pack_panels"):
        cpu_kernels.pack_panels(torch.randn(4, 8).t())
    with pytest.raises(ValueError, match="pack_panels"):
        cpu_kernels.pack_panels(torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="scales"):
        cpu_kernels.pack_panels(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="scales"):
        cpu_kernels.pack_panels(torch.randn(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        cpu_kernels.pack_panels(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5))
    q = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        cpu_kernels.pack_int4_panels(q.float(), torch.ones(4, 1), torch.zeros(4, 1), 8)
    with pytest.raises(ValueError, match=r"scales, zeros \[4, 2\]"):
        cpu_kernels.pack_int4_panels(q, torch.ones(4, 1), torch.zeros(4, 1), 4)
    with pytest.raises(ValueError, match="above 15"):
        cpu_kernels.pack_int4_panels(q + 16, torch.ones(4, 1), torch.zeros(4, 1), 8)


def _segments(model, g: torch.Generator, block_size: int = 4, kv_dtype: torch.dtype | None = None):
    """A decode step over a cache holding random keys and values: six rows, two of which share one
    prompt segment (samples of one request), with prompt and response segments of different,
    non-block-multiple lengths, in scattered blocks. Returns (ids, positions, meta, cache)."""
    cache = model.new_kv_cache(num_blocks=64, block_size=block_size, dtype=kv_dtype)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    free = torch.randperm(64, generator=g).tolist()

    def blocks(n: int) -> list[int]:
        return [free.pop() for _ in range(-(-n // block_size))]

    shared = blocks(9)
    # (prompt blocks, prompt len, response len): the last token of the response is the new one
    rows = [(shared, 9, 3), (shared, 9, 6), (blocks(5), 5, 1), (blocks(17), 17, 12), (blocks(2), 2, 4),
            (blocks(30), 30, 1)]
    resp = [blocks(r) for _, _, r in rows]
    width = max(len(b) for b in [*resp, *(p for p, _, _ in rows)])
    pad = lambda b: b + [0] * (width - len(b))  # noqa: E731
    slots = [rb[(r - 1) // block_size] * block_size + (r - 1) % block_size
             for rb, (_, _, r) in zip(resp, rows, strict=True)]
    meta = AttentionMetadata(list(range(len(rows) + 1)), torch.tensor(slots), block_size,
                             torch.tensor([pad(p) for p, _, _ in rows]), [p for _, p, _ in rows],
                             torch.tensor([pad(b) for b in resp]), [r for _, _, r in rows])
    positions = torch.tensor([p + r - 1 for _, p, r in rows])
    ids = torch.randint(3, model.config.vocab_size, (len(rows),), generator=g)
    return ids, positions, meta, cache


def _odd_checkpoint(tmp_path, dtype: torch.dtype = torch.float32):
    # Rows that are not multiples of 16 floats (the kernels' masked tails) and three query heads per KV head.
    hf = make_hf_model("llama", hidden_size=72, intermediate_size=100, num_attention_heads=3,
                       num_key_value_heads=1, head_dim=24)
    return save_hf_model(hf.to(dtype), tmp_path / f"odd-{dtype}")


def _bf16_checkpoint(family: str, tmp_path):
    """`family`'s test model saved in bfloat16, as real checkpoints are (its weights, served in
    float32, are all bfloat16 values)."""
    return save_hf_model(make_hf_model(family).to(torch.bfloat16), tmp_path / f"{family}-bf16")


def _panel_dtypes(model) -> set[torch.dtype]:
    """The dtypes the fused path packed `model`'s projections in (after a fused step)."""
    return {packed.dtype for packed in model._cpu_decode_pointers.keep}


@pytest.mark.parametrize("family,weights", [
    *((f, w) for f in (*FAMILIES, "odd-sizes") for w in ("float32", "bf16-checkpoint", "int8", "int4")),
    # (int8 and int4 are refused for experts: test_moe.py)
    *((f, w) for f in MOE_FAMILIES for w in ("float32", "bf16-checkpoint"))])
def test_fused_step_matches_op_by_op(family, weights, hf_checkpoint, tmp_path, monkeypatch):
    """The fused step against the op-by-op path on the same weights: float32 ones, a bfloat16
    checkpoint (packed as bfloat16 panels) and int8- or int4-quantized ones (int8 or 4-bit
    panels; the op-by-op path runs on the dequantized weights)."""
    if family == "odd-sizes":
        path = _odd_checkpoint(tmp_path, torch.bfloat16 if weights == "bf16-checkpoint" else torch.float32)
    elif weights == "bf16-checkpoint":
        path = _bf16_checkpoint(family, tmp_path)
    else:
        path = hf_checkpoint(family)[1]
    model = load_model(path, "float32", "cpu", quantization=weights if weights.startswith("int") else None)
    ids, positions, meta, cache = _segments(model, torch.Generator().manual_seed(3))
    assert cpu_decode.eligible(model, ids.shape[0])
    slots = meta.slot_mapping
    results = {}
    for fused in ("1", "0", "torch"):  # torch: the reference ops on the weights unpacked, F.linear
        if fused == "torch":
            monkeypatch.setenv("LENGTHWISE_KERNELS", "torch")
        else:
            monkeypatch.setenv(cpu_decode.FUSED_ENV, fused)
        for t in (*cache.k, *cache.v):
            t[slots] = float("nan")  # poisoned: each run must write every new key and value itself
        hidden = model(ids, positions, AttentionMetadata(meta.query_start, slots, meta.block_size,
                                                         meta.prompt_block_tables, meta.prompt_lens,
                                                         meta.response_block_tables, meta.response_lens), cache)
        results[fused] = (hidden, [t[slots].clone() for t in (*cache.k, *cache.v)])
    (h1, kv1), (h0, kv0) = results["1"], results["0"]
    assert torch.isfinite(h1).all()
    for h, kv in (results["0"], results["1"]):
        torch.testing.assert_close(h, results["torch"][0], rtol=1e-4, atol=1e-4)
        for a, b in zip(kv, results["torch"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    expected = {"float32": torch.float32, "bf16-checkpoint": torch.bfloat16, "int8": torch.int8,
                "int4": cpu_kernels.INT4}[weights]
    assert _panel_dtypes(model) == {expected}
    assert model._cpu_decode_pointers.lm_head.dtype == (torch.float32 if weights.startswith("int") else expected)
    torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv1, kv0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# The decode step's six rows (_segments) of adapter "a" and of adapter "b" (None: every row); the
# rest use the base model.
LORA_ROWS = {"mixed": ([0, 1, 2, 3, 5], [4]), "with-base": ([3, 0], [5]), "all": (None,), "one-row": ([2],)}


@pytest.mark.parametrize("family,rows", [("llama", "mixed"), ("llama", "with-base"), ("llama", "all"),
                                         ("llama", "one-row"), ("qwen3", "mixed"), ("odd-sizes", "with-base"),
                                         ("qwen2-moe", "with-base")])
def test_fused_step_with_lora_adapters_matches_op_by_op(family, rows, hf_checkpoint, tmp_path, monkeypatch):
    """LoRA inside the fused step (lora.h) against the op-by-op path's updates, on steps mixing
    adapters and the base model: ranks that are not multiples of 16 (per-module ranks, one above
    16), an adapter on q/v/down only (block-diagonal q/k/v with k absent), five rows of one adapter
    (more than one chunk of rows), one adapted row on three threads (its shrink split along k in
    three parts), q/k/v blocks that do not start on a vector (qwen3's 24-wide KV heads), widths
    with masked tails (odd-sizes), and attention-only adapters of a mixture-of-experts model (its
    sparse layers have no MLP updates)."""
    from lengthwise.lora import LoRARequest
    from lengthwise.lora.adapter import load_adapter
    from lengthwise.ops.lora import LoRABatch

    if family == "odd-sizes":
        import transformers

        path = _odd_checkpoint(tmp_path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    else:
        hf, path = hf_checkpoint(family)
    model = load_model(path, "float32", "cpu")
    modules = ("q_proj", "k_proj", "v_proj", "o_proj") if model.config.moe else LORA_MODULES
    first = save_adapter(tmp_path / "a", hf, seed=1, rank=5, modules=modules, rank_pattern={"q_proj": 3})
    second = save_adapter(tmp_path / "b", hf, seed=2, rank=20, alpha=10.0,
                          modules=tuple(m for m in ("q_proj", "v_proj", "down_proj") if m in modules))
    adapters = [load_adapter(LoRARequest(name, i + 1, str(d)), model.config, torch.float32, torch.device("cpu"), 32)
                for i, (name, d) in enumerate((("a", first), ("b", second)))]
    ids, positions, meta, cache = _segments(model, torch.Generator().manual_seed(3))
    groups = [(a.weights, None if r is None else torch.tensor(r))
              for a, r in zip(adapters, LORA_ROWS[rows], strict=False)]
    slots = meta.slot_mapping
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(3 if rows == "one-row" else threads)
    try:
        for fused, lora in (("1", LoRABatch(groups)), ("0", LoRABatch(groups)), ("1", None)):
            monkeypatch.setenv(cpu_decode.FUSED_ENV, fused)
            for t in (*cache.k, *cache.v):
                t[slots] = float("nan")
            hidden = model(ids, positions, AttentionMetadata(meta.query_start, slots, meta.block_size,
                                                             meta.prompt_block_tables, meta.prompt_lens,
                                                             meta.response_block_tables, meta.response_lens),
                           cache, lora)
            results[fused, lora is None] = (hidden, [t[slots].clone() for t in (*cache.k, *cache.v)])
    finally:
        torch.set_num_threads(threads)
    (h1, kv1), (h0, kv0), (base, _) = results["1", False], results["0", False], results["1", True]
    assert model._cpu_decode_pointers is not None  # the fused path ran
    torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv1, kv0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    adapted = {r for _, rs in groups for r in (range(6) if rs is None else rs.tolist())}
    for r in range(6):  # the adapters change their rows, and only theirs
        assert (h1[r] - base[r]).abs().max() > 1e-3 if r in adapted else torch.equal(h1[r], base[r])
    # The kernels read the loader's own (transposed) A and B: no second copy of an adapter.
    held = {t.data_ptr() for layer in adapters[0].layers for w in layer.values() for t in (w.a, w.b)}
    assert {t.data_ptr() for t in adapters[0].weights.derived["cpu_fused"].keep} == held


# The spacing of each narrow KV cache dtype's values relative to a value (its significant bits),
# and its smallest subnormal (the absolute spacing below the smallest normal).
KV_ULP = {torch.bfloat16: 2.0 ** -7, torch.float8_e4m3fn: 2.0 ** -3, torch.float8_e5m2: 2.0 ** -2}
KV_TINY = {torch.bfloat16: 1e-6, torch.float8_e4m3fn: 2.0 ** -9, torch.float8_e5m2: 2.0 ** -16}


def _narrowed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (to_fp8(x, dtype) if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else x.to(dtype)).float()


# bfloat16 on every family; float8 on one dense, one sparse and the odd-sized one (the kernels' paths).
NARROW_CASES = [*((f, torch.bfloat16) for f in (*FAMILIES, *MOE_FAMILIES, "odd-sizes")),
                *((f, fp8) for f in ("llama", "qwen3-moe", "odd-sizes") for fp8 in (torch.float8_e4m3fn,
                                                                                  torch.float8_e5m2))]


@pytest.mark.parametrize("family, narrow", NARROW_CASES)
def test_fused_step_over_a_narrow_kv_cache(family, narrow, hf_checkpoint, tmp_path, monkeypatch):
    """kv_cache_dtype="bfloat16", "fp8" and "fp8_e5m2": the fused step, the op-by-op path and the
    torch reference write the same new keys and values (1 ulp apart at most, where float32 paths
    differ in the last bit), layer 0's the roundings of what a float32 cache gets, and read them
    back alike."""
    path = _odd_checkpoint(tmp_path) if family == "odd-sizes" else hf_checkpoint(family)[1]
    model = load_model(path, "float32", "cpu")
    results = {}
    for kv_dtype in (torch.float32, narrow):
        ids, positions, meta, cache = _segments(model, torch.Generator().manual_seed(3), kv_dtype=kv_dtype)
        assert cache.k[0].dtype == kv_dtype
        slots = meta.slot_mapping
        for path_ in ("1", "0", "torch"):
            monkeypatch.delenv("LENGTHWISE_KERNELS", raising=False)
            if path_ == "torch":
                monkeypatch.setenv("LENGTHWISE_KERNELS", "torch")
            else:
                monkeypatch.setenv(cpu_decode.FUSED_ENV, path_)
            for t in (*cache.k, *cache.v):
                t[slots] = float("nan")
            hidden = model(ids, positions, meta, cache)
            results[kv_dtype, path_] = (hidden, [t[slots].float() for t in (*cache.k, *cache.v)])
    ulp = KV_ULP[narrow]
    for path_ in ("1", "0"):
        h, kv = results[narrow, path_]
        href, kvref = results[narrow, "torch"]
        assert torch.isfinite(h).all()
        torch.testing.assert_close(h, href, rtol=1e-3, atol=1e-3)
        for a, b in zip(kv, kvref, strict=True):
            torch.testing.assert_close(a, b, rtol=ulp, atol=KV_TINY[narrow])
        # layer 0's keys and values come before any attention read the cache: the float32 cache's, rounded
        f = results[torch.float32, path_][1]
        layers = len(model.layers)
        for i in (0, layers):  # k[0], v[0]
            torch.testing.assert_close(kv[i], _narrowed(f[i], narrow), rtol=ulp, atol=1e-6)
    # the cache's rounding shows in the outputs, a little: against the float32 cache's step
    h32, hn = results[torch.float32, "1"][0], results[narrow, "1"][0]
    assert 0 < (h32 - hn).abs().max() < (0.1 if narrow == torch.bfloat16 else 0.5) * h32.abs().max()


@pytest.mark.parametrize("family", ["llama", "mistral-sliding", "qwen3"])
def test_fused_chunked_prefill_matches_op_by_op(family, hf_checkpoint, monkeypatch):
    """Several new tokens per sequence (short prefill chunks): causal within the chunk."""
    model = load_model(hf_checkpoint(family)[1], "float32", "cpu")
    bs, g = 4, torch.Generator().manual_seed(5)
    cache = model.new_kv_cache(num_blocks=32, block_size=bs)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    # (prompt blocks, prompt length, new tokens at its end): a chunk after 7 cached tokens, a decode
    # row, a fresh 9-token prompt
    seqs = [([3, 9, 0], 12, 5), ([5, 6], 6, 1), ([11, 2, 7], 9, 9)]
    slots = [blk[i // bs] * bs + i % bs for blk, p, n in seqs for i in range(p - n, p)]
    positions = torch.tensor([i for _, p, n in seqs for i in range(p - n, p)])
    qs = [0, 5, 6, 15]
    tables = torch.tensor([blk + [0] * (3 - len(blk)) for blk, _, _ in seqs])
    ids = torch.randint(3, model.config.vocab_size, (15,), generator=g)
    assert cpu_decode.eligible(model, 15, max_query_len=9)
    out = {}
    for fused in ("1", "0"):
        monkeypatch.setenv(cpu_decode.FUSED_ENV, fused)
        meta = AttentionMetadata(qs, torch.tensor(slots), bs, tables, [p for _, p, _ in seqs])
        out[fused] = model(ids, positions, meta, cache)
    torch.testing.assert_close(out["1"], out["0"], rtol=1e-4, atol=1e-4)


def test_not_eligible_where_the_kernel_does_not_apply(hf_checkpoint, monkeypatch):
    model = load_model(hf_checkpoint("llama")[1], "float32", "cpu")
    assert cpu_decode.eligible(model, 1)
    assert not cpu_decode.eligible(model, cpu_decode.max_rows() + 1)  # large steps: MKL's GEMMs
    assert cpu_decode.eligible(model, 20, max_query_len=cpu_decode.MAX_QUERY_LEN)
    assert not cpu_decode.eligible(model, 20, max_query_len=cpu_decode.MAX_QUERY_LEN + 1)  # long prefill: SDPA
    monkeypatch.setenv(cpu_decode.MAX_ROWS_ENV, "2")
    assert not cpu_decode.eligible(model, 3)
    monkeypatch.setenv(cpu_decode.MAX_ROWS_ENV, "two")
    with pytest.raises(ValueError, match=cpu_decode.MAX_ROWS_ENV):
        cpu_decode.max_rows()
    monkeypatch.delenv(cpu_decode.MAX_ROWS_ENV)
    monkeypatch.setenv(cpu_decode.FUSED_ENV, "0")
    assert not cpu_decode.eligible(model, 1)
    monkeypatch.setenv(cpu_decode.FUSED_ENV, "1")
    monkeypatch.setenv("LENGTHWISE_KERNELS", "torch")  # the reference path stays pure torch
    assert not cpu_decode.eligible(model, 1)
    monkeypatch.setenv("LENGTHWISE_KERNELS", "triton")  # and a request for Triton gets Triton
    assert not cpu_decode.eligible(model, 1)
    monkeypatch.delenv("LENGTHWISE_KERNELS")
    assert not cpu_decode.eligible(load_model(hf_checkpoint("llama")[1], "bfloat16", "cpu"), 1)


def test_bf16_panels_give_the_float32_panels_results_bit_for_bit(tmp_path, monkeypatch):
    """A bfloat16 checkpoint's weights are bfloat16 values, so packing them as bfloat16 halves the
    bytes without changing a single product: the step's outputs are identical."""
    path = _bf16_checkpoint("qwen2", tmp_path)
    out = {}
    for bf16 in ("1", "0"):
        monkeypatch.setenv(cpu_decode.BF16_PANELS_ENV, bf16)  # read when the loader packs the weights
        model = load_model(path, "float32", "cpu")
        ids, positions, meta, cache = _segments(model, torch.Generator().manual_seed(4))
        hidden = model(ids, positions, meta, cache)
        out[bf16] = (hidden, model.compute_logits(hidden), _panel_dtypes(model))
        assert model.embed.dtype == (torch.bfloat16 if bf16 == "1" else torch.float32)
    assert out["1"][2] == {torch.bfloat16} and out["0"][2] == {torch.float32}
    assert torch.equal(out["1"][0], out["0"][0]) and torch.equal(out["1"][1], out["0"][1])


def test_gate_and_up_share_one_panel_format(tmp_path, monkeypatch):
    """A bfloat16 gate half beside an up half that is not (a float32-merged fine-tune of up_proj):
    both halves stay float32, since the fused path reads them in one format; decode still matches."""
    hf = make_hf_model("llama").to(torch.bfloat16).float()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.up_proj.weight.add_(1e-4 * torch.randn_like(layer.mlp.up_proj.weight))
    model = load_model(save_hf_model(hf, tmp_path / "mixed"), "float32", "cpu")
    gate, up = model.layers[0].gate_up_weight
    assert gate.dtype == up.dtype == torch.float32 and model.layers[0].qkv_weight.dtype == torch.bfloat16
    ids, positions, meta, cache = _segments(model, torch.Generator().manual_seed(6))
    fused = model(ids, positions, meta, cache)
    monkeypatch.setenv(cpu_decode.FUSED_ENV, "0")
    torch.testing.assert_close(fused, model(ids, positions, meta, cache), rtol=1e-4, atol=1e-4)


def test_a_tied_bf16_checkpoint_keeps_one_narrow_embedding(tmp_path):
    """Tied, the head is packed beside the embedding, which stays a bfloat16 parameter shared by
    `lm_head`; unpacking widens both again (the dense layout's invariant: weights in the model's dtype)."""
    model = load_model(_bf16_checkpoint("llama-tied-mqa", tmp_path), "float32", "cpu")
    assert model.embed.dtype == torch.bfloat16 and model.lm_head is model.embed
    assert model.head_panels.dtype == torch.bfloat16
    ids = torch.tensor([3, 7])
    assert model.embed_tokens(ids).dtype == torch.float32
    before = model.embed_tokens(ids)
    cpu_decode.unpack_model(model)
    assert model.embed.dtype == torch.float32 and model.lm_head is model.embed
    assert torch.equal(model.embed_tokens(ids), before)


@pytest.mark.parametrize("packed, quantization, kv_cache_dtype", [
    ("1", None, "auto"), ("0", None, "auto"), ("1", "int8", "auto"), ("0", "int8", "auto"), ("1", "int4", "auto"),
    ("0", "int4", "auto"), ("1", None, "bfloat16"), ("1", None, "fp8"), ("1", "int4", "fp8_e5m2")])
def test_engine_generations_equal_with_and_without_the_fused_path(quantization, packed, kv_cache_dtype,
                                                                  hf_checkpoint, monkeypatch):
    """Whole requests through the engine (prefill op-by-op, decode fused), samples sharing a prompt;
    with the weights held as panels (the default) or dense (the fused path packs its own copy;
    quantized, the op-by-op path then runs on the dequantized weights); with a float32, bfloat16 or
    float8 KV cache."""
    monkeypatch.setenv(cpu_decode.PACKED_WEIGHTS_ENV, packed)
    model = load_model(hf_checkpoint("qwen3")[1], "float32", "cpu", quantization=quantization)
    assert cpu_decode.is_packed(model) == (packed == "1")
    prompts = [list(range(5, 75)), [7, 8, 9], list(range(20, 43))]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=2, n=n)
              for m, n in ((20, 1), (9, 2), (14, 1))]
    calls = []
    real = cpu_decode.forward
    monkeypatch.setattr(cpu_decode, "forward", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    outs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv(cpu_decode.FUSED_ENV, fused)
        config = EngineConfig(block_size=4, max_num_seqs=8, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
        engine = LLMEngine(model, None, config)
        assert engine.runner.cache.k[0].dtype == {"auto": torch.float32, "bfloat16": torch.bfloat16, "fp8":
                                                  torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
        outs[fused] = run_to_completion(engine, prompts, params)
        if fused == "1":
            assert calls and max(calls) <= cpu_decode.max_rows()
            n_calls = len(calls)
    assert len(calls) == n_calls  # switched off, nothing took the fused path
    # (a bfloat16 cache: where the two paths' float32 keys differ in the last bit, their roundings
    # can differ by one bfloat16 ulp)
    assert_same_generations(outs["1"], outs["0"], logprob_tol=1e-4 if kv_cache_dtype == "auto" else 2e-3)

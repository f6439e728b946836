"""The Triton kernels against the torch reference, on fresh random inputs.

With a CUDA GPU the compiled kernels run on it; without one they run on the CPU under Triton's
interpreter: the `kernels` fixture sets `TRITON_INTERPRET=1` for this module before the kernel
modules are imported (Triton decides at decoration time), and `test_kernels_run_where_expected`
checks that it took effect. Every output is poisoned with NaN before the kernel runs, and every
cache slot outside the contexts holds NaN, so a row not written or a key read from the wrong slot
shows up.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from lengthwise.ops import AttentionMetadata, paged_attention
from lengthwise.ops import triton as triton_ops
from lengthwise.ops.activation import silu_and_mul
from lengthwise.ops.dispatch import KERNELS_ENV, kernel_choice, use_triton
from lengthwise.ops.norm import rms_norm
from lengthwise.ops.rotary import apply_rotary, rotary_and_write_kv, rotary_cos_sin, rotary_inv_freq

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

DEVICE = "cuda" if CUDA else "cpu"
KERNEL_MODULES = {"norm": ["_rms_norm_kernel"], "activation": ["_silu_and_mul_kernel"], "linear": ["_gemv_kernel"],
                  "int4": ["_int4_linear_kernel"],
                  "rotary": ["_rotary_write_kernel"],  # before "fused", which calls its helper
                  "fused": ["_norm_qkv_rotary_kernel", "_norm_gate_up_silu_kernel"],
                  "attention": ["_decode_kernel", "_decode_reduce_kernel", "_prefill_kernel"]}
NAN = float("nan")
DTYPES = [torch.float32, torch.bfloat16]
ELEMENTWISE_DTYPES = [*DTYPES, torch.float16]
# Elementwise kernels: float32 near-exact; bf16 within two units in the last place. (The 3.9
# interpreter casts float32 to bf16 by truncation where compiled code rounds to nearest even.)
ELEMENTWISE_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
                   torch.float16: dict(atol=1e-3, rtol=2e-3)}
ATTENTION_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _modules():
    return {name: importlib.import_module(f"lengthwise.ops.triton.{name}") for name in KERNEL_MODULES}


def _interpreted(module, names) -> bool:
    return all(type(getattr(module, n)).__name__ == "InterpretedFunction" for n in names)


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules: compiled on CUDA; on the CPU interpreted, with `TRITON_INTERPRET=1` set
    while this module runs (a kernel module imported earlier without it is re-imported)."""
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        modules = _modules()
        for name, module in modules.items():
            if not CUDA and not _interpreted(module, KERNEL_MODULES[name]):
                modules[name] = importlib.reload(module)
        yield modules


@pytest.fixture(autouse=True)
def _setup(request, monkeypatch):
    # The dispatching ops below are the references; the kernels are called directly.
    monkeypatch.setenv(KERNELS_ENV, "torch")
    if "without_triton" not in request.node.name:
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        request.getfixturevalue("kernels")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dtype)


def _poisoned(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype, device=DEVICE)


def test_kernels_run_where_expected():
    for name, module in _modules().items():
        assert _interpreted(module, KERNEL_MODULES[name]) == (not CUDA), name
    assert _modules()["attention"].INTERPRETED == (not CUDA)
    if not CUDA:
        assert os.environ["TRITON_INTERPRET"] == "1"


def test_ops_work_without_triton():
    """Where triton does not import, the package still loads, dispatch picks the torch reference,
    and forcing Triton is a clear error."""
    code = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
import os, torch
from lengthwise.ops import rms_norm, silu_and_mul
from lengthwise.ops.dispatch import triton_available, use_triton
assert not triton_available() and not use_triton(torch.zeros(1))
x = torch.randn(3, 8)
rms_norm(x, torch.ones(8), 1e-6, x)
silu_and_mul(x)
os.environ["LENGTHWISE_KERNELS"] = "triton"
try:
    use_triton(x)
except ValueError as e:
    print(e)
"""
    env = {k: v for k, v in os.environ.items() if k not in (KERNELS_ENV, "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "triton does not import" in out.stdout


# --- elementwise kernels -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("case", ["residual", "no-residual", "qk-norm-view"])
def test_fused_add_rms_norm(dtype, case):
    g = _gen(1)
    if case == "qk-norm-view":  # q of a fused qkv output: a strided [T, heads, head_dim] view
        x = _randn(6, 5 * 24, g=g, dtype=dtype)[:, :96].view(6, 4, 24)
        w, residual = _randn(24, g=g, dtype=dtype, scale=0.2) + 1, None
    else:
        x, w = _randn(5, 100, g=g, dtype=dtype), _randn(100, g=g, dtype=dtype, scale=0.2) + 1
        residual = _randn(5, 100, g=g, dtype=dtype) if case == "residual" else None
    ref, ref_sum = rms_norm(x, w, 1e-6, residual)
    out = _poisoned(x.shape, dtype)
    got, got_sum = triton_ops.fused_add_rms_norm(x, w, 1e-6, residual, out=out)
    assert got is out
    torch.testing.assert_close(got, ref, **ELEMENTWISE_TOL[dtype])
    if residual is None:
        assert got_sum is x
    else:
        torch.testing.assert_close(got_sum, ref_sum, **ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("shape", [(7, 80), (2, 3, 2 * 300)])
def test_silu_and_mul(dtype, shape):
    x = _randn(*shape, g=_gen(2), dtype=dtype, scale=2.0)
    out = _poisoned((*shape[:-1], shape[-1] // 2), dtype)
    got = triton_ops.silu_and_mul(x, out=out)
    assert got is out
    torch.testing.assert_close(got, silu_and_mul(x), **ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, bias", [(7, 80, False), (100, 300, True), (1, 16, False)])
def test_gemv(dtype, n, k, bias):
    """The batch-1 linear: N and K not multiples of any tile, with and without bias."""
    from lengthwise.ops.linear import linear

    g = _gen(n * k)
    x, w = _randn(1, k, g=g, dtype=dtype), _randn(n, k, g=g, dtype=dtype, scale=0.1)
    b = _randn(n, g=g, dtype=dtype) if bias else None
    got = triton_ops.gemv(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (1, n) and got.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), ref, **tol)
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))  # dispatch: torch chosen here
    with pytest.raises(ValueError, match="gemv takes"):
        triton_ops.gemv(torch.cat([x, x]), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, split, bias", [(7, 300, 2, True), (100, 300, 3, False), (33, 1000, 8, True),
                                               (40, 70, 4, False)])
def test_gemv_split_k(dtype, n, k, split, bias):
    """Split-K: slices of K (the last one short, or empty when K has fewer tiles than splits) whose
    partials the last program of each row block adds in split order; the counters are back at zero
    after every launch, so a second launch gives the same bits."""
    linear_mod = importlib.import_module("lengthwise.ops.triton.linear")
    g = _gen(n * k + split)
    x, w = _randn(1, k, g=g, dtype=dtype), _randn(n, k, g=g, dtype=dtype, scale=0.1)
    b = _randn(n, g=g, dtype=dtype) if bias else None
    tile = {"BLOCK_N": 8, "BLOCK_K": 32, "SPLIT": split}
    part, count = linear_mod._splitk_workspace(x.device, n)
    part.fill_(NAN)  # stale partials must never be read
    got = triton_ops.gemv(x, w, b, tile=tile)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), ref, **tol)
    assert not bool(count.any())
    assert torch.equal(triton_ops.gemv(x, w, b, tile=tile), got)
    with pytest.raises(ValueError, match="SPLIT"):
        triton_ops.gemv(x, w, b, tile={"BLOCK_N": 8, "BLOCK_K": 32, "SPLIT": 99})


def _int4_weight(n: int, k: int, group_size: int, act_order: bool, g: torch.Generator):
    """A random 4-bit weight: values, scales, integral zeros and each input's group (act order: the
    groups' inputs scattered over k, as a desc_act GPTQ checkpoint numbers them)."""
    from lengthwise.ops.int4 import pack_int4

    groups = -(-k // group_size)
    g_idx = torch.arange(k) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = 0.01 + 0.05 * torch.rand(n, groups, generator=g)
    zeros = torch.randint(0, 16, (n, groups), generator=g).float()
    return pack_int4(q, scales, zeros, g_idx, DEVICE), (q.float() - zeros[:, g_idx]) * scales[:, g_idx]


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("m, n, k, group_size, act_order, bias", [
    (1, 40, 96, 32, False, True), (1, 33, 200, 200, True, False),  # the GEMV; one group a row
    (5, 48, 136, 64, True, True), (20, 66, 256, 128, False, False),  # tl.dot: 16 and 32 rows a program
    (70, 24, 64, 16, True, True)])  # 64 rows a program, a second (short) row block
def test_int4_linear(dtype, m, n, k, group_size, act_order, bias):
    """The W4A16 kernel against `x @ W^T` on the dequantized weight: M, N and K not multiples of the
    tile, groups in input order and in act order, with and without bias; the output poisoned. A
    16-bit model's dequantized weight is rounded to its dtype, as the kernel's tl.dot tile is."""
    from lengthwise.ops.int4 import PackedInt4
    from lengthwise.ops.linear import linear

    g = _gen(m * n * k + group_size)
    weight, w = _int4_weight(n, k, group_size, act_order, g)
    x = _randn(m, k, g=g, dtype=dtype)
    b = _randn(n, g=g, dtype=dtype) if bias else None
    out = _poisoned((m, n), dtype)
    got = triton_ops.int4_linear(x, weight, b, out)
    w_ref = w.to(DEVICE) if m == 1 else w.to(DEVICE, dtype).float()  # (the GEMV keeps float32 weights)
    ref = x.double() @ w_ref.double().t() + (0 if b is None else b.double())
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype and not got.isnan().any()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < tol
    assert isinstance(weight, PackedInt4) and torch.equal(weight.dequantize().cpu(), w)
    reference = linear(x, weight, b)  # the dispatch chose the torch reference here: it dequantizes
    assert ((reference.double() - ref).abs().max() / ref.abs().max()).item() < tol
    with pytest.raises(ValueError, match="int4_linear takes x"):
        triton_ops.int4_linear(x[:, :-1], weight)
    with pytest.raises(ValueError, match="out must be"):
        triton_ops.int4_linear(x, weight, out=out[:, :-1])


def test_int4_linear_dispatch(monkeypatch):
    """`linear` sends a 4-bit weight to the kernel wherever Triton runs (any number of rows, leading
    dimensions kept) and dequantizes it for the torch reference; the fused single-row kernels,
    which read dense weights, leave it to the op-by-op path."""
    from lengthwise.ops.fused import fused_single_row
    from lengthwise.ops.linear import linear

    weight, w = _int4_weight(24, 64, 32, False, _gen(3))
    x = _randn(2, 3, 64, g=_gen(4))
    reference = linear(x, weight)
    monkeypatch.setenv(KERNELS_ENV, "triton")
    got = linear(x, weight)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, x @ w.to(DEVICE).t(), atol=1e-5, rtol=1e-5)
    row = x[0, :1]
    assert fused_single_row(row, w.to(DEVICE)) and not fused_single_row(row, weight)


def _rotary_inputs(g, t, slots_total, heads, kv_heads, head_dim, dtype, scale=1.0):
    """q, k, v of `t` tokens as strided views of one qkv output, RoPE tables at random positions,
    and `t` distinct random slots of `slots_total`."""
    qkv = _randn(t, (heads + 2 * kv_heads) * head_dim, g=g, dtype=dtype, scale=scale)
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)
    positions = torch.randint(0, 500, (t,), generator=g).to(DEVICE)
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(head_dim, 10000.0).to(DEVICE), dtype)
    return q, k, v, cos, sin, torch.randperm(slots_total, generator=g)[:t].to(DEVICE)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 16), (8, 2, 24), (8, 1, 16)])
def test_rotary_and_write_kv(dtype, heads, kv_heads, head_dim):
    g, t, slots_total = _gen(3), 9, 64
    q, k, v, cos, sin, slots = _rotary_inputs(g, t, slots_total, heads, kv_heads, head_dim, dtype)
    cache_shape = (slots_total, kv_heads, head_dim)
    ref_k, ref_v = _poisoned(cache_shape, dtype), _poisoned(cache_shape, dtype)
    ref_q = rotary_and_write_kv(q, k, v, cos, sin, ref_k, ref_v, slots)  # the torch reference (dispatch: torch)
    torch.testing.assert_close(ref_q, apply_rotary(q, cos, sin))
    k_cache, v_cache = torch.full_like(ref_k, NAN), torch.full_like(ref_v, NAN)
    out = _poisoned(q.shape, dtype)
    got = triton_ops.rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, out=out)
    assert got is out
    tol = ELEMENTWISE_TOL[dtype]
    torch.testing.assert_close(got, ref_q, **tol)
    torch.testing.assert_close(k_cache, ref_k, equal_nan=True, **tol)  # untouched slots stay NaN
    assert torch.equal(v_cache.nan_to_num(), ref_v.nan_to_num()) and torch.equal(v_cache.isnan(), ref_v.isnan())
    # A negative slot (padding) rotates q but writes nothing.
    k_cache.fill_(NAN)
    pad = slots.clone()
    pad[0] = -1
    got = triton_ops.rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, pad)
    torch.testing.assert_close(got, ref_q, **tol)
    assert k_cache.isnan().sum() == (slots_total - t + 1) * kv_heads * head_dim


# Fixed small tiles for the fused single-row kernels: several programs and K tiles on these small
# shapes, and on a GPU one compile per case instead of autotuning each.
SMALL_TILE = {name: {name: 4, "BLOCK_K": 64} for name in ("BLOCK_P", "BLOCK_N")}


def _one_token_inputs(dtype, hidden, n, residual, bias, seed):
    """x, residual, norm weight, weight [n, hidden], bias for a single-row fused GEMV."""
    g = _gen(seed)
    x = _randn(1, hidden, g=g, dtype=dtype)
    res = _randn(1, hidden, g=g, dtype=dtype) if residual else None
    norm_w = _randn(hidden, g=g, dtype=dtype, scale=0.2) + 1
    w = _randn(n, hidden, g=g, dtype=dtype, scale=hidden ** -0.5)
    b = _randn(n, g=g, dtype=dtype, scale=0.5) if bias else None
    return x, res, norm_w, w, b


def _assert_fused_close(got: torch.Tensor, unfused: torch.Tensor, exact: torch.Tensor) -> None:
    """A fused single-row kernel's output against the ops one by one and a float64 evaluation of
    the same inputs. float32: the unfused result to rounding. bf16: the fused kernel skips the
    unfused ops' rounding of the normalised row, so it is held to a few bf16 units of the unfused
    result and to an error against float64 no larger than theirs (plus a margin for noise)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, unfused, **ELEMENTWISE_TOL[torch.float32])
        return
    torch.testing.assert_close(got, unfused, atol=4e-2, rtol=3e-2)
    mask = ~exact.isnan()
    err = (got.double() - exact)[mask].abs().mean()
    err_unfused = (unfused.double() - exact)[mask].abs().mean()
    assert err <= 1.25 * err_unfused + 1e-4, (float(err), float(err_unfused))


def _float64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _stored_sum(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """`x + residual` as both paths store it (rounded to the dtype), in float64: the exact
    evaluation's input, since that rounding is the residual stream's, not the kernel's."""
    return x.double() if residual is None else (x.float() + residual.float()).to(x.dtype).double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim, hidden", [(4, 4, 16, 80), (8, 2, 20, 100), (8, 1, 16, 64)])
@pytest.mark.parametrize("bias, residual", [(False, True), (True, False), (True, True)])
def test_norm_qkv_rotary_write(nearest_casts, dtype, heads, kv_heads, head_dim, hidden, bias, residual):
    """Residual add + RMSNorm + QKV GEMV + RoPE + KV write for one token against the ops one by one:
    GQA 1/4/8, hidden sizes and half head dims (10) that are not tile multiples, with and without
    bias and residual; only the token's slot is written; a negative slot writes nothing."""
    from lengthwise.ops import fused

    n = (heads + 2 * kv_heads) * head_dim
    x, res, norm_w, w, b = _one_token_inputs(dtype, hidden, n, residual, bias, seed=n + hidden + 2 * bias + residual)
    cos, sin = rotary_cos_sin(torch.tensor([37], device=DEVICE), rotary_inv_freq(head_dim, 1e4).to(DEVICE), dtype)
    slots, slot = 12, torch.tensor([5], device=DEVICE)
    shape = (slots, kv_heads, head_dim)
    ref_k, ref_v = _poisoned(shape, dtype), _poisoned(shape, dtype)
    # The reference: the dispatching op, which runs the torch ops one by one here (KERNELS=torch).
    ref_q, ref_sum = fused.norm_qkv_rotary_write(x, res, norm_w, 1e-6, w, b, cos, sin, ref_k, ref_v, slot)
    k_cache, v_cache, out = _poisoned(shape, dtype), _poisoned(shape, dtype), _poisoned((1, heads, head_dim), dtype)
    exact_k, exact_v = _poisoned(shape, torch.float64), _poisoned(shape, torch.float64)
    exact_q, _ = fused.norm_qkv_rotary_write(_stored_sum(x, res), None, norm_w.double(), 1e-6,
                                             *_float64(w, b, cos, sin), exact_k, exact_v, slot)
    q, total = triton_ops.norm_qkv_rotary_write(x, res, norm_w, 1e-6, w, b, cos, sin, k_cache, v_cache, slot, out=out,
                                                tile=SMALL_TILE["BLOCK_P"])
    assert q is out
    _assert_fused_close(q, ref_q, exact_q)
    assert int(k_cache.isnan().sum()) == int(v_cache.isnan().sum()) == (slots - 1) * kv_heads * head_dim
    _assert_fused_close(k_cache[5], ref_k[5], exact_k[5])
    _assert_fused_close(v_cache[5], ref_v[5], exact_v[5])
    torch.testing.assert_close(total, ref_sum, **ELEMENTWISE_TOL[dtype])
    k_cache.fill_(NAN)
    v_cache.fill_(NAN)
    q2, _ = triton_ops.norm_qkv_rotary_write(x, res, norm_w, 1e-6, w, b, cos, sin, k_cache, v_cache,
                                             torch.tensor([-1], device=DEVICE), tile=SMALL_TILE["BLOCK_P"])
    assert torch.equal(q2, q) and bool(k_cache.isnan().all()) and bool(v_cache.isnan().all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter, hidden", [(40, 80), (96, 100), (16, 64)])
@pytest.mark.parametrize("bias, residual", [(False, True), (True, False), (True, True)])
def test_norm_gate_up_silu(nearest_casts, dtype, inter, hidden, bias, residual):
    """Residual add + RMSNorm + gate-up GEMV + SiLU-and-mul for one token against the ops one by one."""
    from lengthwise.ops import fused

    x, res, norm_w, w, b = _one_token_inputs(dtype, hidden, 2 * inter, residual, bias,
                                             seed=inter + hidden + 2 * bias + residual)
    w[:inter] *= 3  # gates spread over silu's curved range
    ref, ref_sum = fused.norm_gate_up_silu(x, res, norm_w, 1e-6, w, b)
    out = _poisoned((1, inter), dtype)
    exact, _ = fused.norm_gate_up_silu(_stored_sum(x, res), None, norm_w.double(), 1e-6, *_float64(w, b))
    act, total = triton_ops.norm_gate_up_silu(x, res, norm_w, 1e-6, w, b, out=out, tile=SMALL_TILE["BLOCK_N"])
    assert act is out
    _assert_fused_close(act, ref, exact)
    torch.testing.assert_close(total, ref_sum, **ELEMENTWISE_TOL[dtype])


def test_fused_single_row_input_errors():
    x, res, norm_w, w, _ = _one_token_inputs(torch.float32, 32, 64, True, False, seed=5)
    with pytest.raises(ValueError, match=r"x must be \[1, 32\]"):
        triton_ops.norm_gate_up_silu(torch.cat([x, x]), None, norm_w, 1e-6, w, None)
    with pytest.raises(ValueError, match="pass norm_weight"):
        triton_ops.norm_gate_up_silu(x, res, None, 1e-6, w, None)
    cache = torch.zeros(4, 2, 16, device=DEVICE)
    cos = sin = torch.ones(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="not q, k and v heads"):
        triton_ops.norm_qkv_rotary_write(x, res, norm_w, 1e-6, w, None, cos, sin, cache, cache,
                                         torch.zeros(1, dtype=torch.long, device=DEVICE))


def _interpreter_casts_to_nearest(monkeypatch) -> bool:
    """Make the interpreter cast float32 to bf16 by rounding to nearest even, as compiled kernels
    do (the 3.9 interpreter truncates); False where this triton's interpreter cannot be patched."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        original = interpreter.InterpreterBuilder.cast_impl
    except (ImportError, AttributeError):
        return False

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
    return True


@pytest.fixture
def interpreter_rounds_to_nearest(monkeypatch):
    """bf16 casts round to nearest even, so bf16 results can be compared bit for bit; interpreter only."""
    if CUDA:
        pytest.skip("compiled kernels: their rounding needs no correction")
    if not _interpreter_casts_to_nearest(monkeypatch):
        pytest.skip("this triton's interpreter has no InterpreterBuilder.cast_impl to correct")


@pytest.fixture
def nearest_casts(monkeypatch):
    """bf16 casts round to nearest even, compiled (always) or interpreted (patched where possible)."""
    if not CUDA:
        _interpreter_casts_to_nearest(monkeypatch)


def test_bf16_elementwise_kernels_are_bit_exact(interpreter_rounds_to_nearest):
    """The kernels round where torch rounds (sum, normalised value, silu, each RoPE product and sum),
    so with round-to-nearest casts their bf16 outputs equal the reference's exactly."""
    g, dt = _gen(4), torch.bfloat16
    x, r = _randn(64, 256, g=g, dtype=dt), _randn(64, 256, g=g, dtype=dt)
    w = _randn(256, g=g, dtype=dt, scale=0.2) + 1
    assert all(torch.equal(a, b) for a, b in zip(triton_ops.fused_add_rms_norm(x, w, 1e-6, r),
                                                 rms_norm(x, w, 1e-6, r), strict=True))
    gate_up = _randn(64, 512, g=g, dtype=dt, scale=3.0)
    assert torch.equal(triton_ops.silu_and_mul(gate_up), silu_and_mul(gate_up))
    t, heads, kv_heads, d = 33, 8, 2, 64
    q, k, v = (_randn(t, n, d, g=g, dtype=dt) for n in (heads, kv_heads, kv_heads))
    cos, sin = rotary_cos_sin(torch.randint(0, 4000, (t,), generator=g), rotary_inv_freq(d, 500000.0), dt)
    slots = torch.randperm(100, generator=g)[:t]
    caches = [torch.zeros(100, kv_heads, d, dtype=dt) for _ in range(4)]
    got = triton_ops.rotary_and_write_kv(q, k, v, cos, sin, caches[0], caches[1], slots)
    assert torch.equal(got, rotary_and_write_kv(q, k, v, cos, sin, caches[2], caches[3], slots))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


# --- attention -----------------------------------------------------------------------------------

BLOCK = 4  # cache block size: no context below is a multiple of it


def _segment_case(heads, kv_heads, seqs, dtype, seed, head_dim=16, num_blocks=64):
    """Scattered, shuffled blocks; `seqs` = [(prompt_len, response_len, queries)], queries at the
    context's last positions. Slots outside every context hold NaN."""
    g = _gen(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-max(p, r) // BLOCK) for p, r, _ in seqs) + 1
    p_tables, r_tables, qs, q_pos, used = [], [], [0], [], []
    for p, r, n in seqs:
        pb = [free.pop() for _ in range(-(-p // BLOCK))]
        rb = [free.pop() for _ in range(-(-r // BLOCK))]
        p_tables.append(pb + [free[0]] * (width - len(pb)))  # pad with a block holding NaN
        r_tables.append(rb + [free[0]] * (width - len(rb)))
        used += [pb[i // BLOCK] * BLOCK + i % BLOCK for i in range(p)]
        used += [rb[i // BLOCK] * BLOCK + i % BLOCK for i in range(r)]
        q_pos.append(torch.arange(p + r - n, p + r))
        qs.append(qs[-1] + n)
    k_cache = _poisoned((num_blocks * BLOCK, kv_heads, head_dim), dtype)
    v_cache = _poisoned((num_blocks * BLOCK, kv_heads, head_dim), dtype)
    used_t = torch.tensor(used, device=DEVICE)
    k_cache[used_t] = _randn(len(used), kv_heads, head_dim, g=g, dtype=dtype)
    v_cache[used_t] = _randn(len(used), kv_heads, head_dim, g=g, dtype=dtype)
    q = _randn(qs[-1], heads, head_dim, g=g, dtype=dtype)
    has_response = any(r for _, r, _ in seqs)
    meta = AttentionMetadata(qs, torch.zeros(0, dtype=torch.long, device=DEVICE), BLOCK,
                             torch.tensor(p_tables, device=DEVICE), [s[0] for s in seqs],
                             torch.tensor(r_tables, device=DEVICE) if has_response else None,
                             [s[1] for s in seqs] if has_response else None)
    return q, k_cache, v_cache, torch.cat(q_pos).to(DEVICE), meta


# (dtype, heads, kv_heads, sliding window): GQA 1, 4 and 8, each dtype, with and without a window.
ATTENTION_CASES = [
    (torch.float32, 2, 2, None), (torch.float32, 8, 2, 5), (torch.float32, 8, 1, None),
    (torch.bfloat16, 2, 2, 6), (torch.bfloat16, 8, 2, None), (torch.bfloat16, 8, 1, 5),
]
# Decode: contexts of 12, 3 (no response), 21, 42 and 1 tokens.
DECODE_SEQS = [(7, 5, 1), (3, 0, 1), (20, 1, 1), (33, 9, 1), (1, 0, 1)]
# Prefill-like steps: decode rows, a prompt prefill, chunked prefill over cached prompt keys,
# queries in the response segment, a chunk spanning both segments, and a row-group with no query.
PREFILL_SEQS = [(7, 5, 1), (12, 0, 12), (20, 0, 6), (33, 9, 4), (5, 2, 0), (4, 13, 13), (10, 3, 6)]


@pytest.mark.parametrize("dtype, heads, kv_heads, window", ATTENTION_CASES)
def test_decode_attention(dtype, heads, kv_heads, window):
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    q, k_cache, v_cache, positions, meta = _segment_case(heads, kv_heads, DECODE_SEQS, dtype, seed=heads + kv_heads)
    assert meta.kernel_tensors().is_decode
    ref = paged_attention(q, k_cache, v_cache, positions, meta, 0.3, window)
    assert not ref.isnan().any()
    # One partition; two (a boundary inside the 33-token prompt segment); three of 16 keys (the short
    # contexts, and keys before the window, leave partitions empty). The automatic choice is
    # `test_split_count_choice`'s; the model test runs it.
    for splits in (1, 2, 3):
        out = _poisoned(q.shape, dtype)
        got = triton_attention(q, k_cache, v_cache, positions, meta, 0.3, window, out, num_splits=splits, block_n=16)
        torch.testing.assert_close(got, ref, **ATTENTION_TOL[dtype], msg=lambda m, s=splits: f"splits={s}: {m}")
    # The partitions combined by the last of each group instead of a second kernel: the same
    # result, and the ticket counters back at zero for the next launch.
    attention_mod = importlib.import_module("lengthwise.ops.triton.attention")
    for splits in (2, 3):
        out = _poisoned(q.shape, dtype)
        got = triton_attention(q, k_cache, v_cache, positions, meta, 0.3, window, out, num_splits=splits, block_n=16,
                               fused_reduce=True)
        torch.testing.assert_close(got, ref, **ATTENTION_TOL[dtype], msg=lambda m, s=splits: f"fused, {s}: {m}")
        assert not bool(attention_mod._group_counters(q.device, 1).any())


@pytest.mark.parametrize("dtype, heads, kv_heads, window", ATTENTION_CASES)
def test_prefill_attention(dtype, heads, kv_heads, window):
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    q, k_cache, v_cache, positions, meta = _segment_case(heads, kv_heads, PREFILL_SEQS, dtype, seed=heads * kv_heads)
    assert not meta.kernel_tensors().is_decode
    ref = paged_attention(q, k_cache, v_cache, positions, meta, 0.3, window)
    assert not ref.isnan().any()
    out = _poisoned(q.shape, dtype)
    got = triton_ops.paged_attention(q, k_cache, v_cache, positions, meta, 0.3, window, out)
    assert got is out
    torch.testing.assert_close(got, ref, **ATTENTION_TOL[dtype])
    # Small tiles: several query tiles per row-group and several key tiles per segment.
    got = triton_attention(q, k_cache, v_cache, positions, meta, 0.3, window, block_m=16, block_n=16)
    torch.testing.assert_close(got, ref, **ATTENTION_TOL[dtype])


def test_prefill_kernel_on_a_decode_step():
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    q, k_cache, v_cache, positions, meta = _segment_case(8, 2, DECODE_SEQS, torch.float32, seed=7)
    ref = paged_attention(q, k_cache, v_cache, positions, meta, 0.3, 4)
    got = triton_attention(q, k_cache, v_cache, positions, meta, 0.3, 4, decode=False)
    torch.testing.assert_close(got, ref, **ATTENTION_TOL[torch.float32])


def test_split_count_choice():
    from lengthwise.ops.triton.attention import choose_num_splits

    assert choose_num_splits(64, 8, 8192, 132) == 1      # the batch fills the GPU
    assert choose_num_splits(1, 8, 200, 132) == 1        # too short to split
    assert choose_num_splits(1, 8, 8192, 132) == 32      # two waves of 132 from 8 programs, 256 keys each
    assert choose_num_splits(8, 8, 2048, 132) == 5
    assert choose_num_splits(1, 8, 1024, 132) == 4       # at least 256 keys per partition
    assert choose_num_splits(1, 1, 10 ** 6, 132) == 64   # capped


# --- dispatch and the model ----------------------------------------------------------------------

def test_dispatch_choice(monkeypatch):
    x = torch.zeros(2, device=DEVICE)
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert not use_triton(x)
    monkeypatch.delenv(KERNELS_ENV)
    assert kernel_choice() == "auto" and use_triton(x) == CUDA
    monkeypatch.setenv(KERNELS_ENV, "Triton")
    assert use_triton(x)
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match=KERNELS_ENV):
        use_triton(x)


def _tiny_model(dtype, max_positions: int = 128, qk_norm: bool = True, bias: bool = False):
    from lengthwise.model.config import ModelConfig
    from lengthwise.model.llama import CausalLM

    config = ModelConfig(model_type="qwen3" if qk_norm else "llama", vocab_size=96, hidden_size=64,
                         intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                         max_position_embeddings=max_positions, qk_norm=qk_norm, qkv_bias=bias, o_bias=bias,
                         mlp_bias=bias, sliding_windows=(None, 6), eos_token_ids=(95,))
    model = CausalLM(config, dtype, DEVICE)
    g = _gen(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_randn(*p.shape, g=g, scale=0.2) + (1.0 if "norm" in name else 0.0))
    return model


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []))
def test_model_greedy_tokens_match_torch(monkeypatch, dtype):
    """The whole decoder through the dispatching ops: prefill (varlen kernel), decode (split-K when it
    pays), qk-norm, a sliding-window layer; greedy tokens equal to the torch reference's."""
    from lengthwise import SamplingParams, generate
    from lengthwise.engine import prompt_logits

    model = _tiny_model(dtype)
    prompts = [[5, 17, 9, 3, 50], list(range(10, 27)), [7]]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    ref_logits = prompt_logits(model, prompts, block_size=4)
    ref = generate(model, prompts, params, block_size=4)
    monkeypatch.setenv(KERNELS_ENV, "auto" if CUDA else "triton")
    assert use_triton(model.embed)
    logits = prompt_logits(model, prompts, block_size=4)
    got = generate(model, prompts, params, block_size=4)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < tol
    if dtype == torch.float32:
        assert [o.token_ids for o in got] == [o.token_ids for o in ref]


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("qk_norm, experimental", [(True, False), (False, False), (False, True)])
def test_decode_graphs_match_plain_steps(monkeypatch, dtype, qk_norm, experimental):
    """Decode steps replayed from `DecodeGraphs` (captured CUDA graphs on a GPU; the same static
    buffers run eagerly under the interpreter) through the Triton kernels: padding rows on the
    scratch block, split-K partitions fixed from max_model_len (1024: a batch-1 step gets four
    partitions, three of them empty), the fallback above the largest bucket. Without q/k norms the
    batch-1 graph runs the fused single-row kernels; `experimental` turns on the opt-in split-K
    GEMVs and the decode partitions combined in one launch."""
    from conftest import assert_same_generations, graphed_and_plain_decode

    monkeypatch.setenv(KERNELS_ENV, "auto" if CUDA else "triton")
    if experimental:
        monkeypatch.setenv("LENGTHWISE_GEMV_SPLITK", "1")
        monkeypatch.setenv("LENGTHWISE_ATTN_FUSED_REDUCE", "1")
    got, want, calls = graphed_and_plain_decode(_tiny_model(dtype, max_positions=1024, qk_norm=qk_norm),
                                                monkeypatch)
    assert sorted(set(calls)) == [1, 2, 3, 4]
    if dtype == torch.float32:
        assert_same_generations(got, want, logprob_tol=1e-4)
    else:  # same kernels, but each bucket's own matmul shapes: bf16 rounding may differ
        assert_same_generations(got, want, logprob_tol=5e-2)


def test_fused_single_row_decode_matches_unfused(monkeypatch):
    """Batch-1 decode through the fused single-row kernels (a model with biases and no q/k norm, so
    both fused blocks apply), through the same Triton kernels unfused (`LENGTHWISE_FUSED=0`), and
    through the torch reference: the same greedy tokens, logprobs within tolerance. (float32: in
    bf16 a different summation order may flip a near tie; the kernel tests cover bf16.)"""
    from conftest import assert_same_generations

    from lengthwise import SamplingParams
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm import run_to_completion
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.ops.fused import FUSED_ENV
    from lengthwise.ops.triton.linear import SPLITK_ENV

    model = _tiny_model(torch.float32, qk_norm=False, bias=True)
    calls = []
    for name in ("norm_qkv_rotary_write", "norm_gate_up_silu"):
        real = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name),
                                                                                          _real(*a, **kw))[1])

    def run():
        engine = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=1))
        params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2)
        return run_to_completion(engine, [[5, 17, 9, 3, 50], [7]], [params, params])

    want = run()  # torch reference (KERNELS=torch)
    monkeypatch.setenv(KERNELS_ENV, "auto" if CUDA else "triton")
    fused = run()
    assert calls.count("norm_qkv_rotary_write") == calls.count("norm_gate_up_silu") > 0  # (graphs replay on CUDA)
    calls.clear()
    monkeypatch.setenv(FUSED_ENV, "0")
    unfused = run()
    assert not calls
    monkeypatch.setenv(SPLITK_ENV, "1")  # and the o and down GEMVs split over K
    split = run()
    assert_same_generations(fused, unfused, logprob_tol=1e-4)
    assert_same_generations(fused, want, logprob_tol=1e-4)
    assert_same_generations(split, want, logprob_tol=1e-4)


@pytest.mark.skipif(not CUDA, reason="CUDA streams and graphs: tests/test_cuda_graph.py checks the logic on the CPU")
def test_cuda_async_decode_matches_sync(monkeypatch):
    """Steps launched ahead on a real stream (pinned token read-back behind an event, the next
    graph replayed before it): the same greedy and seeded-sampled tokens as synchronous steps."""
    from conftest import step_to_completion

    from lengthwise import SamplingParams
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm_engine import LLMEngine

    monkeypatch.setenv(KERNELS_ENV, "auto")  # graphs need the Triton kernels (the module default is torch)
    model = _tiny_model(torch.float32, max_positions=512, qk_norm=False, bias=True)
    prompts = [[5, 17, 9, 3, 50], list(range(10, 40)), [7], [8, 1, 8]]
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = [SamplingParams(max_tokens=40, **greedy),
              SamplingParams(max_tokens=25, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=60, **greedy), SamplingParams(max_tokens=30, **greedy)]

    def run(flag, params):
        engine = LLMEngine(model, None, EngineConfig(block_size=16, max_num_seqs=4, async_decode=flag))
        assert engine.runner.graphs is not None
        return step_to_completion(engine, prompts, params)[0], engine.runner.graphs

    # Request 3 stops on a token it writes at index 8 (or before), in a batch of 4: the others
    # go on from the step launched for all four (a subset in the same bucket).
    params[3] = SamplingParams(max_tokens=30, stop_token_ids=[run(False, params)[0]["3"][0][8]], **greedy)
    (want, sync), (got, graphs) = run(False, params), run(True, params)
    assert got == want
    assert sync.launched_ahead == 0 and graphs.used_ahead > 40 and graphs.used_ahead_in_part >= 1


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("family", ["llama", "mistral-sliding", "qwen3", "qwen3-moe"])
def test_cuda_triton_model_matches_transformers(monkeypatch, family):
    import copy

    from conftest import make_hf_model, save_hf_model

    from lengthwise import SamplingParams, generate, load_model
    from lengthwise.engine import prompt_logits

    prompts = [[5, 17, 99, 3, 250], list(range(10, 60))]
    hf = make_hf_model(family)
    path = save_hf_model(hf, __import__("tempfile").mkdtemp())
    monkeypatch.setenv(KERNELS_ENV, "auto")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        model = load_model(path, dtype, "cuda")
        ours = prompt_logits(model, prompts).cpu()
        ref_hf = copy.deepcopy(hf).to(device="cuda", dtype=dtype)
        with torch.no_grad():
            ref = torch.stack([ref_hf(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts]).cpu()
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        got = generate(model, prompts, params)
        monkeypatch.setenv(KERNELS_ENV, "torch")
        want = generate(model, prompts, params)
        ours_torch = prompt_logits(model, prompts).cpu()
        monkeypatch.setenv(KERNELS_ENV, "auto")
        same = [o.token_ids == w.token_ids for o, w in zip(got, want, strict=True)]
        err_torch = ((ours_torch - ref).abs().max() / ref.abs().max()).item()
        print(f"\n{family} {dtype}: logits vs transformers max rel err {err:.2e} (torch kernels {err_torch:.2e}); "
              f"greedy tokens triton == torch: {same}")
        assert err < tol, dtype
        if dtype == torch.float32:
            assert [o.token_ids for o in got] == [o.token_ids for o in want]


# --- float8 KV caches (kv_cache_dtype="fp8" / "fp8_e5m2") -----------------------------------------

FP8_CACHES = [torch.float8_e4m3fn, torch.float8_e5m2]


def _fp8_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("cache", FP8_CACHES)
@pytest.mark.parametrize("dtype, heads, kv_heads, window", [ATTENTION_CASES[1], ATTENTION_CASES[4], ATTENTION_CASES[5]])
def test_attention_reads_a_float8_cache(dtype, heads, kv_heads, window, cache):
    """Decode (one and three partitions) and prefill over a float8 cache, widened as loaded, against
    the torch reference reading the same bytes; slots outside the contexts hold float8 NaN."""
    from lengthwise.ops.attention import to_fp8
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    for seqs, decode in ((DECODE_SEQS, True), (PREFILL_SEQS, False)):
        q, k_cache, v_cache, positions, meta = _segment_case(heads, kv_heads, seqs, dtype, seed=heads + 3 * kv_heads)
        k_cache, v_cache = to_fp8(3 * k_cache, cache), to_fp8(v_cache, cache)
        ref = paged_attention(q, k_cache, v_cache, positions, meta, 0.3, window)
        assert not ref.isnan().any()
        splits = [dict(num_splits=1), dict(num_splits=3, block_n=16)]
        for kwargs in (splits if decode else [dict(block_m=16, block_n=16)]):
            out = _poisoned(q.shape, dtype)
            got = triton_attention(q, k_cache, v_cache, positions, meta, 0.3, window, out, **kwargs)
            torch.testing.assert_close(got, ref, **ATTENTION_TOL[dtype], msg=lambda m, k=kwargs: f"{k}: {m}")
        if not decode:  # through the dispatching entry point too
            got = triton_ops.paged_attention(q, k_cache, v_cache, positions, meta, 0.3, window)
            torch.testing.assert_close(got, ref, **ATTENTION_TOL[dtype])


@pytest.mark.parametrize("cache", FP8_CACHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_write_kv_into_a_float8_cache(nearest_casts, dtype, cache):
    """RoPE'd keys and the values stored into a float8 cache: the torch path's bytes (rounded in the
    activations' dtype, then saturated and rounded to nearest even), large values saturating."""
    g, t, slots_total, heads, kv_heads, head_dim = _gen(8), 9, 64, 8, 2, 24
    big = 600.0 if cache == torch.float8_e4m3fn else 7e4  # some keys and values past the format's largest
    q, k, v, cos, sin, slots = _rotary_inputs(g, t, slots_total, heads, kv_heads, head_dim, dtype, scale=big / 3)
    shape = (slots_total, kv_heads, head_dim)
    ref_k, ref_v = _poisoned(shape, cache), _poisoned(shape, cache)
    ref_q = rotary_and_write_kv(q, k, v, cos, sin, ref_k, ref_v, slots)  # the torch reference
    k_cache, v_cache = _poisoned(shape, cache), _poisoned(shape, cache)
    got = triton_ops.rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(got, ref_q, **ELEMENTWISE_TOL[dtype])
    largest = torch.finfo(cache).max
    assert (ref_v[slots].float().abs() == largest).any()  # saturated, not infinite or NaN
    if dtype == torch.bfloat16:  # bit for bit: both round each product and sum of the rotation to bf16
        assert torch.equal(_fp8_bytes(k_cache), _fp8_bytes(ref_k))
    else:  # float32: the paths' products may differ in the last bit (a fused multiply-add), a float8 step at a tie
        differ = _fp8_bytes(k_cache) != _fp8_bytes(ref_k)
        assert differ.float().mean() < 0.01
        torch.testing.assert_close(k_cache.float(), ref_k.float(), rtol=0.25, atol=0, equal_nan=True)
    assert torch.equal(_fp8_bytes(v_cache), _fp8_bytes(ref_v))


@pytest.mark.parametrize("cache", FP8_CACHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_qkv_rotary_write_into_a_float8_cache(nearest_casts, dtype, cache):
    """The fused single-row kernel stores what it stores into a cache in the activations' dtype,
    saturated and rounded to float8 (`to_fp8` of that cache's values, byte for byte)."""
    from lengthwise.ops.attention import to_fp8

    heads, kv_heads, head_dim, hidden = 8, 2, 20, 100
    n = (heads + 2 * kv_heads) * head_dim
    x, res, norm_w, w, b = _one_token_inputs(dtype, hidden, n, True, True, seed=21)
    cos, sin = rotary_cos_sin(torch.tensor([37], device=DEVICE), rotary_inv_freq(head_dim, 1e4).to(DEVICE), dtype)
    slot, shape = torch.tensor([5], device=DEVICE), (12, kv_heads, head_dim)
    caches = {}
    for cache_dtype in (dtype, cache):
        k_cache, v_cache = _poisoned(shape, cache_dtype), _poisoned(shape, cache_dtype)
        q, _ = triton_ops.norm_qkv_rotary_write(x, res, norm_w, 1e-6, w, b, cos, sin, k_cache, v_cache, slot,
                                                tile=SMALL_TILE["BLOCK_P"])
        caches[cache_dtype] = (q, k_cache, v_cache)
    wide, narrow = caches[dtype], caches[cache]
    assert torch.equal(narrow[0], wide[0])
    for a, b_ in zip(narrow[1:], wide[1:], strict=True):
        assert torch.equal(_fp8_bytes(a[5]), _fp8_bytes(to_fp8(b_[5], cache)))
        assert bool(a[torch.arange(12, device=DEVICE) != 5].float().isnan().all())


@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
def test_model_over_a_float8_cache_matches_torch(monkeypatch, kv):
    """The engine with kv_cache_dtype="fp8"/"fp8_e5m2" through the Triton kernels (prefill, split-K
    decode, the KV writes) against the torch reference over its own float8 cache: the same greedy
    tokens and close logprobs."""
    from lengthwise import SamplingParams
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm import run_to_completion
    from lengthwise.engine.llm_engine import LLMEngine

    model = _tiny_model(torch.float32)
    prompts = [[5, 17, 9, 3, 50], list(range(10, 27)), [7]]
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)] * 3
    outs = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv(KERNELS_ENV, "auto" if CUDA and choice == "triton" else choice)
        engine = LLMEngine(model, None, EngineConfig(block_size=4, kv_cache_dtype=kv, enforce_eager=not CUDA))
        assert engine.runner.cache.dtype == {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv]
        assert use_triton(model.embed) == (choice == "triton")
        outs[choice] = run_to_completion(engine, prompts, params)
    for a, b in zip(outs["torch"], outs["triton"], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for tok, lp in la.items():
                assert abs(lp.logprob - lb[tok].logprob) < 1e-3

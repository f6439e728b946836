"""The CPU fast paths: small C++ kernels, compiled on first use into one library.

- `segment_attention.cpp`: attention over the segment KV cache. The torch reference gathers every
  sequence's context into a fresh tensor and calls SDPA once per sequence; at decode batch 256
  that is thousands of small calls per step plus a copy of the whole KV cache. The kernel walks
  each row's block tables and reads keys and values in place, once, with one online softmax over
  the prompt and response segments.
- `decode_forward.cpp`: the fused decode forward (`lengthwise.ops.cpu.decode`) and its GEMM on
  panel-packed weights (`pack_panels`, `packed_linear`), which the LM head of those steps uses too.
  Panels hold float32, bfloat16 (exact for a bfloat16 checkpoint served in float32: half the bytes
  a batch-1 step streams), int8 with a scale per output column (weight-only quantization) or 4-bit
  values with a scale and zero point per column and group of k (GPTQ and AWQ checkpoints,
  `quantization="int4"`); the arithmetic is float32 in every case.

The library is built with the system C++ compiler (`$CXX`, else `c++`) for this CPU
(`-march=native`; `LENGTHWISE_CPU_MARCH` names another target) into the lengthwise cache
directory, keyed by a hash of sources, flags and CPU, and loaded with ctypes. If no compiler is
found or the build fails, `segment_attention_kernel()` returns `None` (with one warning) and
callers use the torch reference. float32 activations only;
the KV cache may be float32, bfloat16 or float8 (`KV_DTYPES`). The decode forward's vector code
(`simd.h`) has an AVX-512 form, an AVX2 + FMA form and a portable one (`simd_isa()` says which
was built); the attention kernel has AVX-512 loops and portable ones.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from lengthwise.ops.int4 import PackedInt4

_HERE = Path(__file__).parent
SOURCES = [_HERE / "segment_attention.cpp", _HERE / "decode_forward.cpp"]
HEADERS = [_HERE / "attention.h", _HERE / "lora.h", _HERE / "simd.h"]
# -fopenmp links libgomp.so.1 by soname: inside a process that imported torch that is torch's own
# copy, so the kernels' OpenMP threads are torch's intra-op pool, not a second pool competing for
# the same cores.
FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-pthread"]
MARCH_ENV = "LENGTHWISE_CPU_MARCH"  # the compiler's -march (default native: this CPU)


def _flags() -> list[str]:
    return [f"-march={os.environ.get(MARCH_ENV) or 'native'}", *FLAGS]


def _cache_dir() -> Path:
    root = os.environ.get("LENGTHWISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lengthwise")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


@cache
def segment_attention_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or `None` where it cannot be built here. (This module imports torch
    first, so the library's libgomp.so.1 resolves to torch's.)"""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        warnings.warn("no C++ compiler found: CPU attention uses the slower torch reference", stacklevel=2)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        texts = [f.read_text() for f in (*SOURCES, *HEADERS)]
        key = hashlib.sha256(b"\0".join(x.encode() for x in (
            *texts, " ".join(_flags()), version, _cpu_signature(), platform.machine()))).hexdigest()[:16]
        lib = _cache_dir() / f"lengthwise-cpu-{key}.so"
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / lib.name
                subprocess.run([compiler, *_flags(), *map(str, SOURCES), "-o", str(out)], check=True,
                               capture_output=True, text=True, timeout=300)
                os.replace(out, lib)  # atomic: concurrent builders never load a half-written file
        so = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"building the CPU attention kernel failed ({detail.strip()[:500]}): "
                      f"using the slower torch reference", stacklevel=2)
        return None
    so.lw_segment_attention.restype = None
    so.lw_segment_attention.argtypes = (
        [ctypes.c_void_p] * 8 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        + [ctypes.c_int] * 6 + [ctypes.c_float] + [ctypes.c_int] * 3)
    so.lw_simd_isa.restype = ctypes.c_char_p
    so.lw_simd_isa.argtypes = []
    so.lw_store_kv.restype = None
    so.lw_store_kv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    _declare_decode(so)
    max_heads, max_dim = ctypes.c_int(), ctypes.c_int()
    so.lw_limits(ctypes.byref(max_heads), ctypes.byref(max_dim))
    so.max_heads, so.max_head_dim = max_heads.value, max_dim.value
    return so


def _declare_decode(so: ctypes.CDLL) -> None:
    p, i, f, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
    so.lw_packed_bytes.restype = i64
    so.lw_packed_bytes.argtypes = [i, i, i]
    so.lw_pack_panels.restype = None
    so.lw_pack_panels.argtypes = [p, i, i, i64, i, p, i]
    so.lw_packed_linear.restype = None
    so.lw_packed_linear.argtypes = [p, i, i, p, p, i, p, i]
    so.lw_decode_forward.restype = None
    so.lw_decode_forward.argtypes = ([p, p, p] + [i] * 9 + [f, f, p, p, p, i] + [p] * 5
                                     + [i, p, p, p, i, p, i, i, i, i, p, p, p, i, i, i])


def simd_isa() -> str | None:
    """The vector code the decode forward was built with: "avx512", "avx2" or "portable" (None: no
    kernels here)."""
    so = segment_attention_kernel()
    return None if so is None else so.lw_simd_isa().decode()


# The KV cache dtypes the kernels read and write (`EngineConfig.kv_cache_dtype` on the CPU), in
# attention.h's KvKind order.
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def kv_kind(dtype: torch.dtype) -> int:
    """The kernels' code for a KV cache of `dtype` (attention.h's KvKind)."""
    if dtype not in KV_DTYPES:
        raise ValueError(f"the CPU kernels read a {', '.join(map(str, KV_DTYPES))} KV cache, got {dtype}")
    return KV_DTYPES.index(dtype)


def kernel_rounding(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` (float32) rounded into `dtype` by the kernels' own conversion, the one the fused decode
    step writes keys and values with (tests pin it against torch's)."""
    lib = segment_attention_kernel()
    if lib is None:
        raise RuntimeError("the CPU kernels could not be built here")
    src = x.to(torch.float32).contiguous()
    out = torch.empty(src.shape, dtype=dtype)
    lib.lw_store_kv(ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(out.data_ptr()), src.numel(), kv_kind(dtype))
    return out
# How the attention kernel walks a tile of keys (an A/B switch): "auto" the faster for the cache's
# dtype (memory order for bfloat16 and float8, a head at a time for float32), "head" or "memory" forces one.
ATTENTION_ORDER_ENV = "LENGTHWISE_CPU_ATTENTION_ORDER"
ATTENTION_ORDERS = {"auto": 0, "head": 1, "memory": 2}


def attention_order() -> int:
    """`LENGTHWISE_CPU_ATTENTION_ORDER` as the kernels' `order` argument."""
    raw = os.environ.get(ATTENTION_ORDER_ENV, "auto")
    if raw not in ATTENTION_ORDERS:
        raise ValueError(f"{ATTENTION_ORDER_ENV} must be one of {', '.join(ATTENTION_ORDERS)}, got {raw!r}")
    return ATTENTION_ORDERS[raw]


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors (CPU, float32 queries over a cache of one of
    `KV_DTYPES`, head sizes within its limits)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype not in KV_DTYPES:
        return False
    lib = segment_attention_kernel()
    return (lib is not None and q.shape[-1] <= lib.max_head_dim
            and q.shape[1] <= lib.max_heads)


def segment_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                      meta, scale: float, sliding_window: int | None, out: torch.Tensor,  # noqa: ANN001
                      groups: list[int]) -> None:
    """Fill `out`'s rows of the row-groups `groups` (see `lengthwise.ops.attention.paged_attention`)."""
    lib = segment_attention_kernel()
    kt = meta.kernel_tensors()
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    positions = positions.to(torch.int64).contiguous()
    group_ids = torch.tensor(groups, dtype=torch.int32)
    ptr = ctypes.c_void_p
    lib.lw_segment_attention(
        ptr(q.data_ptr()), ptr(k_cache.data_ptr()), ptr(v_cache.data_ptr()), ptr(out.data_ptr()),
        ptr(positions.data_ptr()), ptr(kt.query_start.data_ptr()), ptr(kt.prompt_lens.data_ptr()),
        ptr(kt.response_lens.data_ptr()), ptr(kt.prompt_block_tables.data_ptr()), kt.prompt_block_tables.shape[1],
        ptr(kt.response_block_tables.data_ptr()), kt.response_block_tables.shape[1], ptr(group_ids.data_ptr()),
        len(groups), q.shape[1], k_cache.shape[1], q.shape[2], meta.block_size, sliding_window or 0, scale,
        kv_kind(k_cache.dtype), attention_order(), torch.get_num_threads())


# decode_forward.cpp's WeightFormat, by the dtype a weight's panels hold (torch.quint4x2: 4-bit
# values, two to a byte, with group-wise scales and zero points).
INT4 = torch.quint4x2
PANEL_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, INT4: 3}
PANEL = 32  # output columns per panel (decode_forward.cpp's kPanel)


class _PackedWeightC(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("format", ctypes.c_int32),
                ("group_size", ctypes.c_int32), ("perm", ctypes.c_void_p)]


@dataclass
class PackedWeight:
    """A `[n, k]` weight in the panel layout of `decode_forward.cpp`'s GEMM (`pack_panels`).

    `dtype` is how the panels store it: float32, bfloat16, int8 (then `scales [n]` gives column j's
    weights as `q * scales[j]`) or `INT4` (then `scales [panels, groups, 2, 32]` holds, per group of
    `group_size` inputs, each column's scale s and offset m: the weight is `q * s + m`; with `perm`
    (int32 [k]) the panels hold the inputs in that order, an act-ordered GPTQ weight's groups
    sorted into runs, and the kernels read `x[:, perm]`). `address` is the C struct the kernels take."""

    panels: torch.Tensor  # raw bytes
    scales: torch.Tensor | None
    n: int
    k: int
    dtype: torch.dtype
    group_size: int = 0
    perm: torch.Tensor | None = None
    _c: _PackedWeightC = field(repr=False, default_factory=_PackedWeightC)

    def __post_init__(self) -> None:
        self._c.data = self.panels.data_ptr()
        self._c.scales = self.scales.data_ptr() if self.scales is not None else None
        self._c.format = PANEL_FORMATS[self.dtype]
        self._c.group_size = self.group_size
        self._c.perm = self.perm.data_ptr() if self.perm is not None else None

    @property
    def address(self) -> int:
        return ctypes.addressof(self._c)

    @property
    def nbytes(self) -> int:
        return (self.panels.numel() + (0 if self.scales is None else self.scales.numel() * 4)
                + (0 if self.perm is None else self.perm.numel() * 4))

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    def unpack(self) -> torch.Tensor:
        """The float32 `[n, k]` weight the panels hold (a new tensor: for the paths that need a
        dense one, such as the torch reference, Triton and tests)."""
        p = -(-self.n // PANEL)
        if self.dtype == torch.bfloat16:  # [panel, kk, i, half] holds column half * 16 + i
            halves = self.panels.view(torch.bfloat16).view(p, self.k, PANEL // 2, 2)
            cols = halves.permute(0, 1, 3, 2).reshape(p, self.k, PANEL).float()
        elif self.dtype == INT4:  # [panel, kk, i] byte: column i low nibble, column 16 + i high
            b = self.panels.view(p, self.k, PANEL // 2)
            groups, gs = self.scales.shape[1], self.group_size
            cols = torch.nn.functional.pad(torch.cat([b & 15, b >> 4], dim=2).float(), (0, 0, 0, groups * gs - self.k))
            cols = cols.view(p, groups, gs, PANEL) * self.scales[:, :, 0, None] + self.scales[:, :, 1, None]
            cols = cols.view(p, groups * gs, PANEL)[:, :self.k]
        else:
            cols = self.panels.view(self.dtype).view(p, self.k, PANEL).float()
        w = cols.permute(0, 2, 1).reshape(p * PANEL, self.k)[:self.n]
        if self.scales is not None and self.dtype == torch.int8:
            w = w * self.scales[:self.n, None]
        if self.perm is not None:  # column i holds input perm[i]
            w = torch.empty_like(w).index_copy_(1, self.perm.long(), w)
        return w.contiguous()


# A weight as a model may hold it: a tensor, its panels, or (gate-up) the panels of both halves.
AnyWeight = torch.Tensor | PackedWeight | tuple[PackedWeight, ...]


def dense(weight: AnyWeight | PackedInt4) -> torch.Tensor:
    """`weight` as a float tensor `[n, k]` (halves of a pair stacked), unpacking panels or
    dequantizing a Triton 4-bit weight if needed."""
    if isinstance(weight, tuple):
        return torch.cat([dense(w) for w in weight])
    if isinstance(weight, PackedInt4):
        return weight.dequantize()
    return weight.unpack() if isinstance(weight, PackedWeight) else weight


def use_panels(x: torch.Tensor) -> bool:
    """Whether a matmul of `x` with packed weights runs on the panels (float32 on the CPU, the default
    kernel choice); otherwise the caller unpacks them for the torch reference or Triton."""
    from lengthwise.ops.dispatch import kernel_choice

    return x.device.type == "cpu" and x.dtype == torch.float32 and kernel_choice() == "auto"


def pack_panels(weight: torch.Tensor, scales: torch.Tensor | None = None) -> PackedWeight:
    """`weight [n, k]` (CPU, unit stride along k) packed for the fused path's GEMM, kept in its dtype:
    float32, bfloat16, or int8 with `scales [n]` (float32: the weight is `weight * scales[:, None]`).
    (4-bit weights: `pack_int4_panels`.)"""
    if weight.dim() != 2 or weight.dtype not in PANEL_FORMATS or weight.stride(1) != 1 or weight.is_cuda:
        raise ValueError("pack_panels needs a CPU float32, bfloat16 or int8 [n, k] weight with unit stride "
                         f"along k, got {tuple(weight.shape)} {weight.dtype} with strides {weight.stride()}")
    n, k = weight.shape
    if (weight.dtype == torch.int8) != (scales is not None):
        raise ValueError("pack_panels: scales go with int8 weights, and only with them")
    if scales is not None:
        if scales.shape != (n,):
            raise ValueError(f"pack_panels: scales must have shape ({n},), got {tuple(scales.shape)}")
        padded = torch.zeros(-(-n // PANEL) * PANEL, dtype=torch.float32)
        padded[:n] = scales
        scales = padded
    return PackedWeight(_pack(weight, weight.dtype), scales, n, k, weight.dtype)


def pack_int4_panels(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     perm: torch.Tensor | None = None) -> PackedWeight:
    """4-bit weights `q [n, k]` (uint8 values in [0, 15]) whose inputs come in groups of
    `group_size` (the last may be shorter), with per (column, group) `scales [n, groups]` and zero
    points `zeros [n, groups]`: the weight is `(q - zeros[:, g]) * scales[:, g]`, g = kk // group_size.
    With `perm` (a permutation of range(k)), column kk of `q` belongs to input `perm[kk]`: the
    product is then `x[:, perm] @ weight^T`."""
    if q.dim() != 2 or q.dtype != torch.uint8 or q.stride(1) != 1 or q.is_cuda:
        raise ValueError(f"pack_int4_panels needs a CPU uint8 [n, k] q with unit stride along k, got "
                         f"{tuple(q.shape)} {q.dtype}")
    n, k = q.shape
    groups = -(-k // group_size) if group_size > 0 else 0
    if group_size <= 0 or scales.shape != (n, groups) or zeros.shape != (n, groups):
        raise ValueError(f"pack_int4_panels: group_size must be positive and scales, zeros [{n}, {groups}], got "
                         f"group_size {group_size}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
    if int(q.max()) > 15:
        raise ValueError("pack_int4_panels: q holds values above 15")
    if perm is not None:
        perm = perm.to(torch.int32).contiguous()
        if perm.shape != (k,) or not torch.equal(torch.sort(perm).values, torch.arange(k, dtype=torch.int32)):
            raise ValueError(f"pack_int4_panels: perm must be a permutation of range({k})")
    padded = -(-n // PANEL) * PANEL
    s = torch.zeros(padded, groups)
    m = torch.zeros(padded, groups)
    s[:n] = scales.float()
    m[:n] = -zeros.float() * scales.float()
    # [2, panels, 32, groups] -> [panels, groups, 2, 32]: a panel's constants for one group together
    params = torch.stack([s, m]).view(2, padded // PANEL, PANEL, groups).permute(1, 3, 0, 2).contiguous()
    return PackedWeight(_pack(q, INT4), params, n, k, INT4, group_size, perm)


def _pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lib = segment_attention_kernel()
    n, k = weight.shape
    fmt = PANEL_FORMATS[dtype]
    out = torch.empty(lib.lw_packed_bytes(n, k, fmt), dtype=torch.uint8)
    lib.lw_pack_panels(ctypes.c_void_p(weight.data_ptr()), n, k, weight.stride(0), fmt,
                       ctypes.c_void_p(out.data_ptr()), torch.get_num_threads())
    return out


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [..., k] @ weight^T + bias` (float32) for `packed = pack_panels(weight, ...)`."""
    lib = segment_attention_kernel()
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x.shape
    if x.dtype != torch.float32 or k != packed.k:
        raise ValueError(f"packed_linear needs float32 x with {packed.k} columns, got {x.dtype} {tuple(x.shape)}")
    y = torch.empty((*lead, packed.n), dtype=torch.float32)
    ptr = ctypes.c_void_p
    lib.lw_packed_linear(ptr(x.data_ptr()), m, k, ptr(packed.address),
                         ptr(bias.contiguous().data_ptr()) if bias is not None else None, packed.n,
                         ptr(y.data_ptr()), torch.get_num_threads())
    return y

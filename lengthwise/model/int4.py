"""4-bit weights with a scale and zero point per output row and group of inputs.

The format of the two quantized-checkpoint families most published Llama, Mistral and Qwen
weights come in, GPTQ and AutoAWQ (`quantization_config` in config.json), and of
`quantization="int4"`, which quantizes a float checkpoint at load by rounding to nearest (the
group-wise asymmetric scheme torchao's and gpt-fast's int4 weight-only use). Weight `[n, k]` =
`(q - zeros[:, g]) * scales[:, g]` with `q` in [0, 15] and `g = kk // group_size`.

A batch-1 decode step reads every weight once, so its floor is weight bytes / bandwidth: 4 bits
plus a scale and zero per group of 128 is about half a byte a weight, an eighth of float32. The
fused CPU path keeps the values as 4-bit panels (`lengthwise.ops.cpu.pack_int4_panels`; an
act-ordered weight with its inputs sorted by group, `Int4Weight.in_group_order`) and never
dequantizes them at batch 1. On CUDA they stay 4-bit too, in GPTQ's layout, for the Triton W4A16
kernel (`lengthwise.ops.int4`); the torch reference dequantizes at every call. Only a model
neither path serves (a bfloat16 model on the CPU) holds the dequantized weights in its dtype.

On disk (both store the transposed `[k, n]` layout of the original linear, 8 values per int32,
low bits first): GPTQ packs `qweight [k / 8, n]` along k and `qzeros [groups, n / 8]` along n,
with the zero points stored minus one in its original (v1) format, and may order the inputs'
groups by activation (`g_idx [k]`, desc_act); AWQ packs both `qweight [k, n / 8]` and `qzeros`
along n in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7. Scales are `[groups, n]` in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.model.config import CheckpointError, CheckpointQuantization

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
# AutoAWQ's packing order: nibble i of a word holds column 8c + AWQ_ORDER[i]; this reverses it.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class Int4Weight:
    """A `[n, k]` weight as 4-bit `q [n, k]` (uint8 values in [0, 15]), `scales [n, groups]` and
    `zeros [n, groups]` (float32). Input kk belongs to group `kk // group_size`, or to
    `g_idx[kk]` where a GPTQ checkpoint ordered its groups by activation (desc_act)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def sortable(self) -> bool:
        """Whether sorting the inputs by group makes every group a run of `group_size` (the last may
        be shorter): what the 4-bit panels need (`in_group_order`)."""
        if self.g_idx is None:
            return True
        k = self.q.shape[1]
        return torch.equal(torch.sort(self.g_idx, stable=True).values, torch.arange(k) // self.group_size)

    @property
    def in_input_order(self) -> bool:
        """Whether input kk belongs to group `kk // group_size` (no act order to follow)."""
        k = self.q.shape[1]
        return self.g_idx is None or torch.equal(self.g_idx, torch.arange(k, device=self.q.device) // self.group_size)

    def in_group_order(self) -> tuple[Int4Weight, torch.Tensor | None] | None:
        """This weight with its inputs sorted by group, so that each group is a contiguous run (what
        the 4-bit panels hold), and the order `perm` (`x[:, perm]` is the input the sorted weight
        takes; None when the groups already run in input order). None if sorting cannot give
        groups of `group_size` (the last may be shorter)."""
        if self.g_idx is None:
            return self, None
        if not self.sortable:
            return None
        perm = torch.argsort(self.g_idx, stable=True)
        return Int4Weight(self.q[:, perm].contiguous(), self.scales, self.zeros, self.group_size), perm

    def groups(self) -> torch.Tensor:
        """The group of each input, `[k]`."""
        k = self.q.shape[1]
        return self.g_idx if self.g_idx is not None else torch.arange(k, device=self.q.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """The float32 `[n, k]` weight."""
        g = self.groups()
        return (self.q.float() - self.zeros[:, g]) * self.scales[:, g]

    def rows(self, rows: slice) -> Int4Weight:
        return Int4Weight(self.q[rows], self.scales[rows], self.zeros[rows], self.group_size, self.g_idx)

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight | None:
        """The parts stacked along n (q, k, v into one QKV), or None if their groups differ."""
        first = parts[0]
        for p in parts[1:]:
            same_idx = (p.g_idx is None and first.g_idx is None) or (
                p.g_idx is not None and first.g_idx is not None and torch.equal(p.g_idx, first.g_idx))
            if p.group_size != first.group_size or p.q.shape[1] != first.q.shape[1] or not same_idx:
                return None
        return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]),
                          torch.cat([p.zeros for p in parts]), first.group_size, first.g_idx)


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Weight:
    """Round-to-nearest asymmetric 4-bit quantization of `weight [n, k]` in groups of `group_size`
    inputs (the last may be shorter): each group's [min, max] (widened to include 0) maps onto
    [0, 15], `scale = (max - min) / 15`, `zero = round(-min / scale)`. A constant-zero group gets
    scale 1 and zero 0."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    w = weight.detach().float()
    n, k = w.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)
    pad_mask = torch.arange(groups * group_size, device=w.device).view(groups, group_size) < k
    big = torch.finfo(torch.float32).max
    lo = torch.where(pad_mask, padded, big).amin(dim=2).clamp(max=0.0)
    hi = torch.where(pad_mask, padded, -big).amax(dim=2).clamp(min=0.0)
    scales = (hi - lo) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-lo / scales).clamp(0, 15)
    g = torch.arange(k, device=w.device) // group_size
    q = torch.round(w / scales[:, g] + zeros[:, g]).clamp(0, 15).to(torch.uint8)
    return Int4Weight(q, scales, zeros, group_size)


def stored_shapes(base: str, n: int, k: int, quant: CheckpointQuantization) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) a quantized checkpoint stores for the linear `base` (its weight
    name without `.weight`) of `n` outputs and `k` inputs (GPTQ's `g_idx` is optional); none where
    `n` or `k` is not a multiple of 8 (both formats pack 8 values per int32: such a linear can
    only be stored unquantized)."""
    if n % 8 or k % 8:
        return {}
    groups = quant.num_groups(k)
    shapes = {base + ".qzeros": (groups, n // 8), base + ".scales": (groups, n)}
    if quant.method == "gptq":
        shapes.update({base + ".qweight": (k // 8, n), base + ".g_idx": (k,)})
    else:
        shapes[base + ".qweight"] = (k, n // 8)
    return shapes


def _unpack_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 `[r, c]` holding 8 values per word along the rows -> uint8 `[8r, c]`."""
    r, c = packed.shape
    return ((packed.to(torch.int32).unsqueeze(1) >> _SHIFTS[:, None]) & 15).reshape(8 * r, c).to(torch.uint8)


def _unpack_along_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 `[r, c]` holding 8 values per word along the columns -> uint8 `[r, 8c]` (nibble i of a
    word is column `8c + i`, or with `order`, position p of each 8 is nibble `order[p]`)."""
    r, c = packed.shape
    v = (packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS) & 15
    if order is not None:
        v = v[:, :, list(order)]
    return v.reshape(r, 8 * c).to(torch.uint8)


def read_int4(tensors: dict[str, torch.Tensor], base: str, quant: CheckpointQuantization) -> Int4Weight:
    """The 4-bit linear `base` of a GPTQ or AWQ checkpoint as an `Int4Weight [n, k]` (the tensors
    are shape-checked already; see `stored_shapes`)."""
    qweight, qzeros = tensors[base + ".qweight"], tensors[base + ".qzeros"]
    scales = tensors[base + ".scales"].float()
    n = scales.shape[1]
    if quant.method == "gptq":
        q = _unpack_along_rows(qweight).t()
        zeros = _unpack_along_cols(qzeros).float() + quant.zero_offset
    else:
        q = _unpack_along_cols(qweight, AWQ_REVERSE_ORDER).t()
        zeros = _unpack_along_cols(qzeros, AWQ_REVERSE_ORDER).float()
    k = q.shape[1]
    group_size = quant.group_size if quant.group_size > 0 else k
    g_idx = tensors.get(base + ".g_idx")
    if g_idx is None and quant.desc_act:
        raise CheckpointError(f"{base}: quantization_config has desc_act true (groups in activation order), "
                              f"but the checkpoint has no {base}.g_idx saying which input is in which group")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
            raise CheckpointError(f"{base}.g_idx: group indices must lie in [0, {scales.shape[0]})")
        if torch.equal(g_idx, torch.arange(k) // group_size):
            g_idx = None  # the usual case: groups in input order
    return Int4Weight(q.contiguous(), scales.t().contiguous(), zeros[:, :n].t().contiguous(), group_size, g_idx)

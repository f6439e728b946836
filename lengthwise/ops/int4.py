"""4-bit weights as the Triton W4A16 kernel reads them (`lengthwise.ops.triton.int4`).

A GPTQ or AWQ checkpoint (or `quantization="int4"`) served on CUDA keeps its weights in 4 bits: a
batch-1 decode step streams every weight once, so half a byte a weight instead of bfloat16's two
is up to 4x less to read, and a model takes about a quarter of the memory (the rest goes to the KV
cache). `PackedInt4` is GPTQ's own layout, which the kernel reads in coalesced rows of words:

- `qweight` int32 `[k / 8, n]`: input `8i + j` of output column c in bits `4j .. 4j + 3` of
  `qweight[i, c]`;
- `scales` float32 and `zeros` uint8 `[groups, n]`: weight `(c, i) = (q - zeros[g, c]) * scales[g, c]`
  with `g = g_idx[i]`;
- `g_idx` int32 `[k]`: each input's group (`i // group_size`, or an act-ordered GPTQ checkpoint's
  own numbering: the kernel looks each group up, so no input order is imposed).

(The CPU's fused path has its own 4-bit panels: `lengthwise.ops.cpu.pack_int4_panels`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class PackedInt4:
    """A `[n, k]` weight in 4 bits, in the layout above, on the device it is used on."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    @property
    def k(self) -> int:
        return self.g_idx.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.g_idx))

    def values(self) -> torch.Tensor:
        """The 4-bit values `q [n, k]` (uint8)."""
        q = (self.qweight.unsqueeze(1) >> _SHIFTS.to(self.device)[:, None]) & 15
        return q.reshape(self.k, self.n).t().to(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The `[n, k]` weight in `dtype` (computed in float32, as the kernel does)."""
        g = self.g_idx.long()
        w = (self.values().float() - self.zeros[g].t().float()) * self.scales[g].t()
        return w.to(dtype)


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups: torch.Tensor,
              device: torch.device | str) -> PackedInt4:
    """`q [n, k]` (values 0..15), `scales [n, G]`, integral `zeros [n, G]` in 0..15 and each input's
    group `groups [k]` as a `PackedInt4` on `device`. `k` must be a multiple of 8 (eight values a word)."""
    n, k = q.shape
    if k % 8:
        raise ValueError(f"pack_int4: k must be a multiple of 8 (eight 4-bit values per int32), got {k}")
    if scales.shape != zeros.shape or scales.shape[0] != n or groups.shape != (k,):
        raise ValueError(f"pack_int4: scales {list(scales.shape)} and zeros {list(zeros.shape)} must be [n, groups] "
                         f"and groups {list(groups.shape)} [k] for q {list(q.shape)}")
    nibbles = q.t().to(torch.int32).reshape(k // 8, 8, n)
    words = nibbles[:, 0]
    for j in range(1, 8):  # (an OR, not a sum: the top nibble reaches the sign bit)
        words = words | (nibbles[:, j] << (4 * j))
    return PackedInt4(words.contiguous().to(device), scales.t().float().contiguous().to(device),
                      zeros.t().to(torch.uint8).contiguous().to(device), groups.to(torch.int32).to(device))

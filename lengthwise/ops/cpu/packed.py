"""Linear weights prepacked for oneDNN's inner product: the CPU path for steps of many rows.

`F.linear` hands float32 CPU matmuls to MKL's GEMM, which re-packs the weight for every call; at
the decode batches the engine runs (16 to 256 rows) that re-packing costs as much as the product
(docs/benchmarks.md: 61 against 92 GFLOP/s at 16 rows, 142 against 192 at 64). A weight reordered
once into oneDNN's blocked layout skips it, for any number of rows. The packed copy lives beside
the plain weight (which the fused few-row path and the GPU need), so on the CPU the model's weights
take twice their memory; `LENGTHWISE_CPU_PACKED=0` turns packing off.
"""

from __future__ import annotations

import os
import warnings

import torch

PACKED_ENV = "LENGTHWISE_CPU_PACKED"


def enabled() -> bool:
    """Whether float32 CPU weights are packed (`LENGTHWISE_CPU_PACKED`, default on)."""
    return os.environ.get(PACKED_ENV, "1") != "0" and torch.backends.mkldnn.is_available()


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight [N, K]` reordered for `linear`, or `None` where packing does not apply (not a float32
    CPU tensor, packing off, or this torch build has no oneDNN linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or not enabled():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
    except (RuntimeError, AttributeError) as e:  # a torch built without these ops
        warnings.warn(f"prepacking linear weights failed ({e}); using F.linear", stacklevel=2)
        return None


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [M, K] @ weight^T + bias` with `packed = pack(weight)`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

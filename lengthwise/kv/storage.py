"""The KV cache's storage: per layer, one K and one V pool of fixed-size blocks, allocated once."""

from __future__ import annotations

import torch


class KVCacheStorage:
    """Per-layer K and V pools, each `[num_blocks * block_size, kv_heads, head_dim]`.

    Blocks are addressed through flat slots (`block * block_size + offset`), so writing a token's
    key is one `index_copy_` and reading a context is one gather. Nothing here is reallocated
    after construction.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V together."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks `(src, dst)` in every layer's K and V (beam search forks a partly
        filled block this way). Sources and destinations must not overlap."""
        if not copies:
            return
        bs, device = self.block_size, self.k[0].device
        offsets = torch.arange(bs, device=device)
        src = (torch.tensor([s for s, _ in copies], device=device)[:, None] * bs + offsets).reshape(-1)
        dst = (torch.tensor([d for _, d in copies], device=device)[:, None] * bs + offsets).reshape(-1)
        for pool in (*self.k, *self.v):
            if pool.element_size() == 1:  # float8: no index_copy_ on the CPU; the bytes are the values
                pool = pool.view(torch.uint8)
            pool.index_copy_(0, dst, pool.index_select(0, src))

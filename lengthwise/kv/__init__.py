"""Segment + paged KV cache: block bookkeeping (pure Python) and the storage tensors."""

from lengthwise.kv.block_manager import BlockPool, KVBlockManager, Segment

__all__ = ["BlockPool", "KVBlockManager", "Segment"]

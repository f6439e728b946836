"""Segment + paged KV cache: storage tensors here, block bookkeeping (pure Python) beside them."""

from lengthwise.kv.storage import KVCacheStorage

__all__ = ["KVCacheStorage"]

"""The pure-Python block manager: prompt segments shared by samples, response segments, freeing."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from lengthwise.kv import BlockPool, KVBlockManager


def test_module_has_no_torch():
    import lengthwise.kv.block_manager as bm

    tree = ast.parse(Path(bm.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported and "numpy" not in imported


def test_pool_allocate_release_and_exhaustion():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    assert pool.allocate(2) is None and pool.num_free == 1  # all or nothing
    pool.retain(a[:1])
    pool.release(a)
    assert pool.num_free == 3 and pool.refcount(a[0]) == 1
    pool.release(a[:1])
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="already free"):
        pool.release(a[:1])
    with pytest.raises(ValueError, match="cannot be shared"):
        pool.retain(a[:1])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_n_samples_store_the_prompt_once():
    m = KVBlockManager(num_blocks=32, block_size=4)
    for i in range(4):
        m.add_sequence(f"r0-{i}", "r0")
    assert m.grow_prompt("r0", 10)  # 3 blocks, shared by 4 samples
    prompt = m.prompt_segment("r0")
    assert len(prompt.blocks) == 3 and m.num_free_blocks == 29
    assert all(m.pool.refcount(b) == 4 for b in prompt.blocks)
    for i in range(4):
        assert m.grow_response(f"r0-{i}", 1)
    assert m.num_free_blocks == 25  # one response block each, the prompt still once
    responses = [set(m.response_segment(f"r0-{i}").blocks) for i in range(4)]
    assert not set.intersection(*responses) and not (set.union(*responses) & set(prompt.blocks))
    m.free_sequence("r0-0")
    assert m.num_free_blocks == 26 and all(m.pool.refcount(b) == 3 for b in prompt.blocks)
    for i in range(1, 4):
        m.free_sequence(f"r0-{i}")
    assert m.num_free_blocks == 32


def test_chunked_prompt_growth_keeps_sharing():
    m = KVBlockManager(num_blocks=16, block_size=4)
    m.add_sequence("a", "r")
    m.add_sequence("b", "r")
    assert m.grow_prompt("r", 3) and m.grow_prompt("r", 9)
    assert len(m.prompt_segment("r").blocks) == 3 and m.prompt_segment("r").num_tokens == 9
    assert all(m.pool.refcount(b) == 2 for b in m.prompt_segment("r").blocks)
    m.free_sequence("a")
    m.free_sequence("b")
    assert m.num_free_blocks == 16


def test_response_grows_a_block_at_a_time():
    m = KVBlockManager(num_blocks=8, block_size=4)
    m.add_sequence("s", "r")
    m.grow_prompt("r", 5)
    free = m.num_free_blocks
    for n in range(1, 10):
        assert m.grow_response("s", n)
        assert len(m.response_segment("s").blocks) == -(-n // 4)
    assert m.num_free_blocks == free - 3


def test_out_of_blocks_returns_false_and_takes_nothing():
    m = KVBlockManager(num_blocks=3, block_size=4)
    m.add_sequence("s", "r")
    assert m.grow_prompt("r", 8)
    assert not m.grow_response("s", 5)  # needs 2, 1 free
    assert m.num_free_blocks == 1 and m.response_segment("s").blocks == []
    m.free_sequence("s")  # preemption frees everything
    assert m.num_free_blocks == 3


def test_errors_and_idempotent_free():
    m = KVBlockManager(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="no sequences attached"):
        m.grow_prompt("ghost", 3)
    m.add_sequence("s", "r")
    with pytest.raises(ValueError, match="already exists"):
        m.add_sequence("s", "r")
    m.free_sequence("s")
    m.free_sequence("s")  # aborting twice is harmless
    assert m.num_free_blocks == 4
    with pytest.raises(ValueError, match="block_size"):
        KVBlockManager(4, 0)


def test_random_workload_never_leaks():
    rng = random.Random(0)
    m = KVBlockManager(num_blocks=64, block_size=4)
    live: dict[str, list[str]] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.3 and len(live) < 10:
            rid = f"r{step}"
            live[rid] = [f"{rid}-{i}" for i in range(rng.randint(1, 4))]
            for sid in live[rid]:
                m.add_sequence(sid, rid)
            if not m.grow_prompt(rid, rng.randint(1, 30)):
                for sid in live.pop(rid):
                    m.free_sequence(sid)
        elif op < 0.8 and live:
            rid = rng.choice(list(live))
            sid = rng.choice(live[rid])
            m.grow_response(sid, m.response_segment(sid).num_tokens + rng.randint(1, 6))
        elif live:
            rid = rng.choice(list(live))
            sid = live[rid].pop()
            m.free_sequence(sid)
            if not live[rid]:
                del live[rid]
        used = {b for rid, sids in live.items() for b in m.prompt_segment(rid).blocks}
        used |= {b for sids in live.values() for s in sids for b in m.response_segment(s).blocks}
        assert m.num_free_blocks + len(used) == 64
    for sids in live.values():
        for sid in sids:
            m.free_sequence(sid)
    assert m.num_free_blocks == 64


def test_prefix_cache_reuses_whole_blocks_and_evicts_oldest_free_first():
    m = KVBlockManager(6, 4, enable_prefix_caching=True)
    tokens = list(range(10, 21))  # 11 tokens: 2 full blocks + 3
    m.add_sequence("a0", "a")
    assert m.match_prefix("a", tokens) == 0
    m.grow_prompt("a", 11)
    m.cache_prompt("a", tokens, 11)
    assert m.num_cached_blocks == 2  # the partial third block is never cached
    a_blocks = list(m.prompt_segment("a").blocks)
    # A second request with the same first 8 tokens shares those blocks, while "a" still runs.
    m.add_sequence("b0", "b")
    m.add_sequence("b1", "b")
    assert m.match_prefix("b", tokens[:8] + [99, 98]) == 8
    assert m.prompt_segment("b").blocks == a_blocks[:2]
    assert m.pool.refcount(a_blocks[0]) == 3  # a0, b0, b1
    # Equal prompts reuse all but the block holding the last token (its logits must be computed).
    m.add_sequence("c0", "c")
    assert m.match_prefix("c", tokens[:8]) == 4
    for s in ("a0", "b0", "b1", "c0"):
        m.free_sequence(s)
    assert m.num_free_blocks == 6 and m.num_cached_blocks == 2  # free, yet still cached
    m.add_sequence("d0", "d")
    assert m.match_prefix("d", tokens) == 8  # a hit on free blocks takes them back
    assert m.num_free_blocks == 4
    m.free_sequence("d0")
    m.add_sequence("e0", "e")
    m.grow_prompt("e", 6 * 4)  # needs every block: the cached ones are evicted
    assert m.num_cached_blocks == 0
    m.free_sequence("e0")
    m.add_sequence("f0", "f")
    assert m.match_prefix("f", tokens) == 0


def test_prefix_cache_off_matches_nothing():
    m = KVBlockManager(6, 4)
    m.add_sequence("a0", "a")
    m.grow_prompt("a", 9)
    m.cache_prompt("a", list(range(9)), 9)
    m.add_sequence("b0", "b")
    assert m.match_prefix("b", list(range(9))) == 0


def test_shared_prefix_blocks_and_reclaimable_predict_what_admission_and_freeing_do():
    """What priority preemption reads without touching anything: the cached prefix blocks a new
    prompt would share with running requests, and the blocks freeing a request would return."""
    kv = KVBlockManager(num_blocks=20, block_size=4, enable_prefix_caching=True)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks + 1
    kv.add_sequence("a-0", "a")
    kv.add_sequence("a-1", "a")  # two samples share the prompt segment
    assert kv.grow_prompt("a", 13) and kv.grow_response("a-0", 5) and kv.grow_response("a-1", 1)
    kv.cache_prompt("a", prompt, 13)
    longer = prompt + [99, 98, 97]
    assert kv.shared_prefix_blocks(longer) == 3  # held by "a": a request with it needs 3 fewer
    assert kv.shared_prefix_blocks(longer, namespace=7) == 0  # another adapter's cache
    assert kv.reclaimable(["a-0", "a-1"]) == 4 + 2 + 1  # prompt + both responses
    assert kv.reclaimable(["a-0"]) == 2  # one sample alone keeps the shared prompt
    kv.add_sequence("b-0", "b")
    assert kv.match_prefix("b", longer) == 12
    assert kv.reclaimable(["a-0", "a-1"]) == 1 + 3  # "b" now shares the 3 cached blocks
    free = kv.num_free_blocks
    kv.free_sequence("a-0")
    kv.free_sequence("a-1")
    assert kv.num_free_blocks == free + 4 and kv.reclaimable(["a-0"]) == 0
    kv.free_sequence("b-0")
    assert kv.shared_prefix_blocks(longer) == 0  # still cached, but on the free list: saves nothing

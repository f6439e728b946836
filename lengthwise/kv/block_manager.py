"""Block bookkeeping for the segment KV cache. Pure Python: no torch, testable on its own.

Each request owns one *prompt segment*: the blocks holding its prompt's keys and values, computed
once and shared by all `n` samples of the request through reference counts. Each sample (a
*sequence*) owns one *response segment* that grows a block at a time as it generates. A sequence's
context is its prompt segment followed by its response segment, so a response never writes into
a shared prompt block and no block is ever copied.

The manager never raises when memory runs out: growth returns `False`, and the caller (the engine)
preempts a sequence with `free_sequence` and recomputes it later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class BlockPool:
    """A fixed set of block ids with reference counts. Block ids are `0 .. num_blocks - 1`.

    Free blocks are kept in release order; `allocate` takes the longest-free first, so a freed
    block that still holds a cached prompt prefix survives as long as possible (LRU eviction).
    `reclaim` takes a specific free block back (a prefix-cache hit).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered set
        self._refs = [0] * num_blocks
        self.on_evict: Callable[[int], None] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh blocks with a reference count of 1, or `None` (nothing taken) if too few are free."""
        if n > len(self._free):
            return None
        blocks = []
        for _ in range(n):
            b = next(iter(self._free))
            del self._free[b]
            self._refs[b] = 1
            if self.on_evict is not None:
                self.on_evict(b)
            blocks.append(b)
        return blocks

    def reclaim(self, block: int) -> None:
        """Take one reference to `block`, whether it is in use or free (then it leaves the free list)."""
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    def retain(self, blocks: list[int]) -> None:
        """Add a reference to blocks that are already allocated."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop a reference; a block whose count reaches 0 returns to the free list."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is already free")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None


@dataclass
class Segment:
    """A run of blocks and how many token slots of it are in use."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class KVBlockManager:
    """Prompt segments per request, response segments per sequence, on one `BlockPool`.

    A request's prompt segment exists while at least one of its sequences is attached; every
    attached sequence holds one reference to every prompt block, so the blocks return to the pool
    exactly when the last sample of the request is freed.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        # Prefix cache: full prompt blocks by (parent key's hash, their tokens), chained from the
        # first block, so a hit means the whole prefix up to and including that block is equal.
        self.enable_prefix_caching = enable_prefix_caching
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.pool.on_evict = self._evict
        self._prompts: dict[str, Segment] = {}
        self._users: dict[str, set[str]] = {}
        self._responses: dict[str, Segment] = {}
        self._request_of: dict[str, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def add_sequence(self, seq_id: str, request_id: str) -> None:
        """Attach a sample to its request's prompt segment (created empty for the first sample),
        taking a reference to every prompt block already there: sharing, not copying."""
        if seq_id in self._responses:
            raise ValueError(f"sequence {seq_id!r} already exists")
        prompt = self._prompts.setdefault(request_id, Segment())
        users = self._users.setdefault(request_id, set())
        if users:
            self.pool.retain(prompt.blocks)
        users.add(seq_id)
        self._request_of[seq_id] = request_id
        self._responses[seq_id] = Segment()

    def grow_prompt(self, request_id: str, num_tokens: int) -> bool:
        """Make the request's prompt segment hold `num_tokens` tokens (chunked prefill grows it in
        steps). New blocks get one reference per attached sample. Returns `False`, allocating
        nothing, if the pool has too few free blocks."""
        users = self._users.get(request_id)
        if not users:
            raise ValueError(f"request {request_id!r} has no sequences attached")
        prompt = self._prompts[request_id]
        before = len(prompt.blocks)
        if not self._grow(prompt, num_tokens):
            return False
        new = prompt.blocks[before:]
        for _ in range(len(users) - 1):
            self.pool.retain(new)
        return True

    def grow_response(self, seq_id: str, num_tokens: int) -> bool:
        """Make the sequence's response segment hold `num_tokens` tokens. `False` if out of blocks."""
        return self._grow(self._responses[seq_id], num_tokens)

    def match_prefix(self, request_id: str, tokens: Sequence[int], namespace: int = 0) -> int:
        """Attach the cached blocks of the longest cached prefix of `tokens` (whole blocks, and never
        the last token, whose logits must be computed) to the request's still empty prompt segment,
        one reference per attached sample. Returns how many prompt tokens need no computing.
        `namespace`: prefixes are only shared within one (a LoRA adapter's id: its keys and values
        differ from the base model's for the same tokens; 0, the base model)."""
        users = self._users.get(request_id)
        if not users:
            raise ValueError(f"request {request_id!r} has no sequences attached")
        prompt = self._prompts[request_id]
        if not self.enable_prefix_caching or prompt.blocks:
            return 0
        matched = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.block_size, namespace):
            block = self._cached.get(key)
            if block is None:
                break
            matched.append(block)
        for block in matched:
            for _ in users:
                self.pool.reclaim(block)
        prompt.blocks.extend(matched)
        prompt.num_tokens = len(matched) * self.block_size
        return prompt.num_tokens

    def shared_prefix_blocks(self, tokens: Sequence[int], namespace: int = 0) -> int:
        """How many blocks of the longest cached prefix of `tokens` (as `match_prefix` would find
        it) are held by running requests now, so that a request with this prompt would share them
        rather than need blocks of its own (a cached block on the free list saves nothing: taking
        it back takes it off the free list). Reads only."""
        if not self.enable_prefix_caching:
            return 0
        shared = 0
        for key in self._keys(tokens, (len(tokens) - 1) // self.block_size, namespace):
            block = self._cached.get(key)
            if block is None:
                break
            shared += self.pool.refcount(block) > 0
        return shared

    def reclaimable(self, seq_ids: Sequence[str]) -> int:
        """Blocks that freeing all of `seq_ids` (every attached sample of one request) would return
        to the free list: their response blocks, and the prompt blocks no other request shares
        (a prefix another request reuses stays). Unknown ids count nothing."""
        blocks: dict[int, int] = {}
        for seq_id in seq_ids:
            response = self._responses.get(seq_id)
            if response is None:
                continue
            for b in (*response.blocks, *self._prompts[self._request_of[seq_id]].blocks):
                blocks[b] = blocks.get(b, 0) + 1
        return sum(self.pool.refcount(b) == n for b, n in blocks.items())

    def cache_prompt(self, request_id: str, tokens: Sequence[int], num_computed: int, namespace: int = 0) -> None:
        """Offer the request's full prompt blocks within its first `num_computed` tokens (their keys
        and values written) as prefixes for later requests of the same `namespace` (see
        `match_prefix`). Freed, they stay cached until evicted."""
        if not self.enable_prefix_caching:
            return
        blocks = self._prompts[request_id].blocks
        for i, key in enumerate(self._keys(tokens, num_computed // self.block_size, namespace)):
            if blocks[i] not in self._key_of and key not in self._cached:
                self._cached[key] = blocks[i]
                self._key_of[blocks[i]] = key

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (later prompts compute theirs); blocks in use stay with their
        requests, which may offer their prompts again. Returns how many blocks were forgotten."""
        forgotten = len(self._cached)
        self._cached.clear()
        self._key_of.clear()
        return forgotten

    def _keys(self, tokens: Sequence[int], num_blocks: int, namespace: int = 0):  # noqa: ANN202 (generator of keys)
        # A namespace's chain starts from its own root, so no key of one equals a key of another.
        bs, parent = self.block_size, 0 if namespace == 0 else hash(("namespace", namespace))
        for i in range(num_blocks):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            yield key
            parent = hash(key)

    def _evict(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._cached[key]

    def prompt_segment(self, request_id: str) -> Segment:
        return self._prompts[request_id]

    def response_segment(self, seq_id: str) -> Segment:
        return self._responses[seq_id]

    def free_sequence(self, seq_id: str) -> None:
        """Free a finished, aborted or preempted sample: its response blocks and its prompt references.
        The prompt blocks return to the pool with the request's last sample. Unknown ids are ignored."""
        response = self._responses.pop(seq_id, None)
        if response is None:
            return
        self.pool.release(response.blocks)
        request_id = self._request_of.pop(seq_id)
        self.pool.release(self._prompts[request_id].blocks)
        users = self._users[request_id]
        users.discard(seq_id)
        if not users:
            del self._prompts[request_id], self._users[request_id]

    def fork_responses(self, sources: Sequence[tuple[str, str]]) -> list[tuple[int, int]]:
        """Beam search: make each `(dst, src)` pair's destination sequence continue from its source's
        response segment as it stands before the call (a source may feed several destinations, or
        none: its blocks are released). All sequences named must belong to one request, and every
        segment holds the same number of tokens (beams step together).

        Full blocks are shared (one more reference per extra child); a partly filled last block is
        written to as the sequence grows, so one child keeps it (the source itself if it is a
        child) and each other child gets a copy of it. Returns the `(src_block, dst_block)` copies
        the caller must make in the KV storage before anything is written. A copy goes into the
        partly filled block of a source no child took (there is one for each copy, as every
        segment holds as many tokens), so forks take no free block. A destination that
        does not keep its own segment holds another list afterwards (its source's, or a new one):
        the executor recognises a table by its list (see `DecodeRows`), and no two segments share
        one (`_grow` extends it in place)."""
        dsts = [dst for dst, _ in sources]
        if len(set(dsts)) != len(dsts) or not {src for _, src in sources} <= set(dsts):
            raise ValueError("fork_responses: each destination once, and every source among the destinations")
        old = {dst: self._responses[dst] for dst in dsts}
        children: dict[str, list[str]] = {}
        for dst, src in sources:
            children.setdefault(src, []).append(dst)
        kept: dict[str, str] = {}  # source -> the child that takes its segment as it is
        for src, dsts_of in children.items():
            kept[src] = src if src in dsts_of else dsts_of[0]
        # Segments no one continues. Their partly filled last blocks (each a segment's own) become
        # the copies' blocks: taking fresh ones instead would evict cached prefixes from the pool.
        spares: list[int] = []
        for seq_id, seg in old.items():
            if seq_id not in children:
                if seg.num_tokens % self.block_size and self.pool.refcount(seg.blocks[-1]) == 1:
                    spares.append(seg.blocks[-1])
                    self.pool.release(seg.blocks[:-1])
                else:
                    self.pool.release(seg.blocks)
        copies: list[tuple[int, int]] = []
        new: dict[str, Segment] = {}
        for src, dsts_of in children.items():
            seg = old[src]
            if len(seg.blocks) != self.blocks_for(seg.num_tokens):
                raise ValueError(f"fork_responses: sequence {src!r} holds blocks beyond its tokens")
            new[kept[src]] = seg if kept[src] == src else Segment(seg.blocks, seg.num_tokens)
            partial = seg.num_tokens % self.block_size != 0
            shared = seg.blocks[:-1] if partial else seg.blocks
            for dst in dsts_of:
                if dst == kept[src]:
                    continue
                blocks = list(shared)
                self.pool.retain(shared)
                if partial:
                    fresh = [spares.pop()] if spares else self.pool.allocate(1)
                    if fresh is None:  # (cannot happen: see above)
                        raise RuntimeError("out of KV blocks while forking beams")
                    copies.append((seg.blocks[-1], fresh[0]))
                    blocks.append(fresh[0])
                new[dst] = Segment(blocks, seg.num_tokens)
        self.pool.release(spares)
        self._responses.update(new)
        return copies

    def _grow(self, seg: Segment, num_tokens: int) -> bool:
        if num_tokens <= len(seg.blocks) * self.block_size:  # most decode steps: the last block has room
            if num_tokens > seg.num_tokens:
                seg.num_tokens = num_tokens
            return True
        need = self.blocks_for(num_tokens) - len(seg.blocks)
        if need > 0:
            new = self.pool.allocate(need)
            if new is None:
                return False
            seg.blocks.extend(new)
        seg.num_tokens = max(seg.num_tokens, num_tokens)
        return True

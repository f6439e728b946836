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

from collections import deque
from dataclasses import dataclass, field


class BlockPool:
    """A fixed set of block ids with reference counts. Block ids are `0 .. num_blocks - 1`."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh blocks with a reference count of 1, or `None` (nothing taken) if too few are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

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
                self._free.append(b)


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

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
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

    def _grow(self, seg: Segment, num_tokens: int) -> bool:
        need = self.blocks_for(num_tokens) - len(seg.blocks)
        if need > 0:
            new = self.pool.allocate(need)
            if new is None:
                return False
            seg.blocks.extend(new)
        seg.num_tokens = max(seg.num_tokens, num_tokens)
        return True

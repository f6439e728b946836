"""Decode steps replayed as CUDA graphs at bucketed batch sizes.

A batch-1 decode step of a 1B model is about 0.8 ms of weight reads on an H100, but launching its
~150 kernels from Python takes several milliseconds. So, as gpt-fast and nano-vllm do, every
decode-only step of up to `max_batch` rows runs a graph captured once at start-up for the
smallest bucket that holds it (1, 2, 4, 8, then multiples of 16). The graph reads its inputs
from static buffers: token ids, positions, cache slots, both segments' block tables and lengths.
The rows past the real batch are padding: they attend to one token of a scratch block that the
block manager never hands out, and write their keys there, so they never touch a real sequence.

The decode attention kernel normally chooses its split-K partition count from the step's longest
context; a graph cannot, so each bucket fixes the count from `max_model_len`, and each sequence
divides its own context among those partitions (a partition past its context exits at once).
On the CPU (tests) the same buffers run eagerly, without capture.

A step can also be launched ahead (`prelaunch`): the engine queues the next decode step of the
same rows, its input tokens copied on the device from this step's sampler output, before the host
reads those tokens back; the host's bookkeeping (stop checks, detokenizing, scheduling) then runs
while the GPU computes. The next `run` uses that step's outputs when its rows are the rows
launched, or some of them in the same order and the same bucket (the others stopped or were
aborted: their rows are gathered out), at the same positions, slots and tables; otherwise it runs
as usual. Either way each row's result is bit for bit what a synchronous step computes. The keys and
values an unused row wrote sit past the end of its sequence, or in blocks freed after it, which
any later write reaches only after it in stream order, or (rows launched past their last token,
`ModelRunner.prelaunch_next`) in the scratch block, so nothing reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lengthwise.kv.storage import KVCacheStorage
from lengthwise.model.llama import CausalLM
from lengthwise.ops import AttentionMetadata
from lengthwise.ops.attention import KernelTensors


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The bucket sizes captured for a largest batch of `max_batch` rows: 1, 2, 4, 8, 16, 32, ...
    in steps of 16, always ending at `max_batch` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes) | {max_batch})


@dataclass
class DecodeRows:
    """One decode step on the host: per row, its token, position, cache slot and both segments.

    The tables are the block manager's own lists (`Segment.blocks`), not copies: a live segment
    only ever gains blocks at its end, so while this holds a list, the same list at the same
    lengths is the same table, which is how `rows_within` compares them in O(1).
    """

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    prompt_tables: list[list[int]]
    prompt_lens: list[int]
    response_tables: list[list[int]]
    response_lens: list[int]

    def rows_within(self, launched: DecodeRows) -> list[int] | None:
        """Where each of these rows is among `launched` (same position, slot, lengths and table
        lists; tokens aside), in order, when these are `launched` or a subsequence of it (rows
        that finished dropped out); None otherwise."""
        where, j, m = [], 0, len(launched.positions)
        pos, slots, p_lens, r_lens = launched.positions, launched.slots, launched.prompt_lens, launched.response_lens
        p_tabs, r_tabs = launched.prompt_tables, launched.response_tables
        for i in range(len(self.positions)):
            row = (self.positions[i], self.slots[i], self.prompt_lens[i], self.response_lens[i])
            p_tab, r_tab = self.prompt_tables[i], self.response_tables[i]
            while j < m and ((pos[j], slots[j], p_lens[j], r_lens[j]) != row
                             or p_tabs[j] is not p_tab or r_tabs[j] is not r_tab):
                j += 1
            if j == m:
                return None
            where.append(j)
            j += 1
        return where


@dataclass
class _Staging:
    """Host copies of a bucket's two input buffers (pinned on CUDA) and the event after their last
    upload: a step launched ahead fills one while the previous step's upload may be in flight.

    `tables` remembers, per row, which table lists it holds and how many of their blocks (in the
    layout of bucket `size`), so the next fill writes only the blocks added since, usually none."""

    longs: torch.Tensor
    ints: torch.Tensor
    uploaded: torch.cuda.Event | None = None  # created on the first upload, re-recorded after each
    size: int = 0
    tables: list[tuple[list[int], int, list[int], int]] = field(default_factory=list)


class _Bucket:
    """One bucket's device inputs, in two flat buffers so that a step fills them with two copies:
    int64 `[ids | positions | slots]` and int32 `[prompt lens | response lens | prompt tables |
    response tables]` (tables `[size, width]`, row-major)."""

    def __init__(self, size: int, width: int, device: torch.device) -> None:
        self.size, self.width = size, width
        self.longs = torch.zeros(3 * size, dtype=torch.long, device=device)
        self.ints = torch.zeros(2 * size + 2 * size * width, dtype=torch.int32, device=device)
        self.ids, self.positions, self.slots = self.longs.view(3, size)
        self.prompt_lens, self.response_lens = self.ints[:2 * size].view(2, size)
        self.prompt_tables, self.response_tables = self.ints[2 * size:].view(2, size, width)
        self.query_start = torch.arange(size + 1, dtype=torch.int32, device=device)


class DecodeGraphs:
    """Static input buffers, one captured graph per bucket size, and the replay that fills them."""

    def __init__(self, model: CausalLM, cache: KVCacheStorage, scratch_block: int, max_model_len: int,
                 max_batch: int, capture: bool | None = None) -> None:
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.scratch_block = scratch_block
        self.max_model_len = max_model_len
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.width = -(-max_model_len // self.block_size)
        dev, m = model.device, self.max_batch
        self._buckets = {size: _Bucket(size, self.width, dev) for size in self.sizes}
        # Host staging, pinned on CUDA so that the two copies per step are asynchronous; two sets,
        # used in turn, each reused only after its last upload is done.
        pin = dev.type == "cuda"
        self._staging = [_Staging(torch.zeros(3 * m, dtype=torch.long, pin_memory=pin),
                                  torch.zeros(2 * m + 2 * m * self.width, dtype=torch.int32, pin_memory=pin))
                         for _ in range(2)]
        self._turn = 0
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # The step launched ahead: its rows (tokens aside) and outputs; how many were, were used, and
        # were used for some of their rows only.
        self._ahead: tuple[DecodeRows, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.launched_ahead = self.used_ahead = self.used_ahead_in_part = 0
        for size in self.sizes:
            self._fill(DecodeRows([], [], [], [], [], [], []), size)
        if self.capture:
            self._capture_all()

    def run(self, rows: DecodeRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one decode step; returns (final hidden states, float32 logits) for the real rows.

        Both are views of static buffers, valid until the next call (or gathered from them, when
        the step launched ahead had more rows)."""
        n = len(rows.token_ids)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a graphed decode step takes 1 to {self.max_batch} rows, got {n}")
        ahead, self._ahead = self._ahead, None
        where = None
        # Only within the same bucket: another bucket runs other kernels (split counts, GEMM shapes,
        # the single-row path), so its rows would not be bit for bit what this step computes.
        if ahead is not None and self.bucket(len(ahead[0].positions)) == self.bucket(n):
            where = rows.rows_within(ahead[0])
        if where is None:
            hidden, logits = self._launch(rows)
            return hidden[:n], logits[:n]
        # Launched ahead with the tokens `rows` carries (the sampler's, copied on the device).
        self.used_ahead += 1
        hidden, logits = ahead[1]
        if where == list(range(n)):
            return hidden[:n], logits[:n]
        self.used_ahead_in_part += 1
        index = torch.tensor(where, dtype=torch.long)
        if hidden.is_cuda:  # from pinned memory, so the copy does not wait for the step in flight
            index = index.pin_memory().to(hidden.device, non_blocking=True)
        return hidden.index_select(0, index), logits.index_select(0, index)

    def prelaunch(self, rows: DecodeRows, token_ids: torch.Tensor) -> None:
        """Queue a decode step of `rows` whose input tokens are `token_ids [len(rows)]`, on the
        device (`rows.token_ids` is not read); the next `run` uses its outputs if its rows match."""
        n = len(rows.positions)
        if not 0 < n <= self.max_batch or token_ids.shape != (n,):
            raise ValueError(f"a step launched ahead takes 1 to {self.max_batch} rows and one token per row, "
                             f"got {n} rows and tokens {list(token_ids.shape)}")
        self._ahead = (rows, self._launch(rows, token_ids))
        self.launched_ahead += 1

    def drop_ahead(self) -> None:
        """Forget the step launched ahead (the engine ran something else)."""
        self._ahead = None

    def bucket(self, n: int) -> int:
        """The graph (batch size) a step of `n` rows runs in."""
        return next(s for s in self.sizes if s >= n)

    # -- internals -----------------------------------------------------------------------------

    def _launch(self, rows: DecodeRows, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(rows.positions)
        size = self.bucket(n)
        self._fill(rows, size)
        if token_ids is not None:
            self._buckets[size].ids[:n].copy_(token_ids)  # device to device, after the upload
        if self.capture:
            self._graphs[size].replay()
            return self._outputs[size]
        return self._forward(size, rows)

    def _fill(self, rows: DecodeRows, size: int) -> None:
        """Write the real rows, then padding up to `size`, in the bucket's layout, and copy them over.
        (Token ids past the list `rows.token_ids` holds are left as they are: `prelaunch` copies them.)"""
        n, bs, w = len(rows.positions), self.block_size, self.width
        staging = self._staging[self._turn]
        self._turn ^= 1
        if staging.uploaded is not None:
            staging.uploaded.synchronize()  # its last upload has left (long done, except just after a prelaunch)
        longs = staging.longs[:3 * size].numpy().reshape(3, size)
        ints = staging.ints[:2 * size + 2 * size * w].numpy()
        lens, tables = ints[:2 * size].reshape(2, size), ints[2 * size:].reshape(2, size, w)
        longs[0, :len(rows.token_ids)] = rows.token_ids
        longs[1, :n], longs[2, :n] = rows.positions, rows.slots
        longs[:2, n:] = 0
        longs[2, n:] = self.scratch_block * bs
        lens[0, :n], lens[1, :n] = rows.prompt_lens, rows.response_lens
        lens[0, n:], lens[1, n:] = 1, 0  # padding: one key, the scratch block's first slot
        self._write_tables(staging, tables, rows, size)
        bucket = self._buckets[size]
        asynchronous = bucket.longs.is_cuda
        bucket.longs.copy_(staging.longs[:3 * size], non_blocking=asynchronous)
        bucket.ints.copy_(staging.ints[:bucket.ints.numel()], non_blocking=asynchronous)
        if asynchronous:
            if staging.uploaded is None:
                staging.uploaded = torch.cuda.Event()
            staging.uploaded.record(torch.cuda.current_stream(bucket.longs.device))

    def _write_tables(self, staging: _Staging, tables: np.ndarray, rows: DecodeRows, size: int) -> None:
        """Fill `tables [2, size, width]` (staging's, bucket `size`'s layout) with the rows' block
        tables. Kernels read a table only up to its segment's length, so entries past it may hold
        anything earlier written (valid block ids all): a row that holds the same lists as when
        this staging last wrote it (they only grow, see `DecodeRows`) gets only its new blocks."""
        if staging.size != size:  # another layout: nothing written is where this bucket reads it
            staging.size, staging.tables = size, []
        written, n = staging.tables, len(rows.positions)
        for i in range(n):
            p, r = rows.prompt_tables[i], rows.response_tables[i]
            if i < len(written):
                old_p, done_p, old_r, done_r = written[i]
                if old_p is p and old_r is r and len(p) >= done_p and len(r) >= done_r:
                    if len(p) > done_p:
                        tables[0, i, done_p:len(p)] = p[done_p:]
                    if len(r) > done_r:
                        tables[1, i, done_r:len(r)] = r[done_r:]
                    written[i] = (p, len(p), r, len(r))
                    continue
                written[i] = (p, len(p), r, len(r))
            else:
                written.append((p, len(p), r, len(r)))
            tables[0, i, :len(p)] = p
            tables[1, i, :len(r)] = r
        del written[n:]
        tables[0, n:, 0] = self.scratch_block  # padding rows: one key, the scratch block's first slot

    def _metadata(self, size: int, rows: DecodeRows | None) -> AttentionMetadata:
        """Metadata whose kernel tensors are the static buffers; the host-side lists (read only by
        the torch reference, which never runs inside a graph) are the real rows' when given."""
        n, b = (0 if rows is None else len(rows.positions)), self._buckets[size]
        prompt_lens = ([] if rows is None else list(rows.prompt_lens)) + [1] * (size - n)
        response_lens = ([] if rows is None else list(rows.response_lens)) + [0] * (size - n)
        meta = AttentionMetadata(list(range(size + 1)), b.slots, self.block_size, b.prompt_tables, prompt_lens,
                                 b.response_tables, response_lens)
        meta.pin_kernel_tensors(KernelTensors(b.query_start, b.prompt_lens, b.response_lens, b.prompt_tables,
                                              b.response_tables, [self.max_model_len] * size, 1,
                                              self.max_model_len, True))
        return meta

    def _forward(self, size: int, rows: DecodeRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        meta, b = self._metadata(size, rows), self._buckets[size]
        hidden = self.model(b.ids, b.positions, meta, self.cache)
        return hidden, self.model.compute_logits(hidden)

    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            self._forward(size)  # compiles the Triton kernels for this bucket's configuration
            torch.cuda.synchronize(self.model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize(self.model.device)


"""Turns a scheduled step into one forward pass: flat tokens, positions, cache slots, block tables.

Every chunk becomes one row-group of `AttentionMetadata`: a prompt chunk's context is its prompt
segment; a sequence chunk's context is the request's prompt segment followed by the sequence's
response segment. Prefill, chunked prefill, recomputation and decode share this one layout, so
a step can mix them freely. A decode row with a draft (speculative decoding) feeds its draft
tokens after its input token, into the next slots of its response segment, and returns logits
at each of those positions. Decode-only steps of up to `graph_batch` rows go through
`DecodeGraphs` instead (CUDA graphs on a GPU) when the runner was built with them.

Rows of requests with a LoRA adapter carry it into the forward pass (`LoRABatch`: the rows of each
adapter); such steps never replay a graph.

Padding rows (`static:pad=true`: the finished rows a vanilla static batch keeps computing) are
extra decode rows that copy a real decode row's token, position and context but write their K/V
into a scratch block, and whose logits are computed and dropped: the same work as transformers'
padded rows, without touching any real sequence.
"""

from __future__ import annotations

import torch

from lengthwise.engine.cuda_graph import DecodeGraphs, DecodeRows
from lengthwise.kv.block_manager import KVBlockManager
from lengthwise.lora.adapter import LoRARegistry
from lengthwise.model.llama import CausalLM
from lengthwise.ops import AttentionMetadata
from lengthwise.ops.lora import LoRABatch
from lengthwise.sched.scheduler import ScheduledChunk
from lengthwise.sequence import Request


class ModelRunner:
    """Owns the KV cache storage (allocated once) and runs the model on scheduled chunks.

    `graph_batch > 0` routes decode-only steps of up to that many rows through `DecodeGraphs`
    (contexts up to `max_model_len`), captured as CUDA graphs unless `capture_graphs` is False
    (then the same static buffers run eagerly: the CPU tests' way to check them). The cache holds
    one more block than `num_blocks`, the padding rows' scratch block. `kv_cache_dtype` (default:
    the model's dtype) is the cache's element type. `loras`: the engine's loaded LoRA adapters
    (None: requests run the base model only).
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_model_len: int | None = None,
                 graph_batch: int = 0, capture_graphs: bool | None = None,
                 kv_cache_dtype: torch.dtype | None = None, loras: LoRARegistry | None = None) -> None:
        self.model = model
        self.loras = loras
        self.block_size = block_size
        self.cache = model.new_kv_cache(num_blocks + 1, block_size, kv_cache_dtype)
        self.scratch_slot = num_blocks * block_size  # block `num_blocks`: padding rows write here
        self.graphs: DecodeGraphs | None = None
        if graph_batch:
            max_len = max_model_len or model.config.max_context
            self.graphs = DecodeGraphs(model, self.cache, num_blocks, max_len, graph_batch, capture_graphs)
        # Final hidden states of the last step's sampling rows (the probe's features at prefill end).
        self.last_hidden: torch.Tensor | None = None
        # The last step's prompt chunks of requests that want prompt logprobs: (request, index of
        # the first prompt token scored, final hidden states of the positions that predict it and
        # the tokens after it, within the prompt).
        self.prompt_hidden: list[tuple[Request, int, torch.Tensor]] = []
        # Embedding requests' prompt chunks of the last step: (request, chunk start, final hidden
        # states of the chunk's positions). Their rows are never sampled (no logits).
        self.pooled_hidden: list[tuple[Request, int, torch.Tensor]] = []

    def run(self, chunks: list[ScheduledChunk], kv: KVBlockManager, padding_rows: int = 0) -> torch.Tensor:
        """Run one step; return float32 logits `[rows, vocab]`: for each chunk with `sample` set, in
        chunk order, one row (1 + len(draft) rows for a decode row with a draft: its input
        token's, then each draft token's). `padding_rows` more decode rows are computed (copies of
        the step's decode rows, see the module docstring) and their logits dropped."""
        self.prompt_hidden = []  # (a graphed step is decode only: it scores no prompt, pools none)
        self.pooled_hidden = []
        if not padding_rows and self._graphed(chunks):
            return self._run_graphed(chunks, kv)
        if self.graphs is not None:
            self.graphs.drop_ahead()
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        prompt_tables: list[list[int]] = []
        prompt_lens: list[int] = []
        resp_tables: list[list[int]] = []
        resp_lens: list[int] = []
        sample_rows: list[int] = []
        adapters: list[int] = []  # each row group's lora_int_id (0: none)
        scored: list[tuple[int, ScheduledChunk]] = []  # (first row, prompt chunk) to score for prompt logprobs
        pooled: list[tuple[int, ScheduledChunk]] = []  # (first row, prompt chunk) of embedding requests
        for c in chunks:
            req = c.request
            if c.seq is None and req.params.prompt_logprobs is not None:
                scored.append((query_start[-1], c))
            if req.pooling is not None:
                pooled.append((query_start[-1], c))
            prompt_blocks = kv.prompt_segment(req.request_id).blocks
            if c.seq is None:
                ids.extend(req.prompt_ids[c.start:c.end])
                base, blocks = 0, prompt_blocks
                prompt_lens.append(c.end)
                resp_tables.append([])
                resp_lens.append(0)
            else:
                ids.extend(c.seq.output_ids[c.start:c.end])
                ids.extend(c.draft)
                base, blocks = req.prompt_len, kv.response_segment(c.seq.seq_id).blocks
                prompt_lens.append(req.prompt_len)
                resp_tables.append(blocks)
                resp_lens.append(c.end + len(c.draft))
            prompt_tables.append(prompt_blocks)
            adapters.append(req.lora_id)
            stop = c.end + len(c.draft)
            positions.extend(range(base + c.start, base + stop))
            slots.extend(blocks[i // bs] * bs + i % bs for i in range(c.start, stop))
            query_start.append(query_start[-1] + c.num_tokens)
            if c.sample and req.pooling is None:
                sample_rows.extend(range(query_start[-1] - 1 - len(c.draft), query_start[-1]))
        num_real = len(sample_rows)
        decode = [i for i, c in enumerate(chunks) if c.seq is not None and c.sample and c.num_tokens == 1
                  ] if padding_rows else []
        for k in range(padding_rows if decode else 0):
            i = decode[k % len(decode)]  # the real row this padding row copies (row group i)
            row = query_start[i + 1] - 1
            ids.append(ids[row])
            positions.append(positions[row])
            slots.append(self.scratch_slot)
            prompt_tables.append(prompt_tables[i])
            prompt_lens.append(prompt_lens[i])
            resp_tables.append(resp_tables[i])
            resp_lens.append(resp_lens[i])
            adapters.append(adapters[i])
            query_start.append(query_start[-1] + 1)
            sample_rows.append(query_start[-1] - 1)

        device = self.model.device
        has_response = any(resp_lens)
        meta = AttentionMetadata(
            query_start, torch.tensor(slots, dtype=torch.long, device=device), bs,
            _table(prompt_tables, device), prompt_lens,
            _table(resp_tables, device) if has_response else None, resp_lens if has_response else None)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=device),
                            torch.tensor(positions, dtype=torch.long, device=device), meta, self.cache,
                            self._lora_batch(adapters, query_start) if any(adapters) else None)
        for first, c in scored:
            # Position j predicts prompt token j + 1; the prompt's last position predicts the first
            # output token, which the sampler scores.
            stop = min(c.end, c.request.prompt_len - 1)
            if stop > c.start:
                self.prompt_hidden.append((c.request, c.start + 1, hidden[first:first + stop - c.start]))
        self.pooled_hidden = [(c.request, c.start, hidden[first:first + c.num_tokens]) for first, c in pooled]
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=device)]
        self.last_hidden = hidden[:num_real]
        logits = self.model.compute_logits(hidden)
        return logits[:num_real] if len(sample_rows) > num_real else logits

    def prelaunch_next(self, chunks: list[ScheduledChunk], kv: KVBlockManager, tokens: torch.Tensor) -> bool:
        """Launch the step after this graphed decode step of `chunks` ahead, on `tokens` (the tokens
        just sampled for them, still on the device), unless a row asks for logprobs (whose reading
        of this step's logits the launch would overtake). A row whose next token starts a block gets
        that block now, as the scheduler would at the next step; if none is free, nothing is
        launched. Rows that end with this step's token (their limit) ride along as padding whose
        output the next `run` gathers out: they take no block (a block taken for them could be a
        cached prefix's, which a synchronous step would have kept) and write their key into the
        scratch block. Not when the rows left fall into a smaller bucket, which would rerun; the
        engine decides whether their ends could admit someone instead. Returns whether a step was
        launched."""
        if self.graphs is None or not self._graphed(chunks):
            return False
        ending: list[bool] = []
        for c in chunks:
            req = c.request
            if req.params.logprobs is not None:
                return False
            ending.append(c.start + 2 >= req.token_limit)  # the token sampled now is its last
        # The next step's rows are these less those ending now: in another bucket it must rerun.
        n, left, bucket = len(chunks), len(chunks) - sum(ending), self.graphs.bucket
        if left < n and (left == 0 or bucket(left) != bucket(n)):
            return False
        rows = self._decode_rows(chunks, kv, next_step=True, ending=ending)
        if rows is None:
            return False
        self.graphs.prelaunch(rows, tokens)
        return True

    def _graphed(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether this step is decode only, small enough for the graphs and without adapters."""
        return self.graphs is not None and 0 < len(chunks) <= self.graphs.max_batch and all(
            c.seq is not None and c.sample and c.num_tokens == 1 and not c.request.lora_id for c in chunks)

    def _lora_batch(self, adapters: list[int], query_start: list[int]) -> LoRABatch:
        """The rows of each adapter in the step (`adapters[g]`: row group g's lora_int_id)."""
        assert self.loras is not None, "a request with an adapter reached an engine without enable_lora"
        rows: dict[int, list[int]] = {}
        for g, lora_id in enumerate(adapters):
            if lora_id:
                rows.setdefault(lora_id, []).extend(range(query_start[g], query_start[g + 1]))
        total, device = query_start[-1], self.model.device
        return LoRABatch([(self.loras.get(lora_id).weights,
                           None if len(r) == total else torch.tensor(r, dtype=torch.long, device=device))
                          for lora_id, r in rows.items()])

    def _decode_rows(self, chunks: list[ScheduledChunk], kv: KVBlockManager, next_step: bool = False,
                     ending: list[bool] | None = None) -> DecodeRows | None:
        """The graphed decode step of `chunks`, or (`next_step`) the one after it, whose input tokens
        are not known yet: its rows' next blocks are taken now (None if out of blocks), except
        for rows `ending` marks, which write their key into the scratch block and attend to the
        keys they have. The tables are the block manager's lists themselves (see `DecodeRows`)."""
        bs = self.block_size
        rows = DecodeRows([], [], [], [], [], [], [])
        positions, slots, prompt_tables, prompt_lens = rows.positions, rows.slots, rows.prompt_tables, rows.prompt_lens
        response_tables, response_lens = rows.response_tables, rows.response_lens
        for k, c in enumerate(chunks):
            req, seq = c.request, c.seq
            assert seq is not None
            i = c.start + next_step  # the response index of the step's input token
            discard = ending is not None and ending[k]
            if next_step and not discard and not kv.grow_response(seq.seq_id, i + 1):
                return None
            blocks = kv.response_segment(seq.seq_id).blocks
            prompt_len = len(req.prompt_ids)
            positions.append(prompt_len + i)
            slots.append(self.scratch_slot if discard else blocks[i // bs] * bs + i % bs)
            prompt_tables.append(kv.prompt_segment(req.request_id).blocks)
            prompt_lens.append(prompt_len)
            response_tables.append(blocks)
            response_lens.append(i if discard else i + 1)
        if not next_step:
            rows.token_ids.extend(c.seq.output_ids[c.start] for c in chunks)  # type: ignore[union-attr]
        return rows

    def _run_graphed(self, chunks: list[ScheduledChunk], kv: KVBlockManager) -> torch.Tensor:
        rows = self._decode_rows(chunks, kv)
        assert rows is not None
        hidden, logits = self.graphs.run(rows)  # type: ignore[union-attr]
        # (A view of the graph's output until a step launched ahead overwrites it; only prefill
        # rows, which never run here, are read from `last_hidden`.)
        self.last_hidden = hidden
        return logits


def _table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block ids `[rows, widest]`, padded with block 0 (never read: lengths bound every access)."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)

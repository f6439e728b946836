"""Batched generation for a fixed set of prompts: one prefill of all prompts, then decode steps.

This is the foundation's executor. Each prompt's keys and values go into its prompt segment and
each generated token's into the sequence's own response segment, both managed by
`KVBlockManager`; sequences leave the batch as they finish and nothing new joins. The cache is
sized up front for every prompt plus its token budget, so nothing is ever preempted here. The
continuous-batching engine drives the same model interface: tokens, positions, `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.engine.sampler import make_generator, sample
from lengthwise.kv import KVBlockManager
from lengthwise.kv.storage import KVCacheStorage
from lengthwise.model.llama import CausalLM
from lengthwise.ops import AttentionMetadata
from lengthwise.sampling_params import SamplingParams


@dataclass
class Generation:
    """One completed sequence: the generated ids (a stop token, if any, is the last) and why it ended."""

    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def check_prompt(prompt: list[int], model: CausalLM, index: int = 0) -> None:
    """Raise `ValueError` naming the problem if a tokenised prompt cannot run on `model`."""
    ctx = model.config.max_position_embeddings
    if not prompt:
        raise ValueError(f"prompt {index} is empty: at least one token is needed")
    if len(prompt) >= ctx:
        raise ValueError(f"prompt {index} is {len(prompt)} tokens, which does not fit the model's "
                         f"context of {ctx} tokens (max_position_embeddings) with room to generate")
    vocab = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


class _Batch:
    """KV blocks and cache for a fixed batch: sequence `b` is request `b` with one sample."""

    def __init__(self, model: CausalLM, prompts: list[list[int]], budgets: list[int], block_size: int) -> None:
        self.model, self.block_size = model, block_size
        self.ids = [str(b) for b in range(len(prompts))]
        self.manager = KVBlockManager(
            sum(-(-len(p) // block_size) + -(-n // block_size) for p, n in zip(prompts, budgets, strict=True)),
            block_size)
        for sid, p in zip(self.ids, prompts, strict=True):
            self.manager.add_sequence(sid, sid)
            self.manager.grow_prompt(sid, len(p))
        self.cache: KVCacheStorage = model.new_kv_cache(self.manager.pool.num_blocks, block_size)
        # Prompt segments never change after prefill: one table for all steps, indexed by the active rows.
        self.prompt_table = self._table([self.manager.prompt_segment(sid).blocks for sid in self.ids])

    def _table(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=self.model.device)

    def _slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [blocks[i // bs] * bs + i % bs for i in range(start, end)]

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run every prompt in one flat batch; return the float32 logits of each prompt's last token."""
        device = self.model.device
        lens = [len(p) for p in prompts]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        blocks = [self.manager.prompt_segment(sid).blocks for sid in self.ids]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lens])
        slots = torch.tensor([s for blk, n in zip(blocks, lens, strict=True) for s in self._slots(blk, 0, n)],
                             dtype=torch.long, device=device)
        meta = AttentionMetadata(starts, slots, self.block_size, self.prompt_table, lens)
        hidden = self.model(ids, positions, meta, self.cache)
        return self.model.compute_logits(hidden[torch.tensor(starts[1:], device=device) - 1])

    def decode(self, active: list[int], tokens: list[int], prompt_lens: list[int],
               response_lens: list[int]) -> torch.Tensor:
        """One step: sequence `active[i]` feeds `tokens[i]` as response token number `response_lens[i]`."""
        device = self.model.device
        new_lens = [n + 1 for n in response_lens]
        for b, n in zip(active, new_lens, strict=True):
            if not self.manager.grow_response(self.ids[b], n):
                raise RuntimeError("KV cache sized too small for the batch")  # sized up front: a bug if hit
        resp_blocks = [self.manager.response_segment(self.ids[b]).blocks for b in active]
        slots = [self._slots(blk, n - 1, n)[0] for blk, n in zip(resp_blocks, new_lens, strict=True)]
        positions = [p + n - 1 for p, n in zip(prompt_lens, new_lens, strict=True)]
        meta = AttentionMetadata(list(range(len(active) + 1)), torch.tensor(slots, device=device), self.block_size,
                                 self.prompt_table[torch.tensor(active, device=device)], prompt_lens,
                                 self._table(resp_blocks), new_lens)
        hidden = self.model(torch.tensor(tokens, device=device), torch.tensor(positions, device=device),
                            meta, self.cache)
        return self.model.compute_logits(hidden)


def generate(model: CausalLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             block_size: int = 16) -> list[Generation]:
    """Generate a completion for every tokenised prompt; returns one `Generation` per prompt, in order.

    A sequence stops at the model's end tokens (unless `ignore_eos`), at `stop_token_ids`, after
    `max_tokens`, or when it reaches the model's context length.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        check_prompt(p, model, i)
    if not prompts:
        return []
    ctx = model.config.max_position_embeddings
    budgets = [min(sp.max_tokens, ctx - len(p)) for p, sp in zip(prompts, params, strict=True)]
    batch = _Batch(model, prompts, budgets, block_size)
    generators = [None if sp.greedy else make_generator(sp.seed, model.device) for sp in params]
    stops = [set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(model.config.eos_token_ids))
             for sp in params]
    next_tokens = sample(batch.prefill(prompts), params, generators)

    outputs: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    active = list(range(len(prompts)))
    while True:
        still = []
        for b, tok in zip(active, next_tokens, strict=True):
            outputs[b].append(tok)
            if tok in stops[b]:
                finish[b] = "stop"
            elif len(outputs[b]) >= budgets[b]:
                finish[b] = "length"
            else:
                still.append(b)
        active = still
        if not active:
            break
        # The newest token of each sequence is not in the cache yet: it is this step's input.
        logits = batch.decode(active, [outputs[b][-1] for b in active], [len(prompts[b]) for b in active],
                              [len(outputs[b]) - 1 for b in active])
        next_tokens = sample(logits, [params[b] for b in active], [generators[b] for b in active])
    return [Generation(o, f or "length") for o, f in zip(outputs, finish, strict=True)]


def prompt_logits(model: CausalLM, prompts: list[list[int]], block_size: int = 16) -> torch.Tensor:
    """Float32 next-token logits `[B, vocab]` after each prompt, all prompts prefilled as one batch."""
    for i, p in enumerate(prompts):
        check_prompt(p, model, i)
    return _Batch(model, prompts, [0] * len(prompts), block_size).prefill(prompts)

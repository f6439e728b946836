"""Batched generation for a fixed set of prompts: one prefill of all prompts, then decode steps.

This is the foundation's executor: every sequence gets a contiguous run of KV blocks sized for
its prompt plus its token budget, sequences leave the batch as they finish, and nothing new joins.
The continuous-batching engine (block manager, scheduler policies, segments) builds on the same
model interface: tokens, positions and `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.engine.sampler import make_generator, sample
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
    device = model.device
    ctx = model.config.max_position_embeddings
    budgets = [min(sp.max_tokens, ctx - len(p)) for p, sp in zip(prompts, params, strict=True)]
    cache, tables, first_block = _allocate(
        model, [len(p) + n for p, n in zip(prompts, budgets, strict=True)], block_size)
    generators = [None if sp.greedy else make_generator(sp.seed, device) for sp in params]
    stops = [set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(model.config.eos_token_ids))
             for sp in params]

    lens = [len(p) for p in prompts]
    logits = _prefill(model, prompts, cache, tables, first_block)
    next_tokens = sample(logits, params, generators)

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
        # One decode step: each active sequence feeds its last token at the next position.
        pos = [lens[b] + len(outputs[b]) - 1 for b in active]
        ids = torch.tensor([outputs[b][-1] for b in active], dtype=torch.long, device=device)
        positions = torch.tensor(pos, dtype=torch.long, device=device)
        slots = torch.tensor([first_block[b] * block_size + q for b, q in zip(active, pos, strict=True)],
                             dtype=torch.long, device=device)
        meta = AttentionMetadata(list(range(len(active) + 1)), slots, block_size,
                                 tables[torch.tensor(active, device=device)], [q + 1 for q in pos])
        logits = model.compute_logits(model(ids, positions, meta, cache))
        next_tokens = sample(logits, [params[b] for b in active], [generators[b] for b in active])
    return [Generation(o, f or "length") for o, f in zip(outputs, finish, strict=True)]


def _prefill(model: CausalLM, prompts: list[list[int]], cache: KVCacheStorage, tables: torch.Tensor,
             first_block: list[int]) -> torch.Tensor:
    """Run every prompt in one flat batch; return the float32 logits of each prompt's last token."""
    device, block_size = model.device, cache.block_size
    lens = [len(p) for p in prompts]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    slots = torch.cat([first_block[b] * block_size + torch.arange(n, device=device) for b, n in enumerate(lens)])
    meta = AttentionMetadata(starts, slots, block_size, tables, list(lens))
    hidden = model(ids, positions, meta, cache)
    return model.compute_logits(hidden[torch.tensor(starts[1:], device=device) - 1])


def prompt_logits(model: CausalLM, prompts: list[list[int]], block_size: int = 16) -> torch.Tensor:
    """Float32 next-token logits `[B, vocab]` after each prompt, all prompts prefilled as one batch."""
    for i, p in enumerate(prompts):
        check_prompt(p, model, i)
    cache, tables, first_block = _allocate(model, [len(p) for p in prompts], block_size)
    return _prefill(model, prompts, cache, tables, first_block)


def _allocate(model: CausalLM, sizes: list[int],
              block_size: int) -> tuple[KVCacheStorage, torch.Tensor, list[int]]:
    """A cache with a contiguous run of blocks per sequence, holding `sizes[b]` tokens for sequence b.

    Returns the cache, the `[B, max_blocks]` block tables (rows padded with their last block) and
    each sequence's first block.
    """
    blocks = [-(-n // block_size) for n in sizes]
    first_block = [sum(blocks[:b]) for b in range(len(sizes))]
    rows = [[f + min(j, n - 1) for j in range(max(blocks))] for f, n in zip(first_block, blocks, strict=True)]
    tables = torch.tensor(rows, dtype=torch.long, device=model.device)
    return model.new_kv_cache(sum(blocks), block_size), tables, first_block

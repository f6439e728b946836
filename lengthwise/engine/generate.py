"""Token-level helpers on a loaded model, for tests and tools: `generate` and `prompt_logits`.

Both run on the one engine (`LLMEngine`: scheduler, segment KV cache, sampler); they only skip
the tokenizer and the `LLM` wrapper, taking token ids and a `CausalLM` that is already loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.config import EngineConfig
from lengthwise.engine.llm import run_to_completion
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model.llama import CausalLM
from lengthwise.sampling_params import SamplingParams


@dataclass
class Generation:
    """One completed sequence: the generated ids (a stop token, if any, is the last) and why it ended."""

    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def generate(model: CausalLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             block_size: int = 16) -> list[Generation]:
    """Generate a completion for every tokenised prompt, all in one continuous batch; returns one
    `Generation` per prompt, in order (the first sample's, if `n > 1`).

    A sequence stops at the model's end tokens (unless `ignore_eos`), at `stop_token_ids`, after
    `max_tokens`, or when it reaches the model's context length.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
    engine = LLMEngine(model, None, EngineConfig(block_size=block_size, max_num_seqs=max(1, len(prompts))))
    outs = run_to_completion(engine, prompts, params)
    return [Generation(o.outputs[0].token_ids, o.outputs[0].finish_reason or "length") for o in outs]


def prompt_logits(model: CausalLM, prompts: list[list[int]], block_size: int = 16) -> torch.Tensor:
    """Float32 next-token logits `[B, vocab]` after each prompt, all prompts prefilled in one forward pass."""
    total = sum(len(p) for p in prompts)
    engine = LLMEngine(model, None, EngineConfig(block_size=block_size, max_num_seqs=max(1, len(prompts)),
                                                  max_num_batched_tokens=max(1, total)))
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=1, temperature=0.0), request_id=str(i))
    plan = engine.scheduler.schedule()
    assert len(plan.chunks) == len(prompts) and all(c.sample for c in plan.chunks)
    return engine.runner.run(plan.chunks, engine.scheduler.kv)

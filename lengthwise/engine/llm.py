"""`LLM`: the offline API, shaped like vLLM's. Give it prompts, get back one `RequestOutput` each.

    llm = LLM("path/to/checkpoint", dtype="float32")
    outs = llm.generate(["Hello", "Tell me a story"], SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    print(outs[0].outputs[0].text)

All prompts are queued at once and served by continuous batching; the outputs come back in the
order of the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lengthwise.config import EngineConfig
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.engine.outputs import RequestOutput
from lengthwise.model.default import default_model_dir
from lengthwise.sampling_params import SamplingParams

PromptType = str | Seq[int] | dict[str, Any]


class LLM:
    """An engine for offline batch generation.

    `model_dir` is a local Hugging Face checkpoint directory (the built-in default model when
    `None`). The other arguments are `EngineConfig`'s: `dtype`, `device`, `kv_cache_memory`
    (bytes or a fraction of free memory), `max_num_seqs`, `max_num_batched_tokens`,
    `block_size`, `max_model_len`, the scheduling `policy`, the `length_predictor` (a saved
    predictor directory, `"self"` or `"oracle"`) and `record_lengths` (a JSONL file).
    """

    def __init__(self, model_dir: str | Path | None = None, **engine_args: Any) -> None:
        unknown = set(engine_args) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {sorted(unknown)}; "
                             f"expected some of {sorted(EngineConfig.__dataclass_fields__)}")
        self.engine = LLMEngine.from_dir(default_model_dir() if model_dir is None else model_dir,
                                      EngineConfig(**engine_args))

    @property
    def tokenizer(self):  # noqa: ANN201 (Tokenizer | None)
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt: text, a list of token ids, or a dict with `"prompt"` or
        `"prompt_token_ids"` (and, for benchmarks with the `oracle` predictor, `"true_length"`).

        `sampling_params` is one `SamplingParams` for all prompts or a list with one per prompt
        (default: the checkpoint's generation defaults). Returns outputs in prompt order.
        """
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        true_lengths = [p.get("true_length") if isinstance(p, dict) else None for p in prompts]
        return run_to_completion(self.engine, [_prompt_input(p, i) for i, p in enumerate(prompts)], params, use_tqdm,
                                 true_lengths)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}` messages) or a list of
        conversations, each rendered with the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer.json with a chat template in the model directory")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = [{"prompt_token_ids": self.tokenizer.encode_chat(c, add_generation_prompt)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

def run_to_completion(engine: LLMEngine, prompts: list[str | list[int]], params: list[SamplingParams],
                      use_tqdm: bool = False, true_lengths: list[float | None] | None = None) -> list[RequestOutput]:
    """Queue every prompt on `engine`, step until all are finished, return their outputs in order.
    If anything fails midway (a bad prompt, an interrupt), the requests already queued are aborted."""
    ids: list[str] = []
    try:
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            hint = None if true_lengths is None else true_lengths[i]
            ids.append(engine.add_request(prompt, sp, true_length=hint).request_id)
    except ValueError:
        for rid in ids:  # nothing half-submitted stays queued
            engine.abort_request(rid)
            engine.requests.pop(rid, None)
        raise
    pending = set(ids)
    results: dict[str, RequestOutput] = {}
    bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
    tokens = 0
    try:
        while pending:
            for request in engine.step():
                if request.finished and request.request_id in pending:
                    pending.discard(request.request_id)
                    results[request.request_id] = engine.pop_finished(request.request_id)
                    tokens += request.num_generated
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    except BaseException:
        for rid in pending:  # an interrupted generate leaves no request holding blocks
            engine.abort_request(rid)
            engine.requests.pop(rid, None)
        raise
    finally:
        bar.close()
    return [results[rid] for rid in ids]


def _as_prompt_list(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _prompt_input(prompt: PromptType, index: int) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError(f"prompt {index} is a dict without 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    raise ValueError(f"prompt {index} must be text, a list of token ids or a dict, got {type(prompt).__name__}")

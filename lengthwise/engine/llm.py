"""`LLM`: the offline API, shaped like vLLM's. Give it prompts, get back one `RequestOutput` each.

    llm = LLM("path/to/checkpoint", dtype="float32")
    outs = llm.generate(["Hello", "Tell me a story"], SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    print(outs[0].outputs[0].text)

All prompts are queued at once and served by continuous batching; the outputs come back in the
order of the prompts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lengthwise.beam_search import BeamSearchParams
from lengthwise.config import EngineConfig
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.engine.outputs import BeamSearchOutput, EmbeddingRequestOutput, RequestOutput
from lengthwise.lora.request import LoRARequest
from lengthwise.model.default import default_model_dir
from lengthwise.pooling import PoolingParams
from lengthwise.sampling_params import SamplingParams

PromptType = str | Seq[int] | dict[str, Any]


class LLM:
    """An engine for offline batch generation.

    `model_dir` is a local Hugging Face checkpoint directory (the built-in default model when
    `None`). The other arguments are `EngineConfig`'s: `dtype`, `device`, `quantization` (`"int8"` or
    `"int4"`: weight-only quantization on the CPU, int4 also on CUDA; GPTQ and AWQ checkpoints
    load as they are),
    `kv_cache_dtype` (`"bfloat16"`: half the KV bytes on the CPU; `"fp8"`, `"fp8_e5m2"`: a quarter, CPU and CUDA),
    `kv_cache_memory` (bytes or a fraction of free memory),
    `max_num_seqs`, `max_num_batched_tokens`, `block_size`, `max_model_len`, the scheduling
    `policy`, the `length_predictor` (a saved predictor directory, `"self"` or `"oracle"`) and
    `record_lengths` (a JSONL file), and LoRA serving: `enable_lora`, `max_loras`, `max_lora_rank`,
    `max_cpu_loras`.
    """

    def __init__(self, model_dir: str | Path | None = None, **engine_args: Any) -> None:
        if "model" in engine_args:  # vLLM's keyword: LLM(model="path")
            if model_dir is not None:
                raise ValueError("give the checkpoint once: as model_dir or as model, not both")
            model_dir = engine_args.pop("model")
        unknown = set(engine_args) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {sorted(unknown)}; "
                             f"expected some of {sorted(EngineConfig.__dataclass_fields__)}")
        self.engine = LLMEngine.from_dir(default_model_dir() if model_dir is None else model_dir,
                                      EngineConfig(**engine_args))

    @property
    def tokenizer(self):  # noqa: ANN201 (Tokenizer | None)
        return self.engine.tokenizer

    def get_tokenizer(self):  # noqa: ANN201 (Tokenizer | None)
        """The checkpoint's tokenizer (vLLM's accessor), None for a directory without one."""
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (vLLM's): the next prompts compute theirs."""
        return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., Any] = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                 priority: Seq[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt: text, a list of token ids, or a dict with `"prompt"` and/or
        `"prompt_token_ids"` (both: the ids are used, the text is the output's `prompt`) and,
        for benchmarks with the `oracle` predictor, `"true_length"`.

        `sampling_params` is one `SamplingParams` for all prompts or a list with one per prompt
        (default: the checkpoint's generation defaults). `use_tqdm`: a progress bar, or (as vLLM)
        a tqdm-like class to draw it with. `lora_request`: the LoRA adapter every prompt runs with, or
        a list with one per prompt (None entries: the base model); needs `enable_lora=True`.
        `priority`: one integer per prompt, lower served first (vLLM's; needs the `priority` or
        `continuous-sjf` policy unless all are 0). Returns outputs in prompt order.
        """
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(self.get_default_sampling_params() if sampling_params is None else sampling_params,
                             SamplingParams,
                             "sampling_params", len(prompts))
        if priority is not None:
            if not isinstance(priority, (list, tuple)):
                raise ValueError(f"priority must be a list with one integer per prompt, got {type(priority).__name__}")
            if len(priority) != len(prompts):
                raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
        inputs = [_prompt_input(p, i) for i, p in enumerate(prompts)]
        true_lengths = [p.get("true_length") if isinstance(p, dict) else None for p in prompts]
        outputs = run_to_completion(self.engine, [ids for ids, _ in inputs], params, use_tqdm, true_lengths,
                                    [p.get("messages") if isinstance(p, dict) else None for p in prompts],
                                    _per_prompt_loras(lora_request, len(prompts)),
                                    None if priority is None else list(priority))
        for out, (_, text) in zip(outputs, inputs, strict=True):
            if out.prompt is None:
                out.prompt = text
        return outputs

    def beam_search(self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams,
                    lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                    use_tqdm: bool | Callable[..., Any] = False) -> list[BeamSearchOutput]:
        """Beam-search every prompt (vLLM's `LLM.beam_search`; prompts as in `generate`): each
        keeps `params.beam_width` beams, all prompts' beams in one continuous batch, the beams of
        a prompt sharing its KV blocks. Returns per prompt its `beam_width` answers, best first;
        the same as transformers' `generate(num_beams=beam_width, num_return_sequences=beam_width,
        length_penalty=..., early_stopping=..., do_sample=False)` on the same checkpoint when no
        logits processor applies (beams are ranked by the raw log-probabilities: the checkpoint's
        generation config, e.g. its `repetition_penalty`, plays no part)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        prompts = _as_prompt_list(prompts)
        inputs = [_prompt_input(p, i) for i, p in enumerate(prompts)]
        outputs = run_to_completion(self.engine, [ids for ids, _ in inputs], [params] * len(prompts), use_tqdm,
                                    lora_requests=_per_prompt_loras(lora_request, len(prompts)))
        return [BeamSearchOutput.from_request_output(out) for out in outputs]

    def embed(self, prompts: PromptType | Seq[PromptType],
              pooling_params: PoolingParams | Seq[PoolingParams] | None = None, *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool | Callable[..., Any] = True,
              lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (vLLM's `LLM.embed`; prompts as in `generate`): the final
        hidden states of the prompt's tokens pooled as the checkpoint says (`EngineConfig.pooler_config`;
        by default its sentence-transformers files, else the last token, L2-normalized).
        `pooling_params`: one `PoolingParams` for all prompts or one per prompt (`dimensions`,
        `normalize`, `truncate_prompt_tokens`); `truncate_prompt_tokens` here sets it for all.
        The prompts run in the same continuous batches as any generation (chunked prefill, the
        length-aware policies), each ending when its prompt is computed. Returns them in order."""
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(PoolingParams() if pooling_params is None else pooling_params, PoolingParams,
                             "pooling_params", len(prompts))
        if truncate_prompt_tokens is not None:
            params = [dataclasses.replace(p, truncate_prompt_tokens=truncate_prompt_tokens) for p in params]
        for i, p in enumerate(prompts):
            extra = sorted(set(p) & {"true_length", "messages"}) if isinstance(p, dict) else []
            if extra:
                raise ValueError(f"prompt {i}: {extra} do not apply to embeddings (give prompt or prompt_token_ids)")
        inputs = [_prompt_input(p, i) for i, p in enumerate(prompts)]
        outputs = run_to_completion(self.engine, [ids for ids, _ in inputs], params, use_tqdm,
                                    lora_requests=_per_prompt_loras(lora_request, len(prompts)), desc="embedding")
        for out, (_, text) in zip(outputs, inputs, strict=True):
            if out.prompt is None:
                out.prompt = text
        return outputs

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}` messages) or a list of
        conversations, each rendered with the model's chat template (vLLM's arguments:
        `continue_final_message` goes on writing the last message, `chat_template_kwargs` are the
        template's variables, `tools` are shown to it; `lora_request` as in `generate`)."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer.json with a chat template in the model directory")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = []
        for c in conversations:
            messages = chat_messages(c)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt, continue_final_message,
                                                      **(chat_template_kwargs or {}),
                                                      **({"tools": tools} if tools else {}))
            # The template places BOS itself: encoded without special tokens, as encode_chat does.
            prompts.append({"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False),
                            "prompt": text, "messages": messages})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)


def run_to_completion(engine: LLMEngine, prompts: list[str | list[int]],
                      params: Seq[SamplingParams | BeamSearchParams | PoolingParams],
                      use_tqdm: bool | Callable[..., Any] = False, true_lengths: list[float | None] | None = None,
                      messages: list[list[dict[str, Any]] | None] | None = None,
                      lora_requests: list[LoRARequest | None] | None = None,
                      priorities: list[int] | None = None, desc: str = "generating") -> list[Any]:
    """Queue every prompt on `engine`, step until all are finished, return their outputs in order.
    If anything fails midway (a bad prompt, an interrupt), the requests already queued are aborted."""
    ids: list[str] = []
    try:
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            hint = None if true_lengths is None else true_lengths[i]
            ids.append(engine.add_request(prompt, sp, true_length=hint,
                                          messages=None if messages is None else messages[i],
                                          lora_request=None if lora_requests is None else lora_requests[i],
                                          priority=0 if priorities is None else priorities[i]).request_id)
    except BaseException:
        for rid in ids:  # nothing half-submitted stays queued
            engine.abort_request(rid)
            engine.requests.pop(rid, None)
        raise
    pending = set(ids)
    results: dict[str, Any] = {}
    progress = use_tqdm if callable(use_tqdm) else tqdm
    bar = progress(total=len(ids), desc=desc, unit="req", disable=not use_tqdm, dynamic_ncols=True)
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


def _per_prompt(value: Any, cls: type, name: str, num_prompts: int) -> list[Any]:
    """One `cls` for every prompt, or a list with one per prompt, as a list (errors name `name`)."""
    if isinstance(value, cls):
        return [value] * num_prompts
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a {cls.__name__} or a list of them, got {type(value).__name__}")
    if len(value) != num_prompts:
        raise ValueError(f"{name} has {len(value)} entries for {num_prompts} prompts")
    for i, v in enumerate(value):
        if not isinstance(v, cls):
            raise ValueError(f"{name}[{i}] must be a {cls.__name__}, got {type(v).__name__}")
    return list(value)


def _per_prompt_loras(lora_request: LoRARequest | Seq[LoRARequest | None] | None,
                      num_prompts: int) -> list[LoRARequest | None] | None:
    """`generate`'s `lora_request` as one entry per prompt (one request for all, or a list)."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return None if lora_request is None else [lora_request] * num_prompts
    if not isinstance(lora_request, (list, tuple)):
        raise ValueError(f"lora_request must be a LoRARequest or a list of them, got {type(lora_request).__name__}")
    if len(lora_request) != num_prompts:
        raise ValueError(f"lora_request has {len(lora_request)} entries for {num_prompts} prompts")
    return list(lora_request)


def _as_prompt_list(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):  # would read as token ids
        raise ValueError("prompts must be text, token ids or dicts, got bytes: decode them to a str first")
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


_PROMPT_KEYS = {"prompt", "prompt_token_ids", "true_length", "messages"}


def _prompt_input(prompt: PromptType, index: int) -> tuple[str | list[int], str | None]:
    """(what the engine takes, the prompt's text if known) for one prompt of `generate`."""
    if isinstance(prompt, str):
        return prompt, prompt
    if isinstance(prompt, dict):
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown:
            raise ValueError(f"prompt {index} has unknown key(s) {sorted(unknown)}; expected some of "
                             f"{sorted(_PROMPT_KEYS)}")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"prompt {index}: 'prompt' must be a string, got {type(text).__name__}")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"prompt {index}: 'prompt_token_ids' must be a list of token ids, "
                                 f"got {type(ids).__name__}")
            return list(ids), text
        if text is not None:
            return text, text
        raise ValueError(f"prompt {index} is a dict without 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (list, tuple)):
        return list(prompt), None
    raise ValueError(f"prompt {index} must be text, a list of token ids or a dict, got {type(prompt).__name__}")


def chat_messages(conversation: Any) -> list[dict[str, Any]]:
    """OpenAI-style messages for a chat template: text content parts joined into one string; a
    message without content is refused (`ValueError` naming it), except an assistant turn."""
    if not isinstance(conversation, list):
        raise ValueError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content: only text parts are supported, got {part!r}")
                texts.append(part["text"])
            m = dict(m, content="".join(texts))
        elif content is None and m["role"] != "assistant":
            raise ValueError(f"messages[{i}].content is missing")
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        if isinstance(m.get("tool_calls"), list):
            m = dict(m, tool_calls=[_arguments_as_dict(c) for c in m["tool_calls"]])
        out.append(m)
    return out


def _arguments_as_dict(call: Any) -> Any:
    """An assistant turn's tool call with its `function.arguments` JSON string parsed: OpenAI sends
    a string, chat templates (Qwen's, Llama's) render a dict (vLLM converts them so too)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return dict(call, function=dict(fn, arguments=args)) if isinstance(args, dict) else call

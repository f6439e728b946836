"""`LLMEngine`: the step loop. Add requests, call `step()` until nothing is unfinished.

One step = the scheduler plans which tokens run (continuing running requests, admitting waiting
ones in the policy's order, preempting when the KV cache is full), the model runner runs them in
one forward pass, and every chunk that ends a context samples a token for its sequences, which
are detokenized and checked for stop conditions. Finished sequences free their blocks at once.

With speculative decoding (`EngineConfig.speculative_config`), a decode row may also feed a
draft; the sampler then draws a token at each of its positions, each conditioned on the draft
before it (penalties and min_tokens see the drafted history), and the row keeps the draft up to
the first position whose token differs from it, plus that token. Drawing every position with
the request's own rule makes this exact: the kept tokens are distributed as plain decoding's.
A seeded sample's generator is then rewound to have drawn once per kept token, so its tokens are
the ones plain decoding draws too (greedy or seeded: the same tokens, up to floating-point
near-ties between differently batched kernels).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lengthwise.beam_search import BeamSearchParams
from lengthwise.config import EngineConfig
from lengthwise.engine.beam import BeamSearch, candidates
from lengthwise.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from lengthwise.engine.length import LengthPerception
from lengthwise.engine.model_runner import ModelRunner
from lengthwise.engine.outputs import EmbeddingRequestOutput, RequestOutput
from lengthwise.engine.pooler import PooledState
from lengthwise.engine.sampler import draw_uniform, make_generator, sample, token_logprobs
from lengthwise.kv.storage import KVCacheStorage
from lengthwise.lora.adapter import LoRAAdapter, LoRARegistry, adapter_bytes_bound
from lengthwise.lora.request import LoRARequest
from lengthwise.model import CausalLM, load_model
from lengthwise.model.config import read_json
from lengthwise.model.quantize import quantize_model
from lengthwise.ops.dispatch import use_triton
from lengthwise.pooling import PoolingParams, PoolingTask, read_model_pooling
from lengthwise.sampling_params import SamplingParams
from lengthwise.sched import Scheduler, make_policy
from lengthwise.sched.draft import NgramProposer
from lengthwise.sched.draft_length import DraftLengthPlanner
from lengthwise.sequence import Request, RequestStatus, Sequence
from lengthwise.structured.guide import StructuredOutputs
from lengthwise.tokenizer import Tokenizer

CPU_DEFAULT_KV_BYTES = 4 << 30
MAX_GRAPH_BATCH = 256  # decode batches up to this many rows replay a CUDA graph
PROMPT_LOGITS_ROWS = 256  # prompt logprobs: positions per LM-head call (256 x 128K vocab = 128 MiB)


@dataclass
class EngineStats:
    """Counters for reports. `row_steps`: batch rows summed over the steps that sampled, idle rows
    of a static batch included (`SchedulingPolicy.rows`): generated tokens / row_steps is the
    effective token ratio, row_steps / requests the first paper's padded steps per request."""

    sampling_steps: int = 0
    row_steps: int = 0
    padding_row_steps: int = 0  # idle rows computed as padding (static:pad=true), summed over steps
    draft_tokens: int = 0  # speculative decoding: tokens drafted and fed for verification
    accepted_tokens: int = 0  # of those, the ones kept (the model sampled the same token)

    @property
    def acceptance_rate(self) -> float | None:
        """Kept / drafted tokens; None before anything was drafted."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


class LLMEngine:
    """A model, its tokenizer, a KV cache and a scheduler, advanced one step at a time."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 model_dir: str | Path | None = None, lora_owner: LLMEngine | None = None) -> None:
        """`lora_owner`: an engine on the same model whose LoRA adapters this one runs too (the
        `self` length predictor's private engine asks through the served requests' adapters): its
        registry is shared, and adapters the live requests of either engine hold stay loaded."""
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.model_dir = None if model_dir is None else Path(model_dir)
        # None serves the model as it is (an engine built on another engine's quantized model, as
        # the self length predictor's is); a method quantizes an unquantized model.
        if config.quantization is not None and config.quantization != model.quantization:
            if model.quantization is not None:
                raise ValueError(f"quantization={config.quantization!r}, but the model given was already "
                                 f"quantized as {model.quantization!r}")
            quantize_model(model, config.quantization)
        mc = self.model.config
        if config.max_model_len is not None and config.max_model_len > mc.max_context:
            source = {"linear": "max_position_embeddings, times its linear rope factor",
                      "yarn": "yarn rope scaling's original_max_position_embeddings x factor"}
            raise ValueError(f"max_model_len={config.max_model_len} is beyond the model's context of "
                             f"{mc.max_context} tokens (config.json's "
                             f"{source.get(mc.rope.type, 'max_position_embeddings')})")
        self.max_model_len = config.max_model_len or mc.max_context
        self.kv_cache_dtype = _kv_cache_dtype(config.kv_cache_dtype, self.model)
        self.eos_token_ids = frozenset(mc.eos_token_ids or (
            () if self.tokenizer is None or self.tokenizer.eos_token_id is None else (self.tokenizer.eos_token_id,)))
        self.num_blocks = self._plan_num_blocks()
        policy = make_policy(config.policy, config.policy_options)
        spec = config.speculative_config
        if spec is not None and policy.options.get("pad"):
            raise ValueError("speculative_config cannot be used with a policy that computes padding rows "
                             "(static:pad=true emulates a vanilla executor one token per row at a time)")
        proposer = None if spec is None else NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min,
                                                            spec.prompt_lookup_max)
        self.scheduler = Scheduler(policy, self.num_blocks, config.block_size,
                                   config.max_num_seqs, config.max_num_batched_tokens,
                                   enable_prefix_caching=config.enable_prefix_caching, proposer=proposer,
                                   draft_max_batch=None if spec is None else spec.disable_by_batch_size,
                                   draft_step_tokens=self.model.fused_step_tokens(),
                                   draft_planner=DraftLengthPlanner() if spec is not None and spec.adaptive else None,
                                   max_loras=config.max_loras if config.enable_lora else None)
        if lora_owner is not None and (lora_owner.loras is None or lora_owner.model is not model
                                       or not config.enable_lora):
            raise ValueError("lora_owner must be an engine with enable_lora=True on the same model, and this "
                             "engine's config must set enable_lora=True too")
        self._lora_owner = lora_owner
        self.loras = (lora_owner.loras if lora_owner is not None else
                      LoRARegistry(mc, self.model.dtype, self.model.device, config.max_lora_rank,
                                   config.max_cpu_loras or config.max_loras) if config.enable_lora else None)
        self.runner = ModelRunner(self.model, self.num_blocks, config.block_size, self.max_model_len,
                                  graph_batch=self._graph_batch(), kv_cache_dtype=self.kv_cache_dtype,
                                  loras=self.loras)
        self.requests: dict[str, Request] = {}
        self._beams: dict[str, BeamSearch] = {}  # the search state of each beam search request
        self._ids = itertools.count()
        self.length = LengthPerception(self, config.length_predictor, config.record_lengths)
        self.stats = EngineStats()
        self.structured = None if tokenizer is None else StructuredOutputs(tokenizer, mc.vocab_size)
        self.pooling = read_model_pooling(self.model_dir, config.pooler_config)

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        """Load the checkpoint (and its tokenizer.json, if any) in `model_dir` and build an engine on it."""
        config = config or EngineConfig()
        model_dir = Path(model_dir)
        model = load_model(model_dir, config.dtype, config.device, config.quantization)
        tokenizer = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        return cls(model, tokenizer, config, model_dir)

    # -- set-up --------------------------------------------------------------------------------

    def _plan_num_blocks(self) -> int:
        c, mc = self.config, self.model.config
        per_block = KVCacheStorage.bytes_per_block(mc.num_layers, c.block_size, mc.num_kv_heads, mc.head_dim,
                                                   self.kv_cache_dtype)
        # A GPU's budget is a share of the memory free now: adapters loaded later must fit beside
        # the cache, so their most is set aside first (vLLM profiles it with the adapters loaded).
        lora_reserve = (c.max_cpu_loras or c.max_loras) * adapter_bytes_bound(mc, c.max_lora_rank, self.model.dtype) \
            if c.enable_lora else 0
        budget = _kv_budget_bytes(c.kv_cache_memory, self.model.device, lora_reserve)
        blocks_per_seq = -(-self.max_model_len // c.block_size)
        # More than every running sequence at full length would never be used.
        num_blocks = min(budget // per_block, c.max_num_seqs * blocks_per_seq + c.max_num_seqs)
        if num_blocks < blocks_per_seq:
            adapters = (f" after setting aside {lora_reserve} bytes for max_cpu_loras LoRA adapters of rank "
                        f"max_lora_rank={c.max_lora_rank} (lower either)" if lora_reserve and
                        not isinstance(c.kv_cache_memory, int) and self.model.device.type == "cuda" else "")
            raise ValueError(f"kv_cache_memory of {budget} bytes{adapters} holds {num_blocks} blocks of {per_block} "
                             f"bytes, fewer than the {blocks_per_seq} one {self.max_model_len}-token context needs; "
                             f"raise kv_cache_memory or lower max_model_len")
        return int(num_blocks)

    def _graph_batch(self) -> int:
        """Largest decode batch replayed as a CUDA graph; 0 for none (CPU, `enforce_eager`, the
        torch reference kernels, whose host-side metadata a graph would freeze, or a mixture-of-
        experts model: its expert loop sizes each expert's work on the host, and the grouped path
        has not been captured and checked on a GPU yet)."""
        probe = self.model.embed
        if self.config.enforce_eager or not probe.is_cuda or not use_triton(probe) or self.model.config.moe:
            return 0
        return min(self.config.max_num_seqs, MAX_GRAPH_BATCH)

    def default_sampling_params(self) -> SamplingParams:
        """vLLM's behaviour: the checkpoint's generation_config.json sets the sampling defaults."""
        return SamplingParams(**generation_defaults(self.model_dir)) if self.model_dir else SamplingParams()

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: str | Seq[int],
                    params: SamplingParams | BeamSearchParams | PoolingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    true_length: float | None = None, eos_after: int | None = None,
                    messages: list[dict[str, Any]] | None = None,
                    lora_request: LoRARequest | None = None, priority: int = 0) -> Request:
        """Tokenize (if text), validate and queue a request; returns its state.

        For benchmarks only: `true_length` is what the `oracle` predictor returns; `eos_after`
        ends each sample after exactly that many tokens, as if the model had emitted its end
        token there, so a workload's recorded lengths are reproduced without the scheduler or
        the policy seeing them (unlike `max_tokens`, which they read). `messages`: the conversation
        a chat template rendered into `prompt` (the `self` predictor asks inside it). `lora_request`:
        the LoRA adapter to generate with (needs `enable_lora`), loaded here on first use.
        `priority`: vLLM's; lower is served first, under a policy that orders by it (`priority`,
        `continuous-sjf`); any other policy refuses a nonzero one rather than ignore it.
        `params` may be `BeamSearchParams`: the request is a beam search, its `beam_width`
        sequences the beams (stepped together; the finished output holds the best answers).
        `params` may be `PoolingParams`: an embedding request, which ends when its prompt is
        computed (`pop_finished` gives an `EmbeddingRequestOutput`).
        """
        params = params or self.default_sampling_params()
        if not isinstance(params, PoolingParams) and not self.model.generates:
            raise ValueError(f"{self.model_dir or 'this model'} has no LM head (lm_head.weight): it can only "
                             f"embed (LLM.embed, /v1/embeddings), not generate")
        beam = pooling = pooling_params = None
        if isinstance(params, BeamSearchParams):
            beam, params = params, params.sampling_params()
            self._check_beam_search(beam, eos_after)
        elif isinstance(params, PoolingParams):
            pooling_params = params
            pooling, params = self._pooling_task(params, eos_after, true_length), _EMBED_PARAMS
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt is text but {self.model_dir} has no tokenizer.json; pass token ids")
            text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            prompt_ids = list(prompt)
        else:  # bytes would read as a list of ints: refuse every non-list rather than guess
            raise ValueError(f"prompt of request {request_id!r} must be text or a list of token ids, "
                             f"got {type(prompt).__name__}")
        if pooling is not None:
            prompt_ids = self._truncate_for_pooling(prompt_ids, pooling_params.truncate_prompt_tokens)
        self._check_prompt(prompt_ids, request_id, room_to_generate=pooling is None)
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids has ids outside the vocabulary [0, {vocab}): "
                             f"{[t for t in params.stop_token_ids if t >= vocab]}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab}): "
                             f"{[t for t in params.logit_bias if t >= vocab]}")
        # (a structured_outputs schema was checked when its params were made)
        if params.structured_outputs is not None and self.structured is None:
            raise ValueError(f"structured_outputs needs a tokenizer; {self.model_dir} has no tokenizer.json")
        if eos_after is not None and (isinstance(eos_after, bool) or not isinstance(eos_after, int) or eos_after < 1):
            raise ValueError(f"eos_after must be a positive number of tokens, got {eos_after!r}")
        if true_length is not None and (isinstance(true_length, bool) or not isinstance(true_length, (int, float))
                                        or not true_length >= 0):
            raise ValueError(f"true_length must be a number of tokens >= 0, got {true_length!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer (lower is served first), got {priority!r}")
        if priority and not self.scheduler.policy.supports_priority:
            raise ValueError(f"priority={priority} needs a scheduling policy that orders by priority "
                             f"('priority' or 'continuous-sjf'); this engine's is {self.config.policy!r}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} samples cannot run together under max_num_seqs="
                             f"{self.config.max_num_seqs}; raise max_num_seqs or lower n")
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        kv = self.scheduler.kv
        need = kv.blocks_for(len(prompt_ids)) + (0 if pooling else params.n * kv.blocks_for(max_tokens))
        if need > self.num_blocks and pooling is not None:
            raise ValueError(f"request {request_id!r} needs {need} KV blocks for its prompt of {len(prompt_ids)} "
                             f"tokens but the cache has {self.num_blocks}; raise kv_cache_memory or set "
                             f"truncate_prompt_tokens")
        if need > self.num_blocks:
            raise ValueError(f"request {request_id!r} needs {need} KV blocks (prompt of {len(prompt_ids)} tokens, "
                             f"n={params.n} x max_tokens={max_tokens}) but the cache has {self.num_blocks}; "
                             f"raise kv_cache_memory or lower max_tokens or n")
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
            if self.loras is None:
                raise ValueError("lora_request needs an engine with enable_lora=True")
            self.loras.load(lora_request, self._loras_in_use())
        request = Request(request_id, prompt_ids, params, time.monotonic() if arrival_time is None else arrival_time,
                          max_tokens, prompt=text, messages=messages, lora_request=lora_request,
                          priority=priority, beam=beam, pooling=pooling)
        if beam is not None:
            self._beams[request_id] = BeamSearch(beam, max_tokens, self.eos_token_ids)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(prompt_ids)
        for seq in request.seqs:
            self._init_sequence(seq)
        self.requests[request_id] = request
        if eos_after is not None:
            request.eos_after = eos_after
        if true_length is not None:
            self.length.true_lengths[request_id] = float(true_length)
        if self.length.predicts_before_scheduling and pooling is None:  # (an embedding generates nothing)
            self.length.pending.append(request)  # predicted in a batch at the next step, then scheduled
        else:
            self.scheduler.add(request)
        return request

    def _check_beam_search(self, beam: BeamSearchParams, eos_after: int | None) -> None:
        if eos_after is not None:
            raise ValueError("eos_after (a benchmark's recorded lengths) cannot be used with beam search")
        # transformers' candidate count: the first step takes them all from the prompt's one row.
        keep = max(2, 1 + (0 if beam.ignore_eos else len(self.eos_token_ids))) * beam.beam_width
        if keep > self.model.config.vocab_size:
            raise ValueError(f"beam_width={beam.beam_width} needs {keep} candidates per step, more than the "
                             f"vocabulary's {self.model.config.vocab_size} tokens")
        if beam.beam_width > self.config.max_num_batched_tokens:
            raise ValueError(f"beam_width={beam.beam_width} beams step together, beyond max_num_batched_tokens="
                             f"{self.config.max_num_batched_tokens}")

    @staticmethod
    def _check_stop_strings(seq: Sequence, new: str, armed: bool = True) -> bool:
        """Append `new` to the sample's text, cut at the first stop string it completes (if any and
        `armed`); whether one did (the stop string is then `seq.state["stop_reason"]`)."""
        text = seq.state["text"] + new
        matcher = seq.state.get("stop")
        hit = matcher.check(text, len(new)) if matcher is not None and new and armed else None
        if hit is not None:
            text = text[:hit]
            seq.state["stop_reason"] = matcher.matched
        seq.state["text"] = text
        return hit is not None

    def _pooling_task(self, params: PoolingParams, eos_after: int | None, true_length: float | None) -> PoolingTask:
        """What an embedding request pools, from the model's `PoolerConfig` and its `PoolingParams`."""
        if eos_after is not None or true_length is not None:
            raise ValueError("eos_after and true_length (benchmark lengths) do not apply to an embedding request")
        model = self.pooling
        if model.config is None:
            raise ValueError(f"embeddings are not available for this checkpoint: {model.problem}")
        if params.dimensions is not None:
            model.check_dimensions(params.dimensions, self.model.config.hidden_size)
        normalize = model.config.normalize if params.normalize is None else params.normalize
        return PoolingTask(model.config.pooling_type, normalize, params.dimensions)

    def _truncate_for_pooling(self, ids: list[int], keep: int | None) -> list[int]:
        """`truncate_prompt_tokens`: the prompt's last `keep` tokens (-1: the context's worth)."""
        if keep is None:
            return ids
        keep = self.max_model_len if keep == -1 else keep
        if keep > self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens={keep} is more than max_model_len={self.max_model_len}")
        return ids[-keep:]

    def _check_prompt(self, ids: list[int], request_id: str, room_to_generate: bool = True) -> None:
        if not ids:
            raise ValueError(f"prompt of request {request_id!r} is empty: at least one token is needed")
        if not room_to_generate and len(ids) > self.max_model_len:
            raise ValueError(f"prompt of request {request_id!r} is {len(ids)} tokens, more than the model's "
                             f"context of {self.max_model_len} tokens (max_model_len); truncate_prompt_tokens "
                             f"embeds only its last tokens")
        if room_to_generate and len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of request {request_id!r} is {len(ids)} tokens, which leaves no room to "
                             f"generate within the context of {self.max_model_len} tokens (max_model_len)")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt of request {request_id!r} has token ids outside the vocabulary "
                             f"[0, {vocab}): {bad[:5]}")

    def _init_sequence(self, seq: Sequence) -> None:
        if seq.request.pooling is not None:
            seq.state["pool"] = PooledState(seq.request.pooling)
            return
        p = seq.request.params
        # Sample i of a seeded request draws from seed + i: reproducible alone or in any batch.
        seq.state["generator"] = None if p.greedy else make_generator(
            None if p.seed is None else p.seed + seq.index, self.model.device)
        seq.state["text"] = ""
        if p.logprobs is not None:
            seq.state["logprobs"] = []
        if p.detokenize and self.tokenizer is not None:
            seq.state["detok"] = IncrementalDetokenizer(self.tokenizer, seq.request.prompt_ids,
                                                        skip_special_tokens=p.skip_special_tokens)
            if p.stop:
                seq.state["stop"] = StopStringMatcher(p.stop, p.include_stop_str_in_output)
        elif p.stop:
            raise ValueError("stop strings need detokenize=True and a tokenizer")
        if p.structured_outputs is not None and self.structured is not None:
            seq.state["guide"] = self.structured.guide(p.structured_outputs)

    def abort_request(self, request_id: str) -> bool:
        """Abort a waiting or running request; its KV blocks are freed at once. `False` if unknown or done."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._beams.pop(request_id, None)
        if self.length.discard(request_id):  # still waiting for its prediction: never scheduled
            for seq in request.active_seqs:
                seq.finish_reason = "abort"
            request.status = RequestStatus.FINISHED
        elif not self.scheduler.abort(request):
            return False
        request.finish_time = time.monotonic()
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache (vLLM's; e.g. between benchmark runs, so a repeat computes again)."""
        self.scheduler.kv.reset_prefix_cache()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.length.pending) or self.scheduler.has_unfinished()

    # -- LoRA adapters at run time (vLLM's LLMEngine methods) -------------------------------------

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Load `lora_request`'s adapter now (requests naming it load it too, on first use);
        `adapter`: read already (`LoRARegistry.read`). Raises ValueError naming what is wrong."""
        self._lora_registry().load(lora_request, self._loras_in_use(), adapter, keep=True)
        return True

    def pin_lora(self, lora_id: int) -> bool:
        """Keep adapter `lora_id` loaded beyond `max_cpu_loras` until `remove_lora`; False if it is
        not loaded."""
        return self._lora_registry().pin(lora_id)

    def remove_lora(self, lora_id: int) -> bool:
        """Drop adapter `lora_id`: at once, or, while requests use it, when they have ended.
        False if it was not loaded."""
        return self._lora_registry().remove(lora_id, self._loras_in_use())

    def list_loras(self) -> set[int]:
        """The ids of the adapters loaded (and not removed)."""
        return set(self._lora_registry().ids())

    def _lora_registry(self) -> LoRARegistry:
        if self.loras is None:
            raise ValueError("LoRA adapters need an engine with enable_lora=True")
        return self.loras

    def _collect_loras(self) -> None:
        """Drop removed adapters whose last requests (the owner's too, when shared) have ended."""
        if self.loras is not None and self.loras.retiring:
            self.loras.collect(self._loras_in_use())

    def _loras_in_use(self) -> set[int]:
        mine = {r.lora_id for r in self.requests.values() if not r.finished and r.lora_id}
        return mine if self._lora_owner is None else mine | self._lora_owner._loras_in_use()

    def pop_finished(self, request_id: str) -> RequestOutput | EmbeddingRequestOutput:
        """The final output of a finished request, forgetting the request (an
        `EmbeddingRequestOutput` for an embedding request)."""
        request = self.requests[request_id]
        self.forget(request_id)
        if request.pooling is not None:
            return EmbeddingRequestOutput.from_request(request)
        return RequestOutput.from_request(request, self.tokenizer)

    def forget(self, request_id: str) -> None:
        """Drop what the engine keeps of a finished request (its output, for `pop_finished`); an
        adapter removed while the request used it goes with it."""
        self.requests.pop(request_id, None)
        self._collect_loras()

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one scheduling step and forward pass. Returns the requests that gained tokens or finished."""
        for request in self.length.predict_pending():
            self.scheduler.add(request)
        self._collect_loras()
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        for request in plan.restarted:  # FCR recompute: the discarded output starts over, same seed
            request.first_token_time = None  # nobody saw the discarded tokens
            for seq in request.seqs:
                self._init_sequence(seq)
            if request.beam is not None:
                self._beams[request.request_id].reset()
        if not plan.chunks:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending")  # a bug, never expected
            return []
        logits = self.runner.run(plan.chunks, self.scheduler.kv, plan.padding_rows)
        for request, first, hidden in self.runner.prompt_hidden:
            self._score_prompt(request, first, hidden)
        touched: dict[str, Request] = {}
        for request, start, hidden in self.runner.pooled_hidden:
            self._pool(request, start, hidden, touched)
        rows: list[int] = []  # the logits row each sampled token is drawn from
        seqs: list[Sequence] = []
        history: list[list[int]] = []  # each row's tokens so far (drafted ones included), for penalties
        drafts: list[tuple[int, Sequence, list[int]]] = []  # (first row, seq, draft) of speculative rows
        prefilled: list[tuple[int, Request]] = []
        beams: dict[str, tuple[Request, list[int]]] = {}  # beam search requests' rows, chosen from below
        min_tokens = guided = False  # any row held to its min_tokens, any structured (found here: this loop
        row = 0  # runs every step)
        for chunk in plan.chunks:
            if not chunk.sample or chunk.request.pooling is not None:  # (an embedding has no logits row)
                continue
            if chunk.request.beam is not None:  # (no drafts: the scheduler gives beams none)
                beams.setdefault(chunk.request.request_id, (chunk.request, []))[1].append(row)
                if chunk.seq is None:
                    prefilled.append((row, chunk.request))
                row += 1
                continue
            min_tokens = min_tokens or chunk.request.params.min_tokens > 0
            guided = guided or chunk.request.params.structured_outputs is not None
            if chunk.draft:
                seq, d = chunk.seq, chunk.draft
                drafts.append((len(seqs), seq, d))
                rows.extend(range(row, row + len(d) + 1))
                seqs.extend([seq] * (len(d) + 1))
                if chunk.request.params.has_penalties:  # (the sampler reads the history for penalties only)
                    history.extend([seq.output_ids] + [seq.output_ids + d[:j] for j in range(1, len(d) + 1)])
                else:
                    history.extend([seq.output_ids] * (len(d) + 1))
                row += len(d) + 1
                continue
            targets = chunk.request.active_seqs if chunk.seq is None else [chunk.seq]
            rows.extend([row] * len(targets))
            seqs.extend(targets)
            history.extend(s.output_ids for s in targets)
            if chunk.seq is None:
                prefilled.append((row, chunk.request))
            row += 1
        if prefilled and self.length.wants_hidden:
            hidden = self.runner.last_hidden
            self.length.on_prefill_done([r for _, r in prefilled],
                                        hidden[torch.tensor([i for i, _ in prefilled], device=hidden.device)])
        if not seqs and not beams:
            return list(touched.values())
        self.stats.sampling_steps += 1
        self.stats.row_steps += plan.rows
        self.stats.padding_row_steps += plan.padding_rows
        if beams:
            self._beam_steps(list(beams.values()), logits, touched)
        if not seqs:
            return list(touched.values())
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        ahead = None
        # (Not with a proposer: a next step that drafts cannot replay the graph launched ahead; nor
        # with beams, whose next tokens and tables the search picks.)
        if (self.config.async_decode and self.runner.graphs is not None and not plan.padding_rows and not beams
                and self.scheduler.proposer is None and self._next_step_predictable(plan.chunks)):
            # Queue the next decode step before reading this one's tokens back (see DecodeGraphs).
            def ahead(tokens: torch.Tensor) -> bool:
                return self.runner.prelaunch_next(plan.chunks, self.scheduler.kv, tokens)
        # A drafted row draws once per position; its generator is rewound to draw once per kept token.
        rewind = {id(seq): seq.state["generator"].get_state() for _, seq, _ in drafts
                  if seq.state["generator"] is not None}
        out = sample(logits, [s.request.params for s in seqs], [s.state["generator"] for s in seqs],
                     [s.request.prompt_ids for s in seqs], history, before_read=ahead,
                     banned=self._banned_rows(seqs, drafts) if min_tokens else None,
                     allowed=[self._allowed(s) for s in seqs] if guided else None)
        now = time.monotonic()
        verified = iter(drafts)
        spec = next(verified, None)
        i = 0
        while i < len(seqs):
            seq = seqs[i]
            touched[seq.request.request_id] = seq.request
            if spec is None or spec[0] != i:
                self._append(seq, out.token_ids[i], out.logprobs[i], now)
                i += 1
                continue
            draft = spec[2]
            kept = self._verify(seq, draft, out.token_ids[i:i + len(draft) + 1], out.logprobs[i:i + len(draft) + 1],
                                now)
            generator = seq.state["generator"]
            if generator is not None:
                generator.set_state(rewind[id(seq)])
                for _ in range(kept + 1):  # one draw at a time, as plain decoding's steps draw
                    draw_uniform(generator)
            self.stats.draft_tokens += len(draft)
            self.stats.accepted_tokens += kept
            i += len(draft) + 1
            spec = next(verified, None)
        planner = self.scheduler.draft_planner
        if planner is not None and all(c.seq is not None and c.end - c.start == 1 for c in plan.chunks):
            # What a decode step's tokens cost, for the next steps' draft lengths.
            planner.observe_step(plan.num_tokens, time.perf_counter() - started)
        return list(touched.values())

    def _beam_steps(self, requests: list[tuple[Request, list[int]]], logits: torch.Tensor,
                    touched: dict[str, Request]) -> None:
        """Choose the beam search requests' next beams from their rows' logits (the prompt's one row
        at the first step, then one per beam), requests with as many rows ranked together, and
        make their sequences follow: a beam that grew in its parent's slot keeps its sequence and
        KV; one that moved takes its parent's tokens and KV (shared blocks, a copied partial one).
        A search that is done leaves the answers, best first, in its sequences, which end. A
        request is reported (`touched`) only when it ends: its beams are not answers before."""
        groups: dict[tuple[int, int], list[tuple[Request, list[int]]]] = {}
        for request, rows in requests:
            groups.setdefault((len(rows), self._beams[request.request_id].keep), []).append((request, rows))
        now = time.monotonic()
        kv, copies = self.scheduler.kv, []
        for (num_rows, _), members in groups.items():
            index = torch.tensor([i for _, rows in members for i in rows], device=logits.device)
            logprobs = torch.log_softmax(logits[index].float(), dim=-1).view(len(members), num_rows, -1)
            searches = [self._beams[request.request_id] for request, _ in members]
            for (request, _), search, cand in zip(members, searches, candidates(searches, logprobs), strict=True):
                if request.first_token_time is None:
                    request.first_token_time = now
                parents = search.advance(cand)
                if search.done:
                    self._finish_beams(request, search, now)
                    touched[request.request_id] = request
                    continue
                seqs = request.seqs
                if any(p != j for j, p in enumerate(parents)):
                    copies += kv.fork_responses([(seq.seq_id, seqs[p].seq_id) for seq, p in zip(seqs, parents,
                                                                                               strict=True)])
                for seq, tokens in zip(seqs, search.tokens, strict=True):
                    seq.output_ids = tokens  # (beams step together: every num_computed is the same)
        self.runner.cache.copy_blocks(copies)

    def _finish_beams(self, request: Request, search: BeamSearch, now: float) -> None:
        """End a finished search's sequences, each carrying one answer, best first."""
        answers = search.answers()
        p = request.params
        for seq, answer in zip(request.seqs, answers, strict=False):
            seq.output_ids = answer.tokens
            seq.state["logprobs"] = answer.token_logprobs()
            seq.state["beam_score"] = answer.score
            ended = answer.finish_reason == "stop" and not p.include_stop_str_in_output
            if self.tokenizer is not None:
                seq.state["text"] = self.tokenizer.decode(answer.tokens[:-1] if ended else answer.tokens)
        for seq in request.seqs:
            self.scheduler.finish_sequence(seq, answers[seq.index].finish_reason if seq.index < len(answers)
                                           else "length")
        request.finish_time = now
        self.length.on_finish(request)
        del self._beams[request.request_id]

    def _verify(self, seq: Sequence, draft: list[int], tokens: list[int], logprobs: list[Any], now: float) -> int:
        """Append the tokens sampled at a speculative row's positions (`tokens[j]` drawn after the
        draft's first j tokens) while they agree with the draft: the first one that differs, or the
        one after the whole draft, is the last. Returns how many draft tokens were kept."""
        kept = 0
        for j, token in enumerate(tokens):
            self._append(seq, token, logprobs[j], now)
            if seq.finished or j == len(draft) or token != draft[j]:
                break
            kept += 1
        if not seq.finished:
            self.scheduler.accept_draft(seq, len(draft), kept)
        return kept

    def _stop_tokens(self, seq: Sequence) -> frozenset[int]:
        """The tokens that would end `seq`: its stop_token_ids, and the model's end tokens unless ignore_eos."""
        p = seq.request.params
        return frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)

    def _banned_rows(self, seqs: list[Sequence], drafts: list[tuple[int, Sequence, list[int]]]
                     ) -> list[frozenset[int]]:
        """`_banned` per sampled row; a drafted row's position j counts the j draft tokens before it."""
        banned = [self._banned(s) for s in seqs]
        for first, seq, draft in drafts:
            banned[first:first + len(draft) + 1] = [self._banned(seq, j) for j in range(len(draft) + 1)]
        return banned

    def _banned(self, seq: Sequence, ahead: int = 0) -> frozenset[int]:
        """The stop tokens a sample short of its min_tokens may not draw (`ahead`: draft tokens
        before the position drawn); none once its grammar (structured outputs) says the answer is
        whole: it decides where the answer ends."""
        if len(seq.output_ids) + ahead >= seq.request.params.min_tokens:
            return frozenset()
        guide = seq.state.get("guide")
        return frozenset() if guide is not None and not guide.free and guide.complete else self._stop_tokens(seq)

    def _allowed(self, seq: Sequence) -> torch.Tensor | None:
        """The tokens a structured sample may draw next, as additive logit offsets on the model's
        device (cached per grammar state): its grammar's, and its stop tokens where the answer is
        complete. Where the grammar allows nothing (a vocabulary that cannot write what it
        needs), the model's end tokens, so the sample ends (`_append`) instead of failing."""
        guide = seq.state.get("guide")
        if guide is None or guide.free:
            return None
        ends = guide.complete or guide.exhausted
        return guide.additive(self.model.device, tuple(sorted(self._stop_tokens(seq) or self.eos_token_ids))
                              if ends else ())

    def _pool(self, request: Request, start: int, hidden: torch.Tensor, touched: dict[str, Request]) -> None:
        """Take an embedding request's prompt chunk; with its last, the request ends with its vector."""
        seq = request.seqs[0]
        state: PooledState = seq.state["pool"]
        state.add(start, hidden)
        if start + hidden.shape[0] < request.prompt_len:
            return
        seq.state["embedding"] = state.result(request.prompt_len)
        request.first_token_time = request.finish_time = time.monotonic()
        self.scheduler.finish_sequence(seq, "stop")
        touched[request.request_id] = request

    def _score_prompt(self, request: Request, first: int, hidden: torch.Tensor) -> None:
        """Prompt logprobs of tokens `first ..` of the request's prompt from the final hidden states
        of the positions before them, a slice of rows at a time (a long prompt's logits over a
        large vocabulary would not fit at once). A recomputed prompt (after a preemption or an FCR
        restart) scores the same tokens again and overwrites them."""
        k = request.params.prompt_logprobs
        for a in range(0, hidden.shape[0], PROMPT_LOGITS_ROWS):
            h = hidden[a:a + PROMPT_LOGITS_ROWS]
            targets = request.prompt_ids[first + a:first + a + h.shape[0]]
            scored = token_logprobs(self.model.compute_logits(h), torch.tensor(targets, device=h.device), k)
            request.prompt_logprobs[first + a:first + a + len(scored)] = scored

    def _next_step_predictable(self, chunks: list[Any]) -> bool:
        """Whether the next step will most likely decode these rows again, or those of them that go
        on (the runner checks the rest: logprobs, free blocks). A row that ends (its token limit, a
        stop) only leaves a gap the next step gathers out, unless its end could admit a waiting
        request: then the next step would prefill it and the launch would be wasted. Not either
        when a row reaches its FCR cap (collected, it may let its batch's waiting members in)."""
        quiet = not self.scheduler.policy.stop_may_admit() and not self.length.pending
        for c in chunks:
            req = c.request
            if not quiet:
                p = req.params
                if c.start + 2 >= req.token_limit or not (p.ignore_eos and not p.stop_token_ids and not p.stop):
                    return False
            cap = self.scheduler.policy.cap(req)
            if cap is not None and c.start + 2 >= cap:  # this step's token fills the cap
                return False
        return True

    def _append(self, seq: Sequence, token: int, logprobs: Any, now: float) -> None:
        request, p = seq.request, seq.request.params
        seq.output_ids.append(token)
        if request.first_token_time is None:
            request.first_token_time = now
        if logprobs is not None:
            seq.state["logprobs"].append(logprobs)
        reason = None
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        if stop_token:
            reason = "stop"
            if token in p.stop_token_ids:
                seq.state["stop_reason"] = token  # vLLM: the stop token's id; None for an end token
        elif len(seq.output_ids) == request.eos_after:
            reason = "stop"
        elif len(seq.output_ids) >= request.max_tokens:
            reason = "length"
        guide = seq.state.get("guide")
        if guide is not None and not stop_token:
            guide.advance(token)
            if reason is None and not guide.free and guide.exhausted:
                reason = "stop"  # nothing more may be written (even under ignore_eos or min_tokens)
        detok = seq.state.get("detok")
        if detok is not None:
            # As vLLM: the token that stopped the sample adds no text unless include_stop_str_in_output.
            new = detok.add(token) if not stop_token or p.include_stop_str_in_output else ""
            if reason is not None:
                new += detok.flush()  # text held back for an unfinished character
            # (a stop string the flushed text completes too; as vLLM, none in the text of the
            # first min_tokens tokens)
            if self._check_stop_strings(seq, new, len(seq.output_ids) > p.min_tokens):
                reason = "stop"
        if reason is not None:
            self.scheduler.finish_sequence(seq, reason)
            if request.finished:
                request.finish_time = now
                self.length.on_finish(request)


# What an embedding request runs under: one sequence, no sampling (its one "token" is the vector).
_EMBED_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

# `EngineConfig.kv_cache_dtype`'s float8 names (vLLM's: plain "fp8" is e4m3).
FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _kv_cache_dtype(name: str, model: CausalLM) -> torch.dtype:
    """`EngineConfig.kv_cache_dtype` for `model`: "auto" is the model's dtype; float8 under any
    model on any device (a byte per value: the CPU kernels read it under float32, the Triton
    kernels on CUDA, the torch reference elsewhere); bfloat16 under a float32 model on the CPU
    (half the bytes, which the CPU kernels read). Otherwise a cache wider than the model only
    costs memory, bfloat16 under float16 loses precision, and on CUDA the Triton kernels (and CUDA
    graphs) read the cache in the activations' dtype or float8."""
    dtype = model.dtype if name == "auto" else FP8_KV_DTYPES.get(name) or getattr(torch, name)
    if dtype == torch.float8_e4m3fn and model.device.type == "cuda":
        capability = torch.cuda.get_device_capability(model.device)
        if capability < (8, 9):  # Triton compiles e4m3 for Ada and Hopper (sm_89) and later only
            raise ValueError(f"kv_cache_dtype={name!r}: float8 e4m3 needs a GPU of compute capability 8.9 or "
                             f"newer, this one is {capability[0]}.{capability[1]}; use 'fp8_e5m2' or 'auto'")
    if dtype == model.dtype or name in FP8_KV_DTYPES:
        return dtype
    model_dtype = str(model.dtype).removeprefix("torch.")
    if model.device.type != "cpu":
        raise ValueError(f"kv_cache_dtype={name!r}: on {model.device.type} the KV cache is held in the model's "
                         f"dtype ({model_dtype}) or in fp8; use 'auto' or 'fp8'")
    if not (dtype == torch.bfloat16 and model.dtype == torch.float32):
        raise ValueError(f"kv_cache_dtype={name!r} under a {model_dtype} model: a cache in another dtype than "
                         f"the model's is bfloat16 under float32 only (or fp8); use 'auto'")
    return dtype


def _kv_budget_bytes(memory: int | float | None, device: torch.device, reserve: int = 0) -> int:
    """The KV cache's bytes: `memory` bytes as given, else a share (`memory`, default 0.9) of the
    GPU memory free now less `reserve` (what LoRA adapters may take later), else on the CPU a
    share of the memory available (default: at most CPU_DEFAULT_KV_BYTES, half of it)."""
    if isinstance(memory, int):
        return memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * (0.9 if memory is None else memory)) - reserve)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if memory is None:
        return min(CPU_DEFAULT_KV_BYTES, available // 2)
    return int(available * memory)


def generation_defaults(model_dir: Path) -> dict[str, float | int]:
    """Sampling defaults from generation_config.json, as transformers' generate() applies them:
    greedy unless `do_sample`; when sampling, temperature 1.0, top_p 1.0 and top_k 50 unless set.
    `repetition_penalty` applies either way, and `max_new_tokens` becomes `max_tokens` (as vLLM
    reads them: Qwen2.5's instruct checkpoints ship a repetition penalty of 1.05)."""
    path = Path(model_dir) / "generation_config.json"
    gen = read_json(path) if path.is_file() else {}
    out: dict[str, float | int] = {}
    if gen.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(gen["repetition_penalty"])
    if gen.get("max_new_tokens") is not None:
        out["max_tokens"] = int(gen["max_new_tokens"])
    if not gen.get("do_sample"):
        out["temperature"] = 0.0
        return out
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0}
    for key, default in defaults.items():
        value = gen.get(key)
        out[key] = type(default)(default if value is None else value)
    return out

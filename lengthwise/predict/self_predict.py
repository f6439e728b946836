"""`self`: Perception in Advance. The served model is asked for its own response length.

The first paper appends a query to the user's instruction and lets the model answer with a
number. We send the request's prompt followed by the paper's query in the user's turn (a chat
request's last user message; a plain prompt through the model's chat template when it has one),
and read the answer one of two ways:

- `"median"` (the default, spec `"self"`): the model's distribution over its answers. The most
  likely first tokens (up to `TOP_FIRST_TOKENS`, each at least `MIN_FIRST_TOKEN_PROB` likely) are
  each completed greedily and parsed; the prediction is the median of those numbers weighted by
  their first token's probability, each number spread evenly over the lengths that round to it
  (`rounding`, 10: the built-in model answers its length rounded to 10; the paper
  trained on L_max rounded up to 50). The median is the point estimate with the least expected
  absolute error, and a model torn between "20" and "30" is best read as about 25, which greedy
  decoding cannot say. On the built-in model (run 38) it errs 13.8%, 12.6% and 14.2% of the mean
  length on three held-out sets against greedy's 14.9%, 13.4% and 14.3% (run 33: 13.4%, 13.4%,
  15.3% against 16.3%, 14.2%, 16.8%; docs/benchmarks.md).
- `"greedy"` (spec `"self-greedy"`): the paper's reading, greedy decoding for at most 8 tokens
  and the number in the answer (`parse_length`: the one followed by "tokens", else the first).

A request with a LoRA adapter is asked through its adapter (the asking engine shares the served
engine's adapters), since the adapted model is the one that will answer; with a PiA length adapter
(`adapter=`) every request is asked through that one instead, which was trained on the base model.

An answer without a number falls back to another predictor (default: a constant) and is counted.
An untuned model's answers are only as good as its instruction following; the paper LoRA-tunes the
model to answer well, which `lengthwise predictor train --kind pia` does for a served checkpoint
(`lengthwise.predict.pia`: `adapter=` asks through that adapter). The built-in model is trained
to answer by `lengthwise train-tiny` itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lengthwise.predict.base import LengthPrediction, LengthPredictor, LengthQuery

if TYPE_CHECKING:
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.tokenizer import Tokenizer

QUERY = ("\nDon't output the response for the above instruction. Instead, you need to predict the number "
         "of tokens in your response. Output one number only.")
MAX_ANSWER_TOKENS = 8
LENGTH_ADAPTER = "length-perception"  # the asker's name for a PiA adapter (`adapter=`)
READS = ("median", "greedy")
TOP_FIRST_TOKENS = 10
MIN_FIRST_TOKEN_PROB = 0.01
_NUMBER = re.compile(r"\d+")
_TOKENS = re.compile(r"(\d+)\s*tokens?\b", re.IGNORECASE)


def length_query(tokenizer: Tokenizer | None, q: LengthQuery) -> str | list[int]:
    """The paper's question after the request's instruction, in the user's turn: for a chat
    request, appended to its last user message and rendered by the template (never a chat
    rendering wrapped in a second one); otherwise the prompt text, in one user turn when the model
    has a template. Token ids where a template rendered it, else text. PiA training
    (`lengthwise.predict.pia`) asks exactly this."""
    tok = tokenizer
    if q.messages and tok is not None and tok.chat_template:
        messages = [dict(m) for m in q.messages]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is not None:
            messages[last]["content"] = str(messages[last].get("content") or "") + QUERY
            return tok.encode_chat(messages, add_generation_prompt=True)
    text = q.prompt or (tok.decode(list(q.prompt_ids or []), skip_special_tokens=True) if tok else "")
    if tok is not None and tok.chat_template:
        return tok.encode_chat([{"role": "user", "content": text + QUERY}], add_generation_prompt=True)
    return text + QUERY


def parse_length(text: str) -> int | None:
    """The number of tokens in the model's answer: the number that says "tokens" if one does
    ("2 sentences, about 40 tokens" is 40, not 2), else the first integer; None without one."""
    text = text.replace(",", "")
    m = _TOKENS.search(text) or _NUMBER.search(text)
    return int(m.group(1) if m.re is _TOKENS else m.group()) if m else None


def binned_median(values: Sequence[float], weights: Sequence[float], width: float) -> float:
    """The median of a distribution over `values` (`weights`, any positive scale) where each value's
    mass is spread evenly over `[value - width/2, value + width/2]`; `width=0` is the plain
    weighted median. Exact where the intervals overlap too: the mixture's CDF is piecewise linear.
    Where the CDF stays at one half over a stretch (mass split evenly, a gap between), the middle
    of that stretch is returned."""
    pairs = sorted((float(v), float(w)) for v, w in zip(values, weights, strict=True) if w > 0)
    if not pairs:
        raise ValueError("binned_median needs at least one positive weight")
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    total = sum(w for _, w in pairs)
    half = width / 2

    def cdf(x: float) -> float:
        if width == 0:
            return sum(w for v, w in pairs if v <= x) / total
        return sum(w * min(max((x - v + half) / width, 0.0), 1.0) for v, w in pairs) / total

    points = sorted({v + d for v, _ in pairs for d in (-half, half)})
    at_half = [x for x in points if math.isclose(cdf(x), 0.5, abs_tol=1e-12)]
    if width == 0:  # a step CDF: at one half from one value up to the next
        if at_half:
            return (at_half[0] + next(x for x in points if x > at_half[0])) / 2
        return next(x for x in points if cdf(x) > 0.5)
    if at_half:  # a flat stretch at one half (or a single touching point)
        return (at_half[0] + at_half[-1]) / 2
    lo = points[0]
    for hi in points[1:]:
        f_lo, f_hi = cdf(lo), cdf(hi)
        if f_hi > 0.5:  # the CDF is linear between consecutive breakpoints
            return lo + (hi - lo) * (0.5 - f_lo) / (f_hi - f_lo)
        lo = hi
    return points[-1]


class SelfPredictor(LengthPredictor):
    """Asks `engine`'s model (through a private small engine sharing its weights) for lengths.
    `read` is `"median"` (the answer distribution's median, numbers spread over `rounding`) or
    `"greedy"` (the paper's greedy answer); see the module docstring."""

    kind = "self"

    def __init__(self, engine: LLMEngine, fallback: LengthPredictor | None = None, fallback_length: float = 128.0,
                 read: str = "median", rounding: float = 10.0, adapter: str | Path | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if read not in READS:
            raise ValueError(f"read must be one of {READS}, got {read!r}")
        if rounding < 0:
            raise ValueError(f"rounding must be >= 0, got {rounding}")
        self.read = read
        self.rounding = float(rounding)
        if engine.tokenizer is None:
            raise ValueError("the self predictor needs a tokenizer to ask the model in text")
        from lengthwise.config import EngineConfig
        from lengthwise.engine.llm_engine import LLMEngine
        from lengthwise.lora import LoRARequest
        from lengthwise.predict.simple import ConstantPredictor

        # A private engine on the same weights, so asking never disturbs the served requests' KV;
        # with LoRA, on the served engine's adapters: a request is asked through its own adapter.
        # With a length adapter (PiA), every question goes through that adapter instead, held by
        # the asker alone: it was trained on the base model, and the served requests never see it.
        c = engine.config
        self.length_lora = None if adapter is None else LoRARequest(LENGTH_ADAPTER, 1, str(adapter))
        shared = c.enable_lora and self.length_lora is None
        self.asker = LLMEngine(engine.model, engine.tokenizer,
                               EngineConfig(dtype=c.dtype, device=c.device, block_size=c.block_size,
                                            max_num_seqs=64, max_num_batched_tokens=c.max_num_batched_tokens,
                                            kv_cache_memory=_asker_kv_bytes(engine), max_model_len=c.max_model_len,
                                            kv_cache_dtype=c.kv_cache_dtype,
                                            enable_prefix_caching=True,
                                            enable_lora=shared or self.length_lora is not None,
                                            # every adapter it asks through is loaded already:
                                            # one batch may hold them all
                                            max_loras=max(c.max_loras, c.max_cpu_loras or 1) if shared else 1,
                                            max_lora_rank=c.max_lora_rank if shared else _adapter_rank(adapter)),
                               lora_owner=engine if shared else None)
        if self.length_lora is not None:
            self.asker.add_lora(self.length_lora)  # (reads it now: a bad adapter fails at start-up)
        self.fallback = fallback or ConstantPredictor(fallback_length)
        self.max_length = float(engine.max_model_len)
        self.num_queries = 0
        self.num_fallbacks = 0
        self.last_answers: list[str] = []

    def query_prompt(self, q: LengthQuery) -> str | list[int]:
        """The question this predictor asks for `q` (`length_query`)."""
        return length_query(self.asker.tokenizer, q)

    def predict(self, queries: Sequence[LengthQuery]) -> list[LengthPrediction]:
        from lengthwise.engine.llm import run_to_completion
        from lengthwise.sampling_params import SamplingParams

        if not queries:
            return []
        limit = self.asker.max_model_len - MAX_ANSWER_TOKENS
        prompts = [self._fit(self.query_prompt(q), limit) for q in queries]
        top = TOP_FIRST_TOKENS if self.read == "median" else None
        params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0, logprobs=top)
        loras = [self.length_lora or q.lora_request for q in queries]
        outs = run_to_completion(self.asker, prompts, [params] * len(prompts), lora_requests=loras)
        answers = [o.outputs[0].text for o in outs]
        self.last_answers = answers
        self.num_queries += len(queries)
        if self.read == "median":
            lengths = self._median_reads(prompts, [o.outputs[0] for o in outs], loras)
        else:
            lengths = [None if (n := parse_length(a)) is None else float(n) for a in answers]
        out: list[LengthPrediction | None] = []
        fallback_idx = []
        for i, n in enumerate(lengths):
            if n is None:
                fallback_idx.append(i)
                out.append(None)
            else:
                out.append(LengthPrediction(float(min(max(n, 1.0), self.max_length)), source=self.kind))
        if fallback_idx:
            self.num_fallbacks += len(fallback_idx)
            for i, p in zip(fallback_idx, self.fallback.predict([queries[i] for i in fallback_idx]), strict=True):
                out[i] = p
        return out  # type: ignore[return-value]

    def _median_reads(self, prompts: list[list[int]], greedy: list[Any],
                      loras: list[Any]) -> list[float | None]:
        """Per query, the binned median of the numbers its likely first tokens lead to (None when
        none of them leads to a number). The greedy answer already completes its own first token;
        every other likely first token is completed greedily in one more batch, which shares the
        query's cached prompt blocks."""
        from lengthwise.engine.llm import run_to_completion
        from lengthwise.sampling_params import SamplingParams

        tok = self.asker.tokenizer
        candidates: list[list[tuple[float | None, float]]] = []  # per query: (number, first-token prob)
        forced: list[tuple[int, int, float]] = []                # (query, first token, its prob)
        for i, g in enumerate(greedy):
            first = g.logprobs[0]
            n = parse_length(g.text)
            candidates.append([(None if n is None else float(n), math.exp(first.logprob))])
            for token, lp in first.top:
                if token != first.token_id and math.exp(lp) >= MIN_FIRST_TOKEN_PROB:
                    forced.append((i, token, math.exp(lp)))
        if forced:
            params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS - 1, temperature=0.0)
            outs = run_to_completion(self.asker, [prompts[i] + [t] for i, t, _ in forced], [params] * len(forced),
                                     lora_requests=[loras[i] for i, _, _ in forced])
            for (i, t, p), o in zip(forced, outs, strict=True):
                n = parse_length(tok.decode([t, *o.outputs[0].token_ids], skip_special_tokens=True))
                candidates[i].append((None if n is None else float(n), p))
        reads: list[float | None] = []
        for mine in candidates:
            numbers = [(n, p) for n, p in mine if n is not None]
            reads.append(binned_median([n for n, _ in numbers], [p for _, p in numbers], self.rounding)
                         if numbers else None)
        return reads

    def _fit(self, prompt: str | list[int], limit: int) -> list[int]:
        ids = self.asker.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return ids[-limit:]  # keep the query at the end; a prompt this long is clipped from the front

    @property
    def fallback_rate(self) -> float:
        return self.num_fallbacks / self.num_queries if self.num_queries else 0.0

    def save_state(self, directory: Any) -> None:
        raise ValueError("the self predictor has no trained state: select it by name (length_predictor='self')")


def _adapter_rank(adapter: str | Path | None) -> int:
    """The rank the asker must allow for a length adapter (its config's `r`; patterns may raise it)."""
    if adapter is None:
        return 16
    from lengthwise.lora.adapter import read_adapter_config

    cfg = read_adapter_config(Path(adapter))
    return int(max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()]))


ASKER_KV_BYTES = 256 << 20


def _asker_kv_bytes(engine: LLMEngine) -> int:
    """The asking engine's cache: questions are short, so 256 MiB (at least one full context) is plenty;
    more questions than fit simply queue."""
    mc = engine.model.config
    from lengthwise.kv.storage import KVCacheStorage

    per_block = KVCacheStorage.bytes_per_block(mc.num_layers, engine.config.block_size, mc.num_kv_heads,
                                               mc.head_dim, engine.kv_cache_dtype)
    one_context = -(-engine.max_model_len // engine.config.block_size) + 1
    return int(per_block * max(one_context, min(64 * one_context, ASKER_KV_BYTES // per_block)))

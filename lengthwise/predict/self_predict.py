"""`self`: Perception in Advance. The served model is asked for its own response length.

The first paper appends a query to the user's instruction and lets the model answer with a
number. We send the request's prompt followed by the paper's query, through the model's chat
template when it has one, decode greedily for at most 8 tokens, and parse the first integer.
An answer without one falls back to another predictor (default: a constant) and is counted.
The paper LoRA-tunes the model to answer well; that step is out of scope, so an untuned model's
answers are only as good as its instruction following.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lengthwise.predict.base import LengthPrediction, LengthPredictor, LengthQuery

if TYPE_CHECKING:
    from lengthwise.engine.llm_engine import LLMEngine

QUERY = ("\nDon't output the response for the above instruction. Instead, you need to predict the number "
         "of tokens in your response. Output one number only.")
MAX_ANSWER_TOKENS = 8
_NUMBER = re.compile(r"\d+")


def parse_length(text: str) -> int | None:
    """The first integer in the model's answer, or None."""
    m = _NUMBER.search(text.replace(",", ""))
    return int(m.group()) if m else None


class SelfPredictor(LengthPredictor):
    """Asks `engine`'s model (through a private small engine sharing its weights) for lengths."""

    kind = "self"

    def __init__(self, engine: LLMEngine, fallback: LengthPredictor | None = None, fallback_length: float = 128.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine.tokenizer is None:
            raise ValueError("the self predictor needs a tokenizer to ask the model in text")
        from lengthwise.config import EngineConfig
        from lengthwise.engine.llm_engine import LLMEngine
        from lengthwise.predict.simple import ConstantPredictor

        # A private engine on the same weights, so asking never disturbs the served requests' KV.
        c = engine.config
        self.asker = LLMEngine(engine.model, engine.tokenizer,
                               EngineConfig(dtype=c.dtype, device=c.device, block_size=c.block_size,
                                            max_num_seqs=64, max_num_batched_tokens=c.max_num_batched_tokens,
                                            kv_cache_memory=_asker_kv_bytes(engine), max_model_len=c.max_model_len,
                                            enable_prefix_caching=True))
        self.fallback = fallback or ConstantPredictor(fallback_length)
        self.max_length = float(engine.max_model_len)
        self.num_queries = 0
        self.num_fallbacks = 0
        self.last_answers: list[str] = []

    def query_prompt(self, q: LengthQuery) -> str | list[int]:
        tok = self.asker.tokenizer
        text = q.prompt or (tok.decode(list(q.prompt_ids or []), skip_special_tokens=True) if tok else "")
        if tok is not None and tok.chat_template:
            return tok.encode_chat([{"role": "user", "content": text + QUERY}], add_generation_prompt=True)
        return text + QUERY

    def predict(self, queries: Sequence[LengthQuery]) -> list[LengthPrediction]:
        from lengthwise.engine.llm import run_to_completion
        from lengthwise.sampling_params import SamplingParams

        if not queries:
            return []
        limit = self.asker.max_model_len - MAX_ANSWER_TOKENS
        prompts = [self._fit(self.query_prompt(q), limit) for q in queries]
        params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0)
        outs = run_to_completion(self.asker, prompts, [params] * len(prompts))
        answers = [o.outputs[0].text for o in outs]
        self.last_answers = answers
        self.num_queries += len(queries)
        out: list[LengthPrediction | None] = []
        fallback_idx = []
        for i, a in enumerate(answers):
            n = parse_length(a)
            if n is None:
                fallback_idx.append(i)
                out.append(None)
            else:
                out.append(LengthPrediction(float(min(max(n, 1), self.max_length)), source=self.kind))
        if fallback_idx:
            self.num_fallbacks += len(fallback_idx)
            for i, p in zip(fallback_idx, self.fallback.predict([queries[i] for i in fallback_idx]), strict=True):
                out[i] = p
        return out  # type: ignore[return-value]

    def _fit(self, prompt: str | list[int], limit: int) -> list[int]:
        ids = self.asker.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return ids[-limit:]  # keep the query at the end; a prompt this long is clipped from the front

    @property
    def fallback_rate(self) -> float:
        return self.num_fallbacks / self.num_queries if self.num_queries else 0.0

    def save_state(self, directory: Any) -> None:
        raise ValueError("the self predictor has no trained state: select it by name (length_predictor='self')")


ASKER_KV_BYTES = 256 << 20


def _asker_kv_bytes(engine: LLMEngine) -> int:
    """The asking engine's cache: questions are short, so 256 MiB (at least one full context) is plenty;
    more questions than fit simply queue."""
    mc = engine.model.config
    from lengthwise.kv.storage import KVCacheStorage

    per_block = KVCacheStorage.bytes_per_block(mc.num_layers, engine.config.block_size, mc.num_kv_heads,
                                               mc.head_dim, engine.model.dtype)
    one_context = -(-engine.max_model_len // engine.config.block_size) + 1
    return int(per_block * max(one_context, min(64 * one_context, ASKER_KV_BYTES // per_block)))

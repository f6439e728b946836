"""Token masks from byte grammars: which tokens keep a response inside its grammar.

`TokenVocabulary` knows the bytes each token adds to a response (byte tokens from the
vocabulary; other tokens decoded after an anchor token, so a SentencePiece `▁` reads as the
space it is mid-text). A mask for a grammar state is found by walking the tokens in sorted byte
order: tokens sharing a prefix share the automaton's work on it, and once a prefix is refused
every token under it is skipped. Inside an unbounded JSON string (most of a long answer) the
many tokens that are plain text are allowed as a block and only the rest are walked.

`StructuredOutputs` is the engine's: it compiles each constraint once, caches masks per grammar
state (a response keeps returning to the same few states), and hands each sample a `TokenGuide`
that follows its tokens.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from lengthwise.structured.grammar import (
    Grammar,
    State,
    choice_grammar,
    json_object_grammar,
    json_schema_grammar,
    regex_grammar,
)
from lengthwise.structured.params import StructuredOutputsParams

MASK_CACHE_BYTES = 256 << 20  # masks kept, over all grammars (a byte per vocabulary entry each)
GRAMMAR_CACHE = 64  # compiled grammars kept


class TokenVocabulary:
    """The bytes of every token of a tokenizer, sorted for prefix walks. Special tokens and tokens
    whose bytes cannot be known (a partial character that decodes as U+FFFD) add no bytes: the
    grammar never allows them."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        anchor = tokenizer.encode("a", add_special_tokens=False)
        base = tokenizer.decode(anchor, skip_special_tokens=False)
        n = min(tokenizer.vocab_size, vocab_size)
        texts = tokenizer.decode_batch([anchor + [t] for t in range(n)], skip_special_tokens=False)
        self.bytes: list[bytes | None] = [None] * vocab_size
        for t in range(n):
            raw = tokenizer.token_bytes(t)
            if raw is None and t not in tokenizer.special_ids and texts[t].startswith(base):
                text = texts[t][len(base):]
                raw = text.encode() if "\ufffd" not in text else None
            self.bytes[t] = raw or None
        order = sorted((b, t) for t, b in enumerate(self.bytes) if b)
        self.all = _SortedTokens(order)
        # Plain string text: whole characters, no quote, backslash or control byte; how many.
        self.plain_chars = torch.full((vocab_size,), 1 << 30, dtype=torch.int32)
        for b, t in order:
            if _plain(b):
                self.plain_chars[t] = len(b.decode())
        self.not_plain = _SortedTokens([(b, t) for b, t in order if not _plain(b)])

    def mask(self, grammar: Grammar, state: State) -> torch.Tensor:
        """A bool mask `[vocab_size]` of the tokens whose bytes `grammar` allows from `state`."""
        room = grammar.plain_string_room(state)
        if room is False:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            walk = self.all
        else:  # inside a string: plain text that fits is allowed as a block; the rest is walked
            mask = self.plain_chars <= (1 << 29 if room is None else room)
            walk = self.not_plain
        allowed = walk.allowed(grammar, state)
        if allowed:
            mask[allowed] = True
        return mask


class _SortedTokens:
    """Tokens sorted by their bytes, walked with shared prefixes computed once."""

    def __init__(self, order: list[tuple[bytes, int]]) -> None:
        self.keys = [b for b, _ in order]
        self.ids = [t for _, t in order]

    def allowed(self, grammar: Grammar, state: State) -> list[int]:
        keys, out = self.keys, []
        states: list[State | None] = [state]  # states[d]: after the first d bytes of the current key
        prev = b""
        i = 0
        while i < len(keys):
            key = keys[i]
            common = 0
            limit = min(len(prev), len(key), len(states) - 1)
            while common < limit and prev[common] == key[common]:
                common += 1
            del states[common + 1:]
            st = states[common]
            dead = -1
            for d in range(common, len(key)):
                st = grammar.advance(st, key[d])
                if st is None:
                    dead = d
                    break
                states.append(st)
            if dead == -1:
                out.append(self.ids[i])
                prev = key
                i += 1
                continue
            # Every key starting with key[:dead + 1] is refused too: skip past them.
            prefix = key[:dead + 1]
            prev = key[:dead]
            i = bisect.bisect_left(keys, _after(prefix), i + 1) if prefix[-1] < 255 else _skip(keys, prefix, i + 1)
        return out


def _after(prefix: bytes) -> bytes:
    """The least byte string greater than every string starting with `prefix` (its last byte < 255)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _skip(keys: list[bytes], prefix: bytes, i: int) -> int:
    while i < len(keys) and keys[i].startswith(prefix):
        i += 1
    return i


def _plain(raw: bytes) -> bool:
    if b'"' in raw or b"\\" in raw or any(c < 0x20 for c in raw):
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Compiled:
    """One constraint's grammar, under the key its masks are cached by."""

    def __init__(self, key: str, grammar: Grammar) -> None:
        self.key, self.grammar = key, grammar


class TokenGuide:
    """One sample's place in its grammar: the mask for its next token, then `advance(token)`."""

    def __init__(self, outputs: StructuredOutputs, compiled: _Compiled, start_after: str | None = None) -> None:
        self._outputs, self._compiled = outputs, compiled
        self.state: State | None = compiled.grammar.initial()
        self._until = start_after.encode() if start_after else None  # free text until these bytes
        self._seen = b""  # the free text's tail, where they may be starting

    @property
    def free(self) -> bool:
        """Whether the response is still in its free text (before `start_after`): no mask."""
        return self._until is not None

    @property
    def complete(self) -> bool:
        """Whether the response may end here (its end tokens are allowed); also once it has left
        the grammar (which the masks prevent), so that it can end rather than run on."""
        return self.state is None or self._compiled.grammar.accepts(self.state)

    def mask(self) -> torch.Tensor:
        """The tokens allowed next, end tokens not included (see `complete`)."""
        if self.state is None:
            return torch.zeros(self._outputs.vocab.vocab_size, dtype=torch.bool)
        return self._outputs.mask(self._compiled, self.state)[0]

    @property
    def exhausted(self) -> bool:
        """Whether no token may follow (the answer is whole, or the vocabulary cannot go on)."""
        return self.state is None or not self._outputs.mask(self._compiled, self.state)[1]

    def advance(self, token: int) -> None:
        raw = self._outputs.vocab.bytes[token] if token < len(self._outputs.vocab.bytes) else None
        if self._until is not None:
            self._seen += raw or b""
            at = self._seen.find(self._until)
            if at == -1:
                self._seen = self._seen[max(0, len(self._seen) - len(self._until) + 1):]
                return
            raw, self._until = self._seen[at + len(self._until):], None  # the grammar starts here
        self.state = None if raw is None else self._compiled.grammar.advance_bytes(self.state, raw)


@dataclass
class MaskStats:
    """What the masks cost so far: masks walked (a state seen first, or evicted), masks served
    from the cache, and the seconds spent walking (`lengthwise bench structured` reads these)."""

    built: int = 0
    hits: int = 0
    build_seconds: float = 0.0


class StructuredOutputs:
    """An engine's structured outputs: its tokenizer's vocabulary (built on first use) and the
    compiled constraints."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._vocab: TokenVocabulary | None = None
        self.stats = MaskStats()
        self._compiled: OrderedDict[str, _Compiled] = OrderedDict()
        # (mask, whether it allows any token): the engine asks both every step
        self._masks: OrderedDict[tuple[str, State], tuple[torch.Tensor, bool]] = OrderedDict()

    @property
    def vocab(self) -> TokenVocabulary:
        if self._vocab is None:
            self._vocab = TokenVocabulary(self._tokenizer, self._vocab_size)
        return self._vocab

    def compile(self, spec: StructuredOutputsParams) -> _Compiled:
        """The constraint's grammar (compiled once); a schema it cannot enforce is a `ValueError`."""
        key = spec.key
        compiled = self._compiled.get(key)
        if compiled is None:
            if spec.json_object:
                grammar = json_object_grammar()
            elif spec.choice is not None:
                grammar = choice_grammar(list(spec.choice))
            elif spec.regex is not None:
                grammar = regex_grammar(spec.regex)
            else:
                assert isinstance(spec.json, dict)
                grammar = json_schema_grammar(spec.json)
            compiled = self._compiled[key] = _Compiled(key, grammar)
            if len(self._compiled) > GRAMMAR_CACHE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return compiled

    def mask(self, compiled: _Compiled, state: State) -> tuple[torch.Tensor, bool]:
        """The mask of `state` in `compiled`'s grammar and whether it allows any token, from the
        cache (least recently used masks go first, within MASK_CACHE_BYTES over every grammar)."""
        key = (compiled.key, state)
        entry = self._masks.get(key)
        if entry is not None:
            self.stats.hits += 1
            self._masks.move_to_end(key)
            return entry
        vocab = self.vocab  # (built on first use: not counted as a mask's cost)
        start = time.perf_counter()
        mask = vocab.mask(compiled.grammar, state)
        entry = self._masks[key] = (mask, bool(mask.any()))
        self.stats.build_seconds += time.perf_counter() - start
        self.stats.built += 1
        if len(self._masks) > max(16, MASK_CACHE_BYTES // self.vocab.vocab_size):
            self._masks.popitem(last=False)
        return entry

    def guide(self, spec: StructuredOutputsParams) -> TokenGuide:
        """A new guide for one sample under `spec`."""
        return TokenGuide(self, self.compile(spec), spec.start_after)

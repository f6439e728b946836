"""Token masks from byte grammars: which tokens keep a response inside its grammar.

`TokenVocabulary` knows the bytes each token adds to a response (byte tokens from the
vocabulary; other tokens decoded after an anchor token, so a SentencePiece `▁` reads as the
space it is mid-text). A mask for a grammar state is found by walking every token at once, one
byte position at a time, with numpy: each grammar's states are interned as small ints and a
table `[state, byte] -> state` is filled the first time a walk meets an entry (the grammar, in
Python, is asked each pair once; after that a walk is array lookups over the tokens still
alive). Inside a JSON string (most of a long answer) the many tokens that are plain text and
fit are allowed as a block and only the rest are walked.

`StructuredOutputs` is the engine's: it compiles each constraint once, caches masks per grammar
state (a response keeps returning to the same few states), and hands each sample a `TokenGuide`
that follows its tokens.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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

MASK_CACHE_BYTES = 256 << 20  # masks kept, over all grammars: a byte per vocabulary entry, 4 more per device form
GRAMMAR_CACHE = 64  # compiled grammars kept


class TokenVocabulary:
    """The bytes of every token of a tokenizer, laid out for column walks. Special tokens and tokens
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
        tokens = [(b, t) for t, b in enumerate(self.bytes) if b]
        self.all = _TokenArrays(tokens)
        # Plain string text: whole characters, no quote, backslash or control byte; how many.
        chars = [_plain_chars(b) for b, _ in tokens]
        plain = [1 << 30] * vocab_size
        for (_, t), n in zip(tokens, chars, strict=True):
            if n is not None:
                plain[t] = n
        self.plain_chars = torch.tensor(plain, dtype=torch.int32)
        self.not_plain = _TokenArrays([bt for bt, n in zip(tokens, chars, strict=True) if n is None])
        self._walks: weakref.WeakKeyDictionary[Grammar, _Transitions] = weakref.WeakKeyDictionary()

    def mask(self, grammar: Grammar, state: State) -> torch.Tensor:
        """A bool mask `[vocab_size]` of the tokens whose bytes `grammar` allows from `state`."""
        room = grammar.plain_string_room(state)
        if room is False:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            walk = self.all
        else:  # inside a string: plain text that fits is allowed as a block; the rest is walked
            mask = self.plain_chars <= (1 << 29 if room is None else room)
            walk = self.not_plain
        transitions = self._walks.get(grammar)
        if transitions is None:
            transitions = self._walks[grammar] = _Transitions(grammar)
        elif len(transitions.states) > _Transitions.MAX_STATES:
            transitions.reset()
        allowed = walk.allowed(transitions, state)
        if len(allowed):
            mask[torch.from_numpy(allowed)] = True
        return mask


class _Transitions:
    """One grammar's states interned as small ints, with a table `[state, byte] -> state` filled
    as walks meet its entries (-2: not yet asked, -1: the byte is refused). A mask's walk is then
    array lookups; the grammar is asked each (state, byte) once."""

    UNKNOWN, DEAD = -2, -1
    MAX_STATES = 4096  # past this the table starts again (at the next mask): 4 MiB per grammar

    def __init__(self, grammar: Grammar) -> None:
        # (weakly: the vocabulary keys its tables by grammar, weakly, so they go with it)
        self._grammar = weakref.ref(grammar)
        self.reset()

    @property
    def grammar(self) -> Grammar:
        grammar = self._grammar()
        assert grammar is not None  # (a walk runs while its grammar is in hand)
        return grammar

    def reset(self) -> None:
        self.ids: dict[State, int] = {}
        self.states: list[State] = []
        self.table = np.full((64, 256), self.UNKNOWN, dtype=np.int32)

    def intern(self, state: State) -> int:
        sid = self.ids.get(state)
        if sid is None:
            sid = self.ids[state] = len(self.states)
            self.states.append(state)
            if sid >= len(self.table):
                grown = np.full((2 * len(self.table), 256), self.UNKNOWN, dtype=np.int32)
                grown[:len(self.table)] = self.table
                self.table = grown
        return sid

    def step(self, sids: np.ndarray, data: np.ndarray) -> np.ndarray:
        """The states after byte `data[i]` from state `sids[i]`, each (-1 where refused)."""
        nxt = self.table[sids, data]
        unknown = nxt == self.UNKNOWN
        if unknown.any():
            pairs = sids[unknown].astype(np.int64) * 256 + data[unknown]
            if len(pairs) > 4096:  # (a new state's first column: marking beats sorting a vocabulary's worth)
                seen = np.zeros(len(self.states) * 256, dtype=bool)
                seen[pairs] = True
                pairs = np.flatnonzero(seen).tolist()
            else:
                pairs = set(pairs.tolist())  # (np.unique would import numpy.ma, 7 ms, at the first mask)
            for pair in pairs:
                sid, b = divmod(pair, 256)
                after = self.grammar.advance(self.states[sid], b)
                self.table[sid, b] = self.DEAD if after is None else self.intern(after)
            nxt = self.table[sids, data]
        return nxt


class _TokenArrays:
    """Tokens sorted longest first, their bytes kept a column per position: column `d` holds
    byte `d` of every token longer than `d` (a prefix of the order), so a walk reads one column
    per byte over the tokens still alive."""

    def __init__(self, tokens: list[tuple[bytes, int]]) -> None:
        tokens = sorted(tokens, key=lambda bt: -len(bt[0]))
        self.ids = np.array([t for _, t in tokens], dtype=np.int64)
        self.lens = np.array([len(b) for b, _ in tokens], dtype=np.int32)
        width = int(self.lens[0]) if len(tokens) else 0
        flat = np.frombuffer(b"".join(b for b, _ in tokens), dtype=np.uint8)
        starts = np.concatenate([[0], np.cumsum(self.lens[:-1], dtype=np.int64)]) if len(tokens) else self.ids
        longer = np.searchsorted(-self.lens, -np.arange(width), side="left")  # tokens longer than d: a prefix
        self.columns = [flat[starts[:n] + d] for d, n in enumerate(longer.tolist())]
        # The tokens grouped by first byte: a state that allows few first bytes starts from few tokens.
        first = self.columns[0] if width else np.zeros(0, dtype=np.uint8)
        self.by_first = np.argsort(first, kind="stable")
        self.first_starts = np.searchsorted(first[self.by_first], np.arange(257))

    def allowed(self, walk: _Transitions, state: State) -> np.ndarray:
        """The ids of the tokens whose bytes the grammar allows from `state`."""
        if not self.columns:
            return self.ids
        start = walk.intern(state)
        row = walk.step(np.full(256, start, dtype=np.int32), np.arange(256, dtype=np.uint8))
        alive = np.concatenate([self.by_first[self.first_starts[b]:self.first_starts[b + 1]]
                                for b in np.flatnonzero(row >= 0).tolist()] or [self.ids[:0]])
        cur = row[self.columns[0][alive]]
        out = []
        for column in self.columns[1:]:
            done = self.lens[alive] == len(out) + 1
            out.append(alive[done])
            alive, cur = alive[~done], cur[~done]
            if not len(alive):
                break
            nxt = walk.step(cur, column[alive])
            ok = nxt >= 0
            alive, cur = alive[ok], nxt[ok]
        out.append(alive)  # (what is left has all its bytes walked)
        return self.ids[np.concatenate(out)]


_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')


def _plain_chars(raw: bytes) -> int | None:
    """How many characters `raw` is, if it is plain string text (whole UTF-8 characters, no quote,
    backslash or control byte); else None."""
    if _NOT_PLAIN.search(raw):
        return None
    try:
        return len(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


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
        """The tokens allowed next (a bool mask), end tokens not included (see `complete`)."""
        if self.state is None:
            return torch.zeros(self._outputs.vocab.vocab_size, dtype=torch.bool)
        return self._outputs.mask(self._compiled, self.state).allowed

    def additive(self, device: torch.device | str, opened: tuple[int, ...] = ()) -> torch.Tensor:
        """The same as float32 logit offsets on `device`, 0 where allowed and -inf elsewhere (the
        sampler adds them: far cheaper than a masked fill), with the tokens `opened` allowed too
        (the end tokens where the answer may end), cached there beside the mask."""
        if self.state is None:
            offsets = torch.full((self._outputs.vocab.vocab_size,), -math.inf)
            offsets[list(opened)] = 0.0
            return offsets.to(device)
        return self._outputs.additive(self._outputs.mask(self._compiled, self.state), device, opened)

    @property
    def exhausted(self) -> bool:
        """Whether no token may follow (the answer is whole, or the vocabulary cannot go on)."""
        return self.state is None or not self._outputs.mask(self._compiled, self.state).any

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
class _Mask:
    """A grammar state's cached mask, whether it allows any token, and its additive form per device."""

    allowed: torch.Tensor
    any: bool
    additive: dict[tuple[str, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.allowed.numel() * (1 + 4 * len(self.additive))


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
        self._masks: OrderedDict[tuple[str, State], _Mask] = OrderedDict()
        self._mask_bytes = 0

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

    def mask(self, compiled: _Compiled, state: State) -> _Mask:
        """The mask of `state` in `compiled`'s grammar, from the cache (least recently used masks go
        first, within MASK_CACHE_BYTES over every grammar and device)."""
        key = (compiled.key, state)
        entry = self._masks.get(key)
        if entry is not None:
            self.stats.hits += 1
            self._masks.move_to_end(key)
            return entry
        vocab = self.vocab  # (built on first use: not counted as a mask's cost)
        start = time.perf_counter()
        mask = vocab.mask(compiled.grammar, state)
        entry = self._masks[key] = _Mask(mask, bool(mask.any()))
        self.stats.build_seconds += time.perf_counter() - start
        self.stats.built += 1
        self._grew(entry.nbytes)
        return entry

    def additive(self, entry: _Mask, device: torch.device | str, opened: tuple[int, ...] = ()) -> torch.Tensor:
        """`entry`'s additive form on `device`, the tokens `opened` allowed too (made once, then
        cached with it: a state where answers may end asks for its end tokens every step)."""
        key = (str(device), opened)
        offsets = entry.additive.get(key)
        if offsets is None:
            offsets = torch.zeros(entry.allowed.shape, dtype=torch.float32).masked_fill_(~entry.allowed, -math.inf)
            offsets[list(opened)] = 0.0
            offsets = entry.additive[key] = offsets.to(device)
            self._grew(4 * entry.allowed.numel())
        return offsets

    def _grew(self, nbytes: int) -> None:
        self._mask_bytes += nbytes
        while self._mask_bytes > MASK_CACHE_BYTES and len(self._masks) > 16:
            _, old = self._masks.popitem(last=False)
            self._mask_bytes -= old.nbytes

    def guide(self, spec: StructuredOutputsParams) -> TokenGuide:
        """A new guide for one sample under `spec`."""
        return TokenGuide(self, self.compile(spec), spec.start_after)

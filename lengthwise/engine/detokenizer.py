"""Streaming text: token ids to text one token at a time, and stop strings over that text.

`IncrementalDetokenizer` uses vLLM's prefix/read-offset window: each new token is decoded together
with the few tokens before it, so that the decoder's context-dependent rules (a leading space
stripped or kept, byte tokens merged into one character, word-piece joins) come out as they do in
a decode of the whole sequence, while each call costs O(window), not O(length).

`StopStringMatcher` finds stop strings in the growing text, searching only where a new match can
end, and tells a streaming server how much of the tail to hold back.

`TokenPieces` renders each sampled token (and its logprob alternatives) as text in context, for
the server's logprobs and the offline `Logprob.decoded_token`.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from lengthwise.tokenizer import Tokenizer

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens decoded before the read offset.
_PREFIX_TOKENS = 5
_PROMPT_TAIL = 16
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text, one token at a time.

    `add(token_id)` returns the text that token finalised: empty while a multi-byte character is
    still incomplete (the decoded tail ends in U+FFFD) and while a run of byte-fallback tokens
    (`<0xNN>`) is open, because a later byte can still change how the whole run decodes. The
    concatenation of every `add` and a final `flush()` equals `tokenizer.decode(output_ids)` when
    there is no prompt, and the prompt's continuation in `decode(prompt_ids + output_ids)` when
    there is one (the prompt's last ids give the first output token its context, e.g. a leading
    space).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        if not isinstance(skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be a bool, got {skip_special_tokens!r}")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._vocab = tokenizer.vocab_size
        # Only the prompt's tail is kept, with room to move the window's start back a little.
        self._ids: list[int] = [int(t) for t in prompt_ids[-_PROMPT_TAIL:]] if prompt_ids is not None else []
        self._read = len(self._ids)
        self._prefix = max(self._read - _PREFIX_TOKENS, 0)
        # The window must not start inside a character: the output's bytes could otherwise merge
        # with a partial one (byte-fallback runs decode all-or-nothing) into U+FFFD.
        while self._prefix > 0 and self._decode(self._prefix, self._read).startswith(_REPLACEMENT):
            self._prefix -= 1
        # A prompt that ends inside a character: leave those tokens unread, so the character the
        # output completes is emitted whole instead of being lost in the prefix's U+FFFD.
        while self._read > self._prefix and self._decode(self._prefix, self._read).endswith(_REPLACEMENT):
            self._read -= 1
        self._open_bytes = False
        for tid in reversed(self._ids):
            if self._is_byte_token(tid):
                self._open_bytes = True
                break
            if not self._is_invisible(tid):
                break
        self._text = ""

    @property
    def text(self) -> str:
        """All text finalised so far (the concatenation of what `add` and `flush` returned)."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it finalised (possibly empty)."""
        self._ids.append(token_id)
        if self._is_byte_token(token_id):
            self._open_bytes = True
        elif not (self._open_bytes and self._is_invisible(token_id)):
            self._open_bytes = False  # a skipped special token does not end a byte run: the decoder never sees it
        if self._open_bytes:
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the sequence: return whatever is still held back (it may contain U+FFFD)."""
        self._open_bytes = False
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix, len(self._ids))
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(_REPLACEMENT)):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _is_byte_token(self, token_id: int) -> bool:
        # The form tokenizers' ByteFallback decoder recognises: exactly "<0xNN>".
        s = self._tokenizer.id_to_token(token_id) if 0 <= token_id < self._vocab else None
        if s is None or len(s) != 6 or not s.startswith("<0x") or not s.endswith(">"):
            return False
        try:
            int(s[3:5], 16)
        except ValueError:
            return False
        return True

    def _is_invisible(self, token_id: int) -> bool:
        """Whether the decoder never sees this id: out of range, or a special token being skipped."""
        if not 0 <= token_id < self._vocab:
            return True
        return (self._skip and self._tokenizer.decode([token_id], skip_special_tokens=True) == ""
                and self._tokenizer.decode([token_id], skip_special_tokens=False) != "")


class StopStringMatcher:
    """Finds the first stop string to complete in a sequence's growing text.

    With several stop strings, the one that completes first (earliest end; on a tie, earliest
    start) wins: the answer is then the same however the text was split into tokens, as if it had
    arrived one character at a time. `matched` holds that stop string once `check` has found it.
    """

    def __init__(self, stops: Sequence[str], include_in_output: bool) -> None:
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stops must be a sequence of non-empty strings, got {stops!r}")
        if not isinstance(include_in_output, bool):
            raise ValueError(f"include_in_output must be a bool, got {include_in_output!r}")
        self.stops = tuple(stops)
        self.include_in_output = include_in_output
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.matched: str | None = None

    def check(self, text: str, num_new_chars: int) -> int | None:
        """Whether a stop string completed in `text`, whose last `num_new_chars` characters are new.

        Returns None if none did, else how many characters of `text` to keep: up to the stop
        string's start, or its end with `include_in_output`. Only the last
        `num_new_chars + max_len - 1` characters are searched: an earlier match would have been
        found by an earlier call.
        """
        if num_new_chars <= 0:
            return None
        n = len(text)
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            # A new match must end inside the new characters.
            start = text.find(stop, max(0, n - num_new_chars - len(stop) + 1))
            if start != -1:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is None:
            return None
        end, start, self.matched = best
        return end if self.include_in_output else start

    def hold_back(self, text: str) -> int:
        """How many trailing characters of `text` to hold back from a stream, because they may be
        the start of a stop string (which would then be cut from the output). Zero with
        `include_in_output`: the text before a stop string is never cut then."""
        if self.include_in_output:
            return 0
        for k in range(min(len(text), self.max_len - 1), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0


def token_text(tokenizer: Tokenizer, prev: int, token_id: int) -> str:
    """A token's text as it reads after `prev` (alone, SentencePiece would drop its leading space)."""
    return tokenizer.decode([prev, token_id], skip_special_tokens=False)[
        len(tokenizer.decode([prev], skip_special_tokens=False)):]


class TokenPieces:
    """The sampled tokens of one choice as its logprobs show them, in order, across a stream's deltas.

    A token that holds part of a character (a byte-fallback `<0xF0>`, a byte-level 'Ġð') has no
    text of its own: it is shown by its raw bytes, as text with the broken bytes escaped
    (' \\xf0'), as OpenAI writes them, and the `bytes` of consecutive tokens join into the
    character. Text offsets count the characters before a token in the choice's text, so a
    character's pieces all point at its start.
    """

    def __init__(self, tokenizer: Tokenizer, prev: int) -> None:
        self._tokenizer = tokenizer
        self._prev = prev  # the token before the next one: context for its leading space
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # as the response text decodes
        self.offset = 0

    def piece(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes) of `token_id` at the current position (the sampled token or an alternative)."""
        raw = self._tokenizer.token_bytes(token_id)
        if raw is not None:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("utf-8", "backslashreplace"), raw
        text = token_text(self._tokenizer, self._prev, token_id)
        return text, text.encode("utf-8")

    def take(self, token_id: int) -> tuple[str, bytes, int]:
        """(text, bytes, text offset) of the sampled `token_id`; moves past it."""
        text, raw = self.piece(token_id)
        offset = self.offset
        self.offset += len(self._utf8.decode(raw))
        self._prev = token_id
        return text, raw, offset

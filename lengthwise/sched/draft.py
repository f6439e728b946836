"""Draft proposers for speculative decoding: tokens a sequence will likely write next, guessed
without running the model. Pure Python: no torch.

`NgramProposer` is prompt lookup decoding (vLLM's "ngram" method): the last n tokens of the
sequence (prompt and output so far) are looked up among its earlier tokens, longest n first,
and the tokens that followed their latest earlier occurrence are the draft. It pays where the
answer quotes its input or repeats itself (code edits, extraction, summaries, loops) and costs
little elsewhere: a sequence with no match is decoded as usual.

Each sequence keeps an index (n-gram -> latest start with a token after it) that grows with
the sequence, so a proposal costs a few dict lookups, not a scan of the context. The index is
keyed by the n-grams' hashes (about 100 bytes per token and n-gram size); a collision only makes
a draft that verification refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lengthwise.sequence import Sequence


class DraftProposer(Protocol):
    """What the scheduler asks for each decode row it plans."""

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that may follow `seq`'s tokens (prompt, then outputs)."""

    def forget(self, seq: Sequence) -> None:
        """`seq` ended or lost its outputs (an FCR restart): drop what was kept for it."""


@dataclass
class _Index:
    num_indexed: int = 0  # tokens of the sequence covered so far
    grams: dict[int, dict[int, int]] = field(default_factory=dict)  # n -> hash of an n-gram -> latest start


class NgramProposer:
    """Prompt lookup decoding: n-grams of `min_n..max_n` tokens, drafts of up to `num_tokens`."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n or num_tokens < 1:
            raise ValueError(f"need 1 <= min_n <= max_n and num_tokens >= 1, got {min_n}, {max_n}, {num_tokens}")
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n
        self._indexes: dict[str, _Index] = {}

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        k = min(max_tokens, self.num_tokens)
        if k <= 0:
            return []
        prompt, output = seq.request.prompt_ids, seq.output_ids
        index = self._update(seq, prompt, output)
        n_tokens = len(prompt) + len(output)
        tail = _span(prompt, output, max(0, n_tokens - self.max_n), n_tokens)
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            start = index.grams[n].get(hash(tuple(tail[len(tail) - n:])))
            if start is None:
                continue
            # The tokens after the earlier occurrence; where they run into the end of the sequence,
            # the repeat goes on with the draft itself (a loop of period n_tokens - n - start).
            src = start + n
            draft = _span(prompt, output, src, min(src + k, n_tokens))
            for at in range(src + len(draft), src + k):
                draft.append(draft[at - n_tokens])
            return draft
        return []

    def forget(self, seq: Sequence) -> None:
        self._indexes.pop(seq.seq_id, None)

    def _update(self, seq: Sequence, prompt: list[int], output: list[int]) -> _Index:
        """The sequence's index, extended to every n-gram of its tokens that has a token after it."""
        index = self._indexes.get(seq.seq_id)
        new = len(prompt) + len(output)
        if index is None or index.num_indexed > new:
            index = self._indexes[seq.seq_id] = _Index(grams={n: {} for n in range(self.min_n, self.max_n + 1)})
        old = index.num_indexed
        first = max(0, old - self.max_n)
        tokens = _span(prompt, output, first, new)  # the tokens the new n-grams span
        for n, grams in index.grams.items():
            # Starts i with i + n <= new - 1 (a following token); later starts overwrite earlier ones.
            for i in range(max(0, old - n), new - n):
                grams[hash(tuple(tokens[i - first:i - first + n]))] = i
        index.num_indexed = new
        return index


def _span(prompt: list[int], output: list[int], a: int, b: int) -> list[int]:
    """Tokens `a:b` of the sequence `prompt + output`, without joining the two."""
    p = len(prompt)
    if b <= p:
        return prompt[a:b]
    if a >= p:
        return output[a - p:b - p]
    return prompt[a:] + output[:b - p]

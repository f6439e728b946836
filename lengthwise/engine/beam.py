"""Beam search: which beams go on after each step, and which answers are kept.

The selection is transformers' (`GenerationMixin._beam_search`, v5), step for step, so an engine
and `model.generate(num_beams=...)` return the same beams: from the running beams' next-token
log-probabilities (summed onto each beam's score) take the best `keep` candidates; those that end
(the model's end token, or `max_tokens` reached) and rank among the first `width` become finished
answers, scored `cumulative_logprob / generated ** length_penalty` (the best `width` are kept);
the best `width` that do not end are the next step's beams. The search stops when no running beam
can still beat the worst kept answer (`early_stopping`), or every candidate ends.

A request's beams live in fixed slots (its sequences). A new beam goes back into its parent's
slot where it can, so that most slots just grow by a token and keep their KV blocks; the others
take a copy of their parent's tokens and fork its KV (kv/block_manager.py `fork_responses`).
`candidates` ranks the candidates of many requests in one batched pass; `BeamSearch.advance`
does the per-request bookkeeping on the few numbers that come back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.beam_search import BeamSearchParams
from lengthwise.engine.sampler import TokenLogprobs

# Up to this many elements, `candidates` ranks every candidate token with one gather (a
# [requests, candidates, vocabulary] temporary: 64 MiB of float32).
RANK_GATHER_ELEMENTS = 1 << 24


@dataclass
class Hypothesis:
    """A finished answer and its length-normalized `score` (what answers are ranked by)."""

    tokens: list[int]
    logprobs: list[tuple[int, float, int]]  # (token, logprob, rank) per token; `token_logprobs` as vLLM's
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" (it ended on an end token) or "length" (max_tokens)

    def token_logprobs(self) -> list[TokenLogprobs]:
        """Its tokens' log-probabilities and ranks (made when asked: most answers are displaced
        by better ones before the search ends)."""
        return [TokenLogprobs(t, lp, r, []) for t, lp, r in self.logprobs]


@dataclass
class Candidates:
    """One request's best `keep` continuations, best first: score (the beam's summed
    log-probability with the token's), flat index `beam * vocab + token`, the token's own
    log-probability and rank in its beam's distribution, and the score length-normalized."""

    scores: list[float]
    index: list[int]
    logprobs: list[float]
    ranks: list[int]
    normalized: list[float]
    vocab: int


class BeamSearch:
    """The search state of one request (see the module docstring). `tokens[j]` and `logprobs[j]`
    are the beam in slot j (the engine hands `tokens[j]` to sequence j as its output ids)."""

    def __init__(self, params: BeamSearchParams, max_tokens: int, eos_ids: frozenset[int]) -> None:
        self.width = params.beam_width
        self.max_tokens = max_tokens  # params.max_tokens clipped to the context
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        # transformers keeps max(2, 1 + end tokens) x width candidates: enough that `width` of them
        # do not end, whatever the end tokens take.
        self.keep = max(2, 1 + len(self.eos_ids)) * self.width
        self.reset()

    def reset(self) -> None:
        """Start over (also: the request's output was discarded and it will run again)."""
        self.tokens: list[list[int]] = [[]]  # before the first step, one beam: the prompt
        self.logprobs: list[list[tuple[int, float, int]]] = [[]]  # (token, logprob, rank) per token
        self.scores: list[float] = [0.0]  # each beam's summed log-probability
        self.finished: list[Hypothesis] = []  # at most `width`, best first
        self.improvable = True  # whether a running beam may still beat the worst finished answer
        self.done = False

    @property
    def generated(self) -> int:
        """Tokens each running beam has (they all have as many)."""
        return len(self.tokens[0])

    def advance(self, c: Candidates) -> list[int]:
        """Take one step's candidates. Returns each slot's parent slot: itself where the beam grew
        by a token in place, another where it now descends from that slot's beam (its sequence
        must fork that one's KV). Empty once `done` (then `answers()` holds the result)."""
        if self.done:
            raise RuntimeError("beam search already finished")
        vocab, width = c.vocab, self.width
        length = self.generated + 1
        hits = [i % vocab in self.eos_ids or length >= self.max_tokens for i in c.index]
        if self.improvable and not (self.early_stopping is True and len(self.finished) == width):
            # Candidates that end and rank among the first `width` may become answers (stable
            # sort: an earlier answer stays ahead of an equal new one).
            new = [self._hypothesis(c, k) for k in range(min(width, len(hits))) if hits[k]]
            if new:
                self.finished = sorted(self.finished + new, key=lambda h: -h.score)[:width]
        chosen = [k for k, hit in enumerate(hits) if not hit][:width]
        if self.improvable and len(self.finished) == width:
            # Could the best running beam still beat the worst answer kept? (transformers' heuristic;
            # "never" with a positive penalty judges it at the longest length it could reach).
            best = c.scores[chosen[0]] if chosen else float("-inf")
            at = self.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else length
            # (in float32, as transformers divides its scores tensor)
            bound = torch.tensor(best, dtype=torch.float32) / float(at) ** self.length_penalty
            self.improvable = bool(bound > self.finished[-1].score)
        self.done = (not self.improvable or all(hits)
                     or (self.early_stopping is True and len(self.finished) == width))
        if self.done:
            return []
        return self._place(c, chosen)

    def _place(self, c: Candidates, chosen: list[int]) -> list[int]:
        """Put the chosen candidates (best first) into the slots: into their parent's slot where
        free (it grows in place), else into a free slot with a copy of the parent."""
        parents = [c.index[k] // c.vocab for k in chosen]
        slot_of: list[int | None] = [None] * len(chosen)  # (filled for every beam below)
        taken: set[int] = set()
        for n, p in enumerate(parents):
            if p not in taken and p < self.width:
                slot_of[n] = p
                taken.add(p)
        free = iter(s for s in range(self.width) if s not in taken)
        sources = list(range(self.width))
        old_tokens, old_logprobs = self.tokens, self.logprobs
        tokens: list[list[int]] = [[] for _ in range(self.width)]
        logprobs: list[list[tuple[int, float, int]]] = [[] for _ in range(self.width)]
        scores = [0.0] * self.width
        for n, p in enumerate(parents):  # copies first: a parent's own list grows below
            if slot_of[n] is None:
                slot_of[n] = slot = next(free)
                sources[slot] = p
                tokens[slot], logprobs[slot] = list(old_tokens[p]), list(old_logprobs[p])
            else:
                tokens[p], logprobs[p] = old_tokens[p], old_logprobs[p]  # (the same lists: it grows)
        for n, k in enumerate(chosen):
            slot = slot_of[n]
            token = c.index[k] % c.vocab
            tokens[slot].append(token)
            logprobs[slot].append((token, c.logprobs[k], c.ranks[k]))
            scores[slot] = c.scores[k]
        self.tokens, self.logprobs, self.scores = tokens, logprobs, scores
        return sources

    def _hypothesis(self, c: Candidates, k: int) -> Hypothesis:
        p, token = c.index[k] // c.vocab, c.index[k] % c.vocab
        return Hypothesis(self.tokens[p] + [token], [*self.logprobs[p], (token, c.logprobs[k], c.ranks[k])],
                          c.scores[k], c.normalized[k], "stop" if token in self.eos_ids else "length")

    def answers(self) -> list[Hypothesis]:
        """The finished answers, best first (`width` of them once `done`)."""
        return list(self.finished)


def candidates(searches: list[BeamSearch], logprobs: torch.Tensor) -> list[Candidates]:
    """Rank the next-token candidates of several searches in one pass. `logprobs [R, B, vocab]`:
    search r's B running beams' log-probabilities (float32, in slot order); all R searches have B
    beams and the same `keep`. One read back for all of them."""
    r, b, vocab = logprobs.shape
    keep = min(searches[0].keep, b * vocab)
    device = logprobs.device
    scores = torch.tensor([s.scores for s in searches], dtype=torch.float32, device=device)
    flat = (logprobs + scores[:, :, None]).reshape(r, b * vocab)
    top, index = torch.topk(flat, keep, dim=-1)
    own = logprobs.reshape(r, b * vocab).gather(1, index)
    # The rank of each token in its beam's distribution (vLLM's: ties count as ahead): the
    # candidates' rows gathered at once where that is small, one candidate at a time where a
    # large vocabulary would make it a big temporary.
    beam_of = index // vocab
    if r * keep * vocab <= RANK_GATHER_ELEMENTS:
        rows = logprobs.gather(1, beam_of[:, :, None].expand(r, keep, vocab))
        ranks = (rows >= own[:, :, None]).sum(dim=-1, dtype=torch.int32)
    else:
        which = torch.arange(r, device=device)
        ranks = torch.stack([(logprobs[which, beam_of[:, k]] >= own[:, k, None]).sum(dim=-1, dtype=torch.int32)
                             for k in range(keep)], dim=1)
    # Length-normalized as transformers computes it: each search's scores divided by a Python
    # number (so the same float32 rounding on every device).
    normalized = torch.stack([top[i] / float(s.generated + 1) ** s.length_penalty for i, s in enumerate(searches)])
    packed = torch.stack([top, own, normalized]).tolist()
    index_l, ranks_l = index.tolist(), ranks.tolist()
    return [Candidates(packed[0][i], index_l[i], packed[1][i], ranks_l[i], packed[2][i], vocab) for i in range(r)]

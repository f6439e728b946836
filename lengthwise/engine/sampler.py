"""The one sampler: penalties, temperature, top-k, top-p, min-p and logprobs for a batch of rows.

Order: log-probabilities of the raw logits (if asked) → repetition, frequency and presence
penalties → temperature → top-k, top-p, min-p → one draw from the row's own generator. The
filters run in transformers' order (top-p's nucleus over the whole distribution, then min-p's cut);
vLLM V1 cuts min-p first and takes the nucleus of what is left, which keeps fewer tokens when
both top-p and min-p are set. Each alone gives the same set either way.

Batch independence is a hard rule: a row's token and logprobs depend only on its own logits,
params, history and generator, never on which other rows share the batch. So every operation
here is either element-wise and correctly rounded (division, multiplication, comparison,
subtraction), an exact selection (argmax, topk values, gather), or a row-wise kernel whose
arithmetic is the same for each row whatever the batch size (softmax, log_softmax, cumsum). No
shape a row's arithmetic sees depends on other rows: where rows are grouped, they are grouped by
their own parameters. Element-wise `exp` over a flattened batch is avoided on purpose: PyTorch
vectorizes it in chunks that do not line up with rows, and its scalar tail can differ by an ulp.

Speed on CPU (R=256 rows, V=32000): greedy rows without penalties cost one argmax; penalties
touch only the positions of tokens seen (a gather and a scatter over flat ids, no dense [R, V]
masks); top-k/top-p never sort the vocabulary unless the distribution is so flat that the
nucleus does not fit in the candidate lists (`_FIRST_CANDIDATES` growing by `_CANDIDATE_GROWTH`);
and a draw takes one random number per row (an inverse CDF, in two levels over a whole
vocabulary), not a multinomial over V per row.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lengthwise.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# Top-k/top-p look at the most likely tokens first; a row whose kept set does not fit retries
# with a list this many times longer, up to the whole vocabulary.
_FIRST_CANDIDATES = 64
_CANDIDATE_GROWTH = 8
# Columns per block in the two-level draw over a whole vocabulary.
_DRAW_BLOCK = 256


@dataclass(frozen=True)
class Logprob:
    """One entry of `TokenLogprobs` read as vLLM's `dict[token_id, Logprob]`. `decoded_token` is
    the token's text where it stands in the output (a piece of a character shows its bytes
    escaped, as the server's logprobs do); None when the request was not detokenized."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class TokenLogprobs(Mapping[int, Logprob]):
    """Log-probabilities for one generated token, under the model's raw distribution.

    `logprob` is the sampled token's, `rank` its rank (1 = most likely; as vLLM, tokens with an
    equal logprob count as ahead), `top` the `SamplingParams.logprobs` most likely
    `(token_id, logprob)` pairs, most likely first (empty when `logprobs=0`).

    It is also vLLM's shape: a mapping from token id to `Logprob`, holding the sampled token and
    the top ones (`out.logprobs[i][token_id].logprob`).
    """

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]
    # Each listed token's text in context (`Logprob.decoded_token`); filled when the output is built.
    texts: dict[int, str] | None = field(default=None, repr=False, compare=False)

    def _entries(self) -> dict[int, Logprob]:
        texts = self.texts or {}
        entries = {self.token_id: Logprob(self.logprob, self.rank, texts.get(self.token_id))}
        for k, (t, lp) in enumerate(self.top):
            entries.setdefault(t, Logprob(lp, k + 1, texts.get(t)))
        return entries

    def __getitem__(self, token_id: int) -> Logprob:
        return self._entries()[token_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())


@dataclass
class SampleOutput:
    """One token per row, and that row's `TokenLogprobs` (None where its params ask for none)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
           before_read: Callable[[torch.Tensor], object] | None = None,
           banned: Sequence[Collection[int]] | None = None,
           allowed: Sequence[torch.Tensor | None] | None = None) -> SampleOutput:
    """Pick one token for each row of `logits` (`[R, V]`, float32; not modified).

    Row `i` samples with `params[i]` and draws from `generators[i]` (None: torch's default RNG;
    unused by greedy rows). `prompt_ids[i]` and `output_ids[i]` (the tokens the row generated
    so far) feed the penalties and are read only by rows that use penalties; each may be a list,
    a tuple, a numpy array or a 1-D tensor (tensors avoid a conversion). `banned[i]`: tokens row
    `i` must not draw (the stop tokens of a sample short of its `min_tokens`). `allowed[i]`: a
    bool mask `[V]` of the only tokens row `i` may draw (structured outputs), or the same as
    float offsets added to its logits (0 where allowed, -inf elsewhere), or None.
    """
    _check_inputs(logits, params, generators, prompt_ids, output_ids)
    if logits.dtype != torch.float32:
        logits = logits.float()
    num_rows = logits.shape[0]
    tokens = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    banned = banned if banned is not None and any(banned) else None
    allowed = allowed if allowed is not None and any(m is not None for m in allowed) else None
    if greedy:
        x = _penalised(logits, greedy, params, prompt_ids, output_ids, banned, allowed)
        tokens = _put(tokens, greedy, x.argmax(dim=-1))
    if sampled:
        x = _penalised(logits, sampled, params, prompt_ids, output_ids, banned, allowed)
        tokens = _put(tokens, sampled, _sample_rows(x, [params[i] for i in sampled],
                                                    [generators[i] for i in sampled], owned=x is not logits))
    if before_read is not None and tokens.is_cuda:
        host = torch.empty(num_rows, dtype=torch.long, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(tokens.device))
        before_read(tokens)
        copied.synchronize()  # waits for the copy, not for what `before_read` queued after it
        token_list = host.tolist()
    else:
        if before_read is not None:
            before_read(tokens)
        token_list = tokens.tolist()
    return SampleOutput(token_list, _logprobs(logits, params, tokens))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scale one row of float32 logits `[V]` and mask (to -inf) what top-k/top-p/min-p exclude.

    The sampler's own rule, for inspection: top-k keeps the `top_k` largest logits (and any tied
    with the k-th); top-p then keeps the smallest most-likely prefix whose probability reaches
    `top_p` (and any token tied with its last); min-p then drops tokens whose probability is
    below `min_p` times the largest. Penalties are not applied here.
    """
    x = (logits.float() / params.temperature).unsqueeze(0)
    thr = torch.full((1,), _NEG_INF, device=x.device)
    if _uses_candidates(params, x.shape[1]):
        for _, _, _, row_thr in _resolve_candidates(x, [params]):
            thr = row_thr
    elif params.min_p > 0:
        thr = x.amax(dim=-1) + math.log(params.min_p)
    return x.masked_fill(x < thr.unsqueeze(1), _NEG_INF)[0]


def draw_uniform(generator: torch.Generator | None, device: torch.device | None = None) -> torch.Tensor:
    """The one uniform `[1]` (float64) a sampled row draws from its generator (torch's default RNG
    on `device` for None): the engine replays these draws to rewind a speculative row's generator."""
    where = generator.device if generator is not None else device
    return torch.rand(1, generator=generator, dtype=torch.float64, device=where)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request RNG: seeded when the request gave a seed, else from fresh entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


# --- input handling -------------------------------------------------------------------------------

def _check_inputs(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a 2-D floating-point tensor [rows, vocab], got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    rows = logits.shape[0]
    for name, value in (("params", params), ("generators", generators), ("prompt_ids", prompt_ids),
                        ("output_ids", output_ids)):
        if len(value) != rows:
            raise ValueError(f"{name} has {len(value)} entries for {rows} rows of logits")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(p).__name__}")


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`x` itself when `rows` is every row in order, else a copy of those rows."""
    if len(rows) == x.shape[0]:
        return x
    return x[torch.tensor(rows, device=x.device)]


def _put(out: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    if len(rows) == out.shape[0]:
        return values
    out[torch.tensor(rows, device=out.device)] = values
    return out


def _ids_tensor(seq: Sequence[int]) -> torch.Tensor:
    if isinstance(seq, torch.Tensor):
        return seq.reshape(-1).to(device="cpu", dtype=torch.long)
    # numpy converts a Python list several times faster than torch.tensor does.
    return torch.from_numpy(np.asarray(seq, dtype=np.int64).reshape(-1))


def _flat_positions(rows: list[int], seqs: list[Sequence[int]], vocab: int, name: str,
                    device: torch.device) -> torch.Tensor:
    """Flat indices `row * vocab + id` into a contiguous `[rows, vocab]` tensor, for every id of `seqs[i]`."""
    parts = [_ids_tensor(s) for s in seqs]
    ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab})")
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long),
                                     torch.tensor([p.numel() for p in parts], dtype=torch.long))
    return (row_of * vocab + ids).to(device)


# --- penalties ------------------------------------------------------------------------------------

def _penalised(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
               prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
               banned: Sequence[Collection[int]] | None = None,
               allowed: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """The logits of `rows`, biased, stripped of banned tokens and of those outside their
    `allowed` mask, then penalised where their params ask (vLLM's order); `logits` itself when
    that is all of it, unchanged."""
    x = _take(logits, rows)
    # (one pass over the rows each: this runs every decode step)
    biased = [(j, params[i].logit_bias) for j, i in enumerate(rows) if params[i].logit_bias]
    ban = [(j, banned[i]) for j, i in enumerate(rows) if banned[i]] if banned is not None else []
    masked = [(j, allowed[i]) for j, i in enumerate(rows) if allowed[i] is not None] if allowed is not None else []
    penalised = [j for j, i in enumerate(rows) if params[i].has_penalties]
    if biased or ban or masked or penalised:
        x = x.clone(memory_format=torch.contiguous_format) if x is logits else x
    _apply_logit_bias(x, biased)
    if ban:
        vocab = x.shape[1]
        x.view(-1)[torch.tensor([j * vocab + t for j, ids in ban for t in ids], device=x.device)] = -math.inf
    for j, mask in masked:
        if mask.dtype == torch.bool:
            x[j].masked_fill_(~mask.to(x.device, non_blocking=True), -math.inf)
        else:  # additive offsets (0 or -inf): an add, many times cheaper than a masked fill
            x[j] += mask.to(x.device, non_blocking=True)
    if penalised:
        _apply_penalties(x, penalised, [params[rows[j]] for j in penalised],
                         [prompt_ids[rows[j]] for j in penalised], [output_ids[rows[j]] for j in penalised])
    return x


def _apply_logit_bias(x: torch.Tensor, biases: list[tuple[int, dict[int, float]]]) -> None:
    """Add each row's `{token: bias}` in place to the contiguous `x [N, V]`."""
    if not biases:
        return
    vocab = x.shape[1]
    pos = [j * vocab + t for j, bias in biases for t in bias]
    if any(t >= vocab for _, bias in biases for t in bias):
        raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab})")
    values = [v for _, bias in biases for v in bias.values()]
    flat = x.view(-1)
    index = torch.tensor(pos, device=x.device)
    flat[index] = flat[index] + torch.tensor(values, device=x.device, dtype=x.dtype)


def _apply_penalties(x: torch.Tensor, rows: list[int], params: list[SamplingParams],
                     prompts: list[Sequence[int]], outputs: list[Sequence[int]]) -> None:
    """Apply vLLM's penalties in place to rows `rows` of the contiguous `x [N, V]`.

    Only the positions of tokens that occurred are read and written, so the cost is the number
    of ids, not rows × vocabulary.
    """
    num, vocab = x.shape
    flat = x.view(-1)
    device = x.device
    rep = [j for j, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        pos = torch.unique(_flat_positions([rows[j] for j in rep] * 2, [prompts[j] for j in rep]
                                           + [outputs[j] for j in rep], vocab, "prompt_ids/output_ids", device))
        factor = torch.ones(num, device=device)
        factor[torch.tensor([rows[j] for j in rep], device=device)] = torch.tensor(
            [params[j].repetition_penalty for j in rep], device=device)
        f = factor[pos // vocab]
        vals = flat[pos]
        flat[pos] = torch.where(vals > 0, vals / f, vals * f)
    additive = [j for j, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if additive:
        pos = _flat_positions([rows[j] for j in additive], [outputs[j] for j in additive], vocab, "output_ids",
                              device)
        if pos.numel():
            pos, counts = torch.unique(pos, return_counts=True)
            freq = torch.zeros(num, device=device)
            pres = torch.zeros(num, device=device)
            index = torch.tensor([rows[j] for j in additive], device=device)
            freq[index] = torch.tensor([params[j].frequency_penalty for j in additive], device=device)
            pres[index] = torch.tensor([params[j].presence_penalty for j in additive], device=device)
            row = pos // vocab
            # Two subtractions in vLLM's order, so the rounding matches it too.
            flat[pos] = flat[pos] - freq[row] * counts.to(torch.float32) - pres[row]


# --- sampling -------------------------------------------------------------------------------------

def _top_k_on(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab


def _uses_candidates(p: SamplingParams, vocab: int) -> bool:
    return _top_k_on(p, vocab) or p.top_p < 1.0


def _sample_rows(x: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 owned: bool) -> torch.Tensor:
    """Token ids `[N]` drawn from `x [N, V]` (penalised logits; changed in place only if `owned`)."""
    num, vocab = x.shape
    device = x.device
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        t = torch.tensor(temps, device=device).unsqueeze(1)
        x = x.div_(t) if owned else x / t
        owned = True
    # One uniform per row from the row's own generator: the whole draw is an inverse CDF.
    u = torch.cat([draw_uniform(g, device).to(device) for g in generators])
    out = torch.empty(num, dtype=torch.long, device=device)
    cand = [i for i, p in enumerate(params) if _uses_candidates(p, vocab)]
    full = [i for i, p in enumerate(params) if not _uses_candidates(p, vocab)]
    if full:
        xf = _take(x, full)
        fp = [params[i] for i in full]
        if any(p.min_p > 0 for p in fp):
            # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p): no softmax needed for the cut.
            log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else _NEG_INF for p in fp], device=device)
            mask = xf < (xf.amax(dim=-1) + log_min_p).unsqueeze(1)
            xf = xf.masked_fill_(mask, _NEG_INF) if owned or xf is not x else xf.masked_fill(mask, _NEG_INF)
        out = _put(out, full, _draw(xf.softmax(dim=-1), _take(u, full)))
    if cand:
        xc = _take(x, cand)
        for rows, vals, idx, thr in _resolve_candidates(xc, [params[i] for i in cand]):
            weights = vals.masked_fill(vals < thr.unsqueeze(1), _NEG_INF).softmax(dim=-1)
            at = torch.tensor([cand[r] for r in rows], device=device)
            out[at] = idx.gather(1, _draw(weights, u[at]).unsqueeze(1)).squeeze(1)
    return out


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: per row of `weights [N, W]` (>= 0), the first column whose cumulative weight
    exceeds `u` (in [0, 1)) times the row's total. A zero-weight column is never picked.

    Wide rows go in two levels, block sums then one block's columns, which reads the weights
    once instead of writing a whole cumulative sum, and keeps the block level in float64.
    """
    n, width = weights.shape
    if width <= 4 * _DRAW_BLOCK:
        cdf = weights.cumsum(dim=-1)
        total = cdf[:, -1:]
        return _first_above(cdf, (u.unsqueeze(1) * total.double()).to(cdf.dtype))
    w = weights.contiguous()
    full = width // _DRAW_BLOCK
    mass = w.as_strided((n, full, _DRAW_BLOCK), (width, _DRAW_BLOCK, 1)).sum(dim=-1)
    if full * _DRAW_BLOCK < width:
        mass = torch.cat([mass, w[:, full * _DRAW_BLOCK:].sum(dim=-1, keepdim=True)], dim=1)
    mass = mass.double()
    cdf = mass.cumsum(dim=-1)
    block = _first_above(cdf, u.unsqueeze(1) * cdf[:, -1:])
    # Where inside the chosen block the target falls, as a fraction of the block's mass.
    before = cdf.gather(1, block.unsqueeze(1)) - mass.gather(1, block.unsqueeze(1))
    frac = ((u.unsqueeze(1) * cdf[:, -1:] - before) / mass.gather(1, block.unsqueeze(1))).clamp(0, 1)
    cols = block.unsqueeze(1) * _DRAW_BLOCK + torch.arange(_DRAW_BLOCK, device=w.device)
    inside = cols < width
    inner = w.gather(1, cols.clamp(max=width - 1)).masked_fill(~inside, 0).double().cumsum(dim=-1)
    return block * _DRAW_BLOCK + _first_above(inner, frac * inner[:, -1:])


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first column of the non-decreasing `cdf [N, W]` above `target [N, 1]`."""
    pos = torch.searchsorted(cdf, target.contiguous(), right=True)
    # Rounding may lift the target to the total; then take the last column that added weight.
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
    return torch.minimum(pos, last).squeeze(1)


def _resolve_candidates(x: torch.Tensor, params: list[SamplingParams]
                        ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For rows of `x [N, V]` (temperature applied) that use top-k or top-p, find the kept tokens.

    Yields `(rows, vals, idx, thr)` per group of rows: `vals`/`idx` are each row's most likely
    logits and their token ids (descending), holding every token with logit >= `thr`, the row's
    cut (tokens below it are dropped). A row tries `_FIRST_CANDIDATES` tokens (more for a large
    top-k), then lists `_CANDIDATE_GROWTH` times longer until its kept set provably fits: the
    list's last logit is below the cut, or the list is the whole vocabulary. The list length a
    row ends with depends only on the row itself, so its arithmetic does too.
    """
    num, vocab = x.shape
    device = x.device
    # Top-p without top-k measures mass against the whole row: one row-wise softmax, only for them.
    whole = [i for i, p in enumerate(params) if p.top_p < 1.0 and not _top_k_on(p, vocab)]
    whole_probs = _take(x, whole).softmax(dim=-1) if whole else None
    whole_row = {i: j for j, i in enumerate(whole)}
    size = {i: min(vocab, max(_FIRST_CANDIDATES, p.top_k + 1 if _top_k_on(p, vocab) else 0))
            for i, p in enumerate(params)}
    pending = list(range(num))
    while pending:
        by_size: dict[int, list[int]] = defaultdict(list)
        for i in pending:
            by_size[size[i]].append(i)
        pending = []
        for k_list, rows in by_size.items():
            vals, idx = _take(x, rows).topk(k_list, dim=-1)
            ps = [params[i] for i in rows]
            thr, done = _cut(vals, idx, ps, vocab, k_list == vocab, whole_probs,
                             [whole_row.get(i) for i in rows])
            done_list = done.tolist()
            ok = [j for j, d in enumerate(done_list) if d]
            if ok:
                sel = torch.tensor(ok, device=device) if len(ok) < len(rows) else None
                yield ([rows[j] for j in ok], vals if sel is None else vals[sel], idx if sel is None else idx[sel],
                       thr if sel is None else thr[sel])
            for j, d in enumerate(done_list):
                if not d:
                    size[rows[j]] = min(vocab, k_list * _CANDIDATE_GROWTH)
                    pending.append(rows[j])


def _cut(vals: torch.Tensor, idx: torch.Tensor, params: list[SamplingParams], vocab: int, complete: bool,
         whole_probs: torch.Tensor | None, whole_rows: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the candidate lists `vals`/`idx` `[n, K]`: the logit cut, and whether it is final."""
    n, k_list = vals.shape
    device = vals.device
    thr = torch.full((n,), _NEG_INF, device=device)
    done = torch.ones(n, dtype=torch.bool, device=device)
    last = vals[:, -1]
    # Tokens outside the list have logits <= last; if last is -inf they have no probability at all.
    exhausted = (last == _NEG_INF) | complete
    has_k = [_top_k_on(p, vocab) for p in params]
    kth = None
    if any(has_k):
        k_index = torch.tensor([p.top_k - 1 if h else 0 for p, h in zip(params, has_k, strict=True)], device=device)
        kth = vals.gather(1, k_index.unsqueeze(1)).squeeze(1)
        has_k_t = torch.tensor(has_k, device=device)
        thr = torch.where(has_k_t, kth, thr)
        # Every token tied with the k-th must be in the list, or the top-k set is not known yet.
        done &= ~has_k_t | (last < kth) | exhausted
    has_p = [p.top_p < 1.0 for p in params]
    if any(has_p):
        mass = torch.zeros_like(vals)
        with_k = [j for j in range(n) if has_p[j] and has_k[j]]
        if with_k:
            sel = torch.tensor(with_k, device=device)
            v = vals[sel]
            mass[sel] = v.masked_fill(v < kth[sel].unsqueeze(1), _NEG_INF).softmax(dim=-1)
        without_k = [j for j in range(n) if has_p[j] and not has_k[j]]
        if without_k:
            sel = torch.tensor(without_k, device=device)
            mass[sel] = whole_probs[torch.tensor([whole_rows[j] for j in without_k], device=device)].gather(
                1, idx[sel])
        top_p = torch.tensor([p.top_p for p in params], device=device)
        # As filter_logits always did: keep a sorted position while the mass before it is below top_p.
        kept = ((mass.cumsum(dim=-1) - mass) < top_p.unsqueeze(1)).sum(dim=-1)
        cut_p = vals.gather(1, (kept - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        known = (kept < k_list) | exhausted  # else the nucleus may reach past the list
        cut_p = torch.where(known, cut_p, torch.full_like(cut_p, _NEG_INF))
        thr = torch.where(torch.tensor(has_p, device=device), torch.maximum(thr, cut_p), thr)
    if any(p.min_p > 0 for p in params):
        log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else _NEG_INF for p in params], device=device)
        thr = torch.maximum(thr, vals[:, 0] + log_min_p)
    # Final once every token at or above the cut is in the list (ties included).
    done &= (last < thr) | exhausted
    return thr, done


# --- logprobs -------------------------------------------------------------------------------------

def _logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(params)
    by_k: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if p.logprobs is not None:
            by_k[p.logprobs].append(i)
    for k, rows in by_k.items():  # grouped by k so no row's topk call depends on another row's k
        for i, lp in zip(rows, token_logprobs(_take(logits, rows), _take(tokens, rows), k), strict=True):
            out[i] = lp
    return out


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """`TokenLogprobs` of `token_ids [R]` under the rows of `logits [R, V]` (raw: log-softmax of
    the logits as they are), each with the `k` most likely tokens."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = token_ids.to(device=lp.device, dtype=torch.long).unsqueeze(1)
    chosen_lp = lp.gather(1, chosen)
    # vLLM's rank: ties count as ahead. (An int32 sum of the bools is ~4x faster than the default int64.)
    ranks = (lp >= chosen_lp).sum(dim=-1, dtype=torch.int32).tolist()
    chosen_list, chosen_lp_list = chosen.squeeze(1).tolist(), chosen_lp.squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen_list]
    if k > 0:
        v, ix = lp.topk(min(k, lp.shape[1]), dim=-1)
        tops = [list(zip(ids, vs, strict=True)) for ids, vs in zip(ix.tolist(), v.tolist(), strict=True)]
    return [TokenLogprobs(t, c, r, top) for t, c, r, top in zip(chosen_list, chosen_lp_list, ranks, tops, strict=True)]

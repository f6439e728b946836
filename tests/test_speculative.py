"""Speculative decoding (n-gram drafts): the proposer, the config, the scheduler's drafts, and the
engine's verification, whose output must be plain decoding's (the same tokens when greedy, the
same distribution when sampling) in fewer steps."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import STORIES, make_hf_model, requires_stories, save_hf_model

from lengthwise import LLM, SamplingParams
from lengthwise.config import EngineConfig, SpeculativeConfig
from lengthwise.engine.llm import run_to_completion
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model import load_model
from lengthwise.sched import Scheduler, make_policy
from lengthwise.sched.draft import NgramProposer
from lengthwise.sequence import Request

# Fixed draft lengths: verification is tested on every draft the lookup finds (the adaptive
# planner, tested in test_draft_length.py, would cut drafts by measured step times).
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "adaptive": False}
# Prompts with repeats for the lookup to find; a random model's greedy text also falls into loops.
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], list(range(10, 30)) * 2, [9, 9, 9, 9], [40, 41, 42]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache: dict[str, object] = {}

    def build(family: str):
        if family not in cache:
            cache[family] = save_hf_model(make_hf_model(family), tmp_path_factory.mktemp(f"spec-{family}"))
        return cache[family]

    return build


def _engine(model_dir, spec=None, **overrides) -> LLMEngine:
    config = dict(block_size=4, max_num_seqs=8, speculative_config=spec)
    config.update(overrides)
    return LLMEngine(load_model(model_dir, "float32", "cpu"), None, EngineConfig(**config))


# -- the proposer ----------------------------------------------------------------------------------

def _seq(prompt: list[int], output: list[int]):
    request = Request("r", list(prompt), SamplingParams(max_tokens=100), 0.0, 100)
    request.seqs[0].output_ids.extend(output)
    return request.seqs[0]


def _reference_draft(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The proposer's rule by brute force: longest suffix n-gram with an earlier occurrence, the
    latest such occurrence, and its continuation (running on into the draft past the end)."""
    n_tokens = len(tokens)
    for n in range(min(hi, n_tokens - 1), lo - 1, -1):
        suffix = tokens[n_tokens - n:]
        starts = [i for i in range(n_tokens - n) if tokens[i:i + n] == suffix]
        if starts:
            ext = list(tokens)
            for j in range(k):
                ext.append(ext[starts[-1] + n + j])
            return ext[n_tokens:]
    return []


def test_ngram_proposer_matches_brute_force_as_the_sequence_grows():
    rng = random.Random(0)
    for trial in range(30):
        lo, hi = rng.choice([(1, 1), (1, 3), (2, 4), (3, 3)])
        proposer = NgramProposer(num_tokens=5, min_n=lo, max_n=hi)
        prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
        seq = _seq(prompt, [])
        for _ in range(40):  # indexed incrementally, one to three tokens at a time
            k = rng.randrange(1, 6)
            tokens = seq.request.prompt_ids + seq.output_ids
            assert proposer.propose(seq, k) == _reference_draft(tokens, k, lo, hi), (trial, tokens)
            seq.output_ids.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))


def test_ngram_proposer_prefers_the_longest_match_and_its_latest_occurrence():
    proposer = NgramProposer(num_tokens=3, min_n=1, max_n=3)
    # "2 3" occurs twice before the end, followed by 9 then by 4; "1 2 3" only before the 9.
    seq = _seq([1, 2, 3, 9, 8, 7, 2, 3, 4, 5, 6], [1, 2, 3])
    assert proposer.propose(seq, 3) == [9, 8, 7]
    assert proposer.propose(seq, 2) == [9, 8]
    other = _seq([2, 3, 9, 0, 2, 3, 4, 5, 6], [7, 3])  # only a 1-gram matches: the latest "3"
    assert proposer.propose(other, 3) == [4, 5, 6]
    assert NgramProposer(3, 2, 3).propose(other, 3) == []  # no match of two tokens or more
    loop = _seq([7, 1, 2, 1, 2], [1, 2])  # a period-2 loop continues past the end of the sequence
    assert proposer.propose(loop, 3) == [1, 2, 1]


def test_ngram_proposer_forgets_and_rebuilds_after_outputs_are_discarded():
    proposer = NgramProposer(num_tokens=2, min_n=1, max_n=2)
    seq = _seq([1, 2, 3], [4, 1])
    assert proposer.propose(seq, 2) == [2, 3]
    seq.output_ids[:] = [5]  # an FCR restart's new first token: a shorter sequence is reindexed
    assert proposer.propose(seq, 2) == []
    seq.output_ids[:] = [4, 1]
    assert proposer.propose(seq, 2) == [2, 3]
    seq.output_ids[:] = [7, 4]  # the same length: the scheduler's `forget` is what drops the index
    proposer.forget(seq)
    assert proposer.propose(seq, 2) == []  # "4" was never followed by anything in 1 2 3 7 4


# -- configuration ---------------------------------------------------------------------------------

def test_speculative_config_validation_names_the_field():
    cfg = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert cfg.speculative_config == SpeculativeConfig("ngram", 3, 4, 2)
    assert SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=3).prompt_lookup_min == 3
    assert SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1).prompt_lookup_max == 1
    bad = [({"method": "eagle", "num_speculative_tokens": 3}, "method"),
           ({"method": "ngram"}, "num_speculative_tokens"),
           ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
           ({"num_speculative_tokens": 16}, "num_speculative_tokens"),
           ({"num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3}, "prompt_lookup_min"),
           ({"num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max"),
           ({"num_speculative_tokens": 2, "model": "x"}, "unknown keys"),
           ({"num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
           ({"num_speculative_tokens": 2, "adaptive": "yes"}, "adaptive"),
           ("ngram", "must be a dict")]
    for value, field_name in bad:
        with pytest.raises(ValueError, match=field_name):
            EngineConfig(speculative_config=value)


def test_a_padding_policy_is_refused_with_speculation(checkpoints):
    with pytest.raises(ValueError, match="speculative_config.*padding"):
        _engine(checkpoints("llama"), NGRAM, policy="static", policy_options={"batch_size": 4, "pad": True})


# -- the scheduler ---------------------------------------------------------------------------------

class _FixedDraft:
    def __init__(self, draft: list[int]) -> None:
        self.draft, self.asked = draft, []

    def propose(self, seq, max_tokens):
        self.asked.append(max_tokens)
        return self.draft[:max_tokens]

    def forget(self, seq):
        pass


def _decode_once(scheduler: Scheduler, request: Request) -> None:
    """Prefill `request` and give it a first token, so the next plan decodes it."""
    scheduler.add(request)
    out = scheduler.schedule()
    assert out.chunks[0].seq is None and out.chunks[0].sample
    request.seqs[0].output_ids.append(3)


def test_scheduler_drafts_within_the_budget_and_the_token_limit_and_counts_kept_tokens():
    proposer = _FixedDraft([7, 7, 7, 7, 7])
    sched = Scheduler(make_policy("fcfs"), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                      proposer=proposer)
    request = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), 0.0, 4)
    _decode_once(sched, request)
    (chunk,) = sched.schedule().chunks
    # 1 generated + 2 drafted + 1 sampled after them = max_tokens: the draft stops there.
    assert chunk.draft == [7, 7] and chunk.num_tokens == 3 and proposer.asked == [2]
    seq = request.seqs[0]
    assert seq.num_computed == 1 and len(sched.kv.response_segment(seq.seq_id).blocks) == 1
    seq.output_ids.extend([7, 5])  # the engine kept one draft token, then sampled 5
    sched.accept_draft(seq, 1, 1)
    assert seq.num_computed == 2  # the next step feeds only the new token
    (chunk,) = sched.schedule().chunks
    assert (chunk.start, chunk.end, chunk.draft) == (2, 3, [])  # one token left: nothing to draft

    tight = Scheduler(make_policy("fcfs"), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=3,
                      proposer=_FixedDraft([7, 7, 7, 7]))
    request = Request("b", [1, 2], SamplingParams(max_tokens=50), 0.0, 50)
    _decode_once(tight, request)
    assert tight.schedule().chunks[0].draft == [7, 7]  # the budget of 3 tokens: input + 2 drafted


def test_drafts_take_only_the_budget_the_step_leaves_unused():
    """Every running row decodes and a waiting prompt is admitted before any row drafts."""
    sched = Scheduler(make_policy("fcfs"), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=3,
                      proposer=_FixedDraft([7, 7, 7]))
    a = Request("a", [1, 2], SamplingParams(max_tokens=20), 0.0, 20)
    b = Request("b", [1, 2], SamplingParams(max_tokens=20), 0.0, 20)
    for r in (a, b):
        sched.add(r)
    sched.schedule()  # both prompts (2 + 1 of the budget 3; b's last token next step)
    a.seqs[0].output_ids.append(3)
    out = sched.schedule()  # a decodes, b finishes its prompt: 2 tokens, 1 left for a's draft
    assert [(c.seq is None, c.draft) for c in out.chunks] == [(False, [7]), (True, [])]
    b.seqs[0].output_ids.append(3)
    a.seqs[0].output_ids.extend([7, 4])
    sched.accept_draft(a.seqs[0], 1, 1)
    out = sched.schedule()
    assert [c.draft for c in out.chunks] == [[7], []] and out.num_tokens == 3  # both decode; one token drafted


def test_drafts_keep_a_step_on_the_fused_path_it_fits(checkpoints):
    """A step that fits the CPU's fused decode (256 tokens) is not pushed off it by drafts."""
    engine = _engine(checkpoints("llama"), NGRAM)
    assert engine.scheduler.draft_step_tokens == 256
    sched = Scheduler(make_policy("fcfs"), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                      proposer=_FixedDraft([7] * 8), draft_step_tokens=3)
    a = Request("a", [1, 2], SamplingParams(max_tokens=20), 0.0, 20)
    _decode_once(sched, a)
    assert sched.schedule().chunks[0].draft == [7, 7]


def test_no_drafts_in_steps_of_more_running_sequences_than_disable_by_batch_size():
    sched = Scheduler(make_policy("fcfs"), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                      proposer=_FixedDraft([7, 7]), draft_max_batch=1)
    a = Request("a", [1, 2], SamplingParams(max_tokens=20), 0.0, 20)
    _decode_once(sched, a)
    assert sched.schedule().chunks[0].draft == [7, 7]  # one running sequence: drafted
    a.seqs[0].output_ids.append(4)
    b = Request("b", [1, 2, 3], SamplingParams(max_tokens=20), 0.0, 20)
    sched.add(b)
    out = sched.schedule()  # a decodes (1 running sequence when the step began), b is admitted
    assert [c.draft for c in out.chunks] == [[7, 7], []]
    a.seqs[0].output_ids.append(4)
    b.seqs[0].output_ids.append(4)
    assert [c.draft for c in sched.schedule().chunks] == [[], []]  # two running: plain decoding


def test_drafts_take_no_blocks_other_running_rows_may_need_and_none_for_structured_requests():
    sched = Scheduler(make_policy("fcfs"), num_blocks=4, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                      proposer=_FixedDraft([7] * 8))
    request = Request("a", [1, 2, 3], SamplingParams(max_tokens=12), 0.0, 12)
    _decode_once(sched, request)
    # Prompt 1 block + response 1 block held; 2 free blocks are the watermark's (1) and the running
    # row's (1): the draft is cut to what fits the block the row holds (slots 1-3).
    (chunk,) = sched.schedule().chunks
    assert chunk.draft == [7, 7, 7] and sched.kv.num_free_blocks == 2
    from lengthwise.sampling_params import StructuredOutputsParams

    guided = Request("g", [1, 2], SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"])), 0.0, 8)
    free = Scheduler(make_policy("fcfs"), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                     proposer=_FixedDraft([7] * 8))
    _decode_once(free, guided)
    assert free.schedule().chunks[0].draft == []


# -- the engine: the same output as plain decoding ---------------------------------------------------

def _params(**kw) -> list[SamplingParams]:
    base = dict(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
    return [SamplingParams(**dict(base, **kw)) for _ in PROMPTS]


CASES = {
    "greedy": dict(),
    "penalties": dict(repetition_penalty=1.05, frequency_penalty=0.05, presence_penalty=0.05),
    "top-k 1 sampled": dict(temperature=0.7, top_k=1, seed=3, logprobs=None),
    # a seeded sample draws once per kept token (its generator rewound): plain decoding's tokens
    "seeded sampling": dict(temperature=0.3, top_p=0.95, seed=11),
    "eos and min_tokens": dict(ignore_eos=False, min_tokens=6, max_tokens=30),
    "n=2 and lengths": dict(n=2, max_tokens=17),
}


@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused-cpu", "op-by-op"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
def test_speculative_decoding_gives_plain_decodings_tokens(checkpoints, monkeypatch, family, case, fused):
    monkeypatch.setenv("LENGTHWISE_CPU_FUSED", fused)
    model_dir = checkpoints(family)
    params = _params(**CASES[case])
    if case == "eos and min_tokens":  # make token 2 (eos) likely: it is the loop's token in prompt 0
        params[0] = SamplingParams(**dict(dict(max_tokens=30, temperature=0.0, logprobs=2, min_tokens=3)))
    plain = _engine(model_dir)
    want = run_to_completion(plain, PROMPTS, params)
    spec = _engine(model_dir, NGRAM)
    got = run_to_completion(spec, PROMPTS, params)
    for g, w in zip(got, want, strict=True):
        for gs, ws in zip(g.outputs, w.outputs, strict=True):
            assert gs.token_ids == ws.token_ids and gs.finish_reason == ws.finish_reason
            for a, b in zip(gs.logprobs or [], ws.logprobs or [], strict=True):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
    st = spec.stats
    # Drafts were kept and refused both (so both paths ran), in fewer steps than plain decoding.
    assert 0 < st.accepted_tokens < st.draft_tokens, (st.accepted_tokens, st.draft_tokens)
    assert st.row_steps < plain.stats.row_steps  # rows x steps: a sample that kept drafts ended sooner


def test_min_tokens_bans_stop_tokens_only_at_draft_positions_short_of_it(checkpoints):
    """Position j of a drafted row has generated len(output) + j tokens: stop tokens are banned
    there only while that is below min_tokens."""
    engine = _engine(checkpoints("llama"))
    request = Request("r", [1, 2], SamplingParams(min_tokens=3, stop_token_ids=[5], max_tokens=9), 0.0, 9)
    seq = request.seqs[0]
    seq.output_ids.append(7)
    plain = Request("p", [1], SamplingParams(min_tokens=3, stop_token_ids=[5], max_tokens=9), 0.0, 9).seqs[0]
    stops = frozenset({5, 2})  # its stop token and the model's end token
    banned = engine._banned_rows([plain, seq, seq, seq, seq], [(1, seq, [8, 8, 8])])
    assert banned == [stops, stops, stops, frozenset(), frozenset()]


def test_speculation_survives_preemption_and_stops_within_a_draft(random_model):
    """A cache too small for every request at once (preemptions, recomputation) and stop strings
    and stop tokens that end a sample in the middle of a kept draft: same texts as plain decoding."""
    prompts = ["the cat and the dog and the cat and the dog and the", "one two three one two three one two",
               "a b a b a b a b a b"] * 2
    params = [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, stop=[" dog and"] if i == 0 else [],
                             stop_token_ids=[5] if i == 1 else [], seed=i) for i in range(len(prompts))]
    outs, engines = [], []
    for spec in (None, NGRAM):
        llm = LLM(random_model, dtype="float32", kv_cache_memory=40 * 16384, block_size=4, max_model_len=64,
                  speculative_config=spec)  # 40 blocks of 4 tokens: two or three of the requests at once
        outs.append(llm.generate(prompts, params, use_tqdm=False))
        engines.append(llm.engine)
    for g, w in zip(*outs, strict=True):
        assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in g.outputs] == \
               [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in w.outputs]
    assert engines[1].scheduler.num_preemptions > 0 and engines[1].stats.accepted_tokens > 0


def test_sampled_tokens_keep_plain_decodings_distribution(checkpoints):
    """With sampling, verification keeps a drafted token exactly when the sample at its position
    drew it; the sample after the draft's first disagreement is the token kept there. So every
    kept token has the model's own probability given the tokens before it: the empirical joint
    distribution of four sampled tokens (top-k 2: 16 outcomes) matches the model's exact one."""
    from transformers import AutoModelForCausalLM

    model_dir = checkpoints("llama")
    # A prompt that ends in the model's own greedy text, which has fallen into a loop of period 3:
    # the lookup drafts the loop, which the samples (top-1 of 2) follow often but not always.
    start = list(range(10, 30)) * 2
    greedy = run_to_completion(_engine(model_dir), [start], [SamplingParams(max_tokens=60, temperature=0.0,
                                                                           ignore_eos=True)])
    prompt = start + greedy[0].outputs[0].token_ids
    engine = _engine(model_dir, {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3,
                                 "prompt_lookup_min": 1, "adaptive": False}, max_num_seqs=256, kv_cache_memory=64 << 20)
    counts: dict[tuple[int, ...], int] = {}
    for r in range(16):
        out = run_to_completion(engine, [prompt], [SamplingParams(n=200, max_tokens=4, temperature=1.3, top_k=2,
                                                                  ignore_eos=True, seed=1000 * r)])[0]
        for o in out.outputs:
            counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    st = engine.stats
    assert 0.2 * st.draft_tokens < st.accepted_tokens < 0.9 * st.draft_tokens, (st.accepted_tokens, st.draft_tokens)

    # The exact distribution: the product of each position's top-2 softmax given the tokens before.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(4):
        nxt = {}
        for prefix, p in probs.items():
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + list(prefix)])).logits[0, -1] / 1.3
            top = logits.topk(2)
            for t, q in zip(top.indices.tolist(), top.values.softmax(-1).tolist(), strict=True):
                nxt[prefix + (t,)] = p * q
        probs = nxt
    total = sum(counts.values())
    assert set(counts) <= set(probs)
    # Pearson's chi-square, outcomes expected fewer than 5 times pooled into one cell.
    cells: list[tuple[float, float]] = []
    rare = [0.0, 0.0]
    for k, p in probs.items():
        if total * p < 5:
            rare[0] += counts.get(k, 0)
            rare[1] += total * p
        else:
            cells.append((counts.get(k, 0), total * p))
    if rare[1] > 0:
        cells.append((rare[0], rare[1]))
    chi2 = sum((seen - want) ** 2 / want for seen, want in cells)
    assert len(cells) >= 6 and chi2 < 40.0, (chi2, cells)  # <= 15 degrees of freedom: p < 0.0005 by chance


@requires_stories
def test_stories260k_greedy_stories_are_unchanged_in_fewer_steps():
    prompts = ["Once upon a time, there was a little girl named Lily.", "Tom and his dog went to the park."]
    sp = SamplingParams(temperature=0.0, max_tokens=120)
    runs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4}):
        llm = LLM(STORIES, dtype="float32", speculative_config=spec)
        runs.append(([o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)], llm.engine.stats))
    (plain, plain_stats), (spec_out, stats) = runs
    assert spec_out == plain
    assert stats.acceptance_rate > 0.3 and stats.row_steps < 0.9 * plain_stats.row_steps

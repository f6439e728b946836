"""Decode steps through `DecodeGraphs`: bucket sizes, padding rows, the eager fallback.

On a GPU the engine captures real CUDA graphs (`tests/test_ops_triton.py` runs the same check
through the Triton kernels, compiled there and interpreted here); on the CPU the same static
buffers run eagerly through the torch reference kernels, which checks everything but the capture.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_generations, graphed_and_plain_decode, step_to_completion

from lengthwise.config import EngineConfig
from lengthwise.engine.cuda_graph import DecodeRows, graph_batch_sizes
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model.config import ModelConfig
from lengthwise.model.llama import CausalLM
from lengthwise.ops.dispatch import KERNELS_ENV


def _model() -> CausalLM:
    config = ModelConfig(model_type="llama", vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
    model = CausalLM(config, torch.float32, "cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
    return model


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]
    with pytest.raises(ValueError, match="max_batch"):
        graph_batch_sizes(0)


@pytest.mark.parametrize("kernels", ["torch", "auto"])  # the reference, and the CPU C++ attention kernel
def test_graphed_decode_matches_plain_steps(monkeypatch, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    got, want, calls = graphed_and_plain_decode(_model(), monkeypatch, graph_batch=4)
    assert sorted(set(calls)) == [1, 2, 3, 4]  # every bucket, and 3 rows padded to 4
    assert_same_generations(got, want, logprob_tol=1e-4)


def test_graphs_only_on_cuda_and_not_when_eager():
    model = _model()
    assert LLMEngine(model, None, EngineConfig(block_size=4))._graph_batch() == 0  # CPU
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")


def test_graph_rejects_an_empty_or_oversized_step(monkeypatch):
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 2)
    engine = LLMEngine(_model(), None, EngineConfig(block_size=4, max_num_seqs=4))
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2]
    assert engine.runner.cache.num_blocks == engine.num_blocks + 1  # the padding rows' scratch block
    row = ([1], [0], [0], [[0]], [1], [[]], [0])
    with pytest.raises(ValueError, match="1 to 2 rows"):
        graphs.run(DecodeRows(*([] for _ in row)))
    with pytest.raises(ValueError, match="1 to 2 rows"):
        graphs.run(DecodeRows(*(x * 3 for x in row)))


def test_a_step_launched_ahead_is_used_only_for_its_rows_in_its_bucket(monkeypatch):
    """`run` takes the launched step's outputs for the same rows, or an in-order subset of them in
    the same bucket (gathered); another bucket, other positions, a changed order or another table
    list (a segment freed and made again, even with the same blocks) rerun."""
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 4)
    graphs = LLMEngine(_model(), None, EngineConfig(block_size=4, max_num_seqs=4)).runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4]
    # Each sequence's segments, as the block manager holds them: rows carry these very lists.
    tables = {i: ([i], [10 + i]) for i in range(4)}

    def rows(picks, pos=5):  # rows of sequences `picks` (own prompt and response blocks) at `pos`
        r = DecodeRows([], [], [], [], [], [], [])
        for i in picks:
            r.token_ids.append(7 + i)
            r.positions.append(pos)
            r.slots.append((10 + i) * 4 + 1)
            r.prompt_tables.append(tables[i][0])
            r.prompt_lens.append(4)
            r.response_tables.append(tables[i][1])
            r.response_lens.append(pos - 3)
        return r

    tokens = torch.tensor([7, 8, 9, 10])
    cases = [([0, 1, 2], [0, 1, 2], True), ([0, 1, 2, 3], [0, 2, 3], True),  # same bucket (4): used, gathered
             ([0, 1], [1], False),                                       # bucket 2 -> 1: rerun
             ([0, 1, 2], [2, 0], False)]                                 # order changed: rerun
    for launched, now, used in cases:
        plain = graphs.run(rows(now))[1].clone()
        graphs.prelaunch(rows(launched), tokens[:len(launched)])
        before = graphs.used_ahead
        logits = graphs.run(rows(now))[1]
        assert (graphs.used_ahead - before == 1) == used, (launched, now)
        torch.testing.assert_close(logits, plain, rtol=0, atol=0)  # the same bits either way
    graphs.prelaunch(rows([0, 1]), tokens[:2])
    graphs.run(rows([0, 1], pos=6))  # other positions: rerun
    assert graphs.used_ahead == 2 and graphs.used_ahead_in_part == 1
    graphs.prelaunch(rows([0, 1]), tokens[:2])
    tables[1] = ([1], [11])  # sequence 1's segments made again: equal blocks, other lists
    graphs.run(rows([0, 1]))
    assert graphs.used_ahead == 2


def test_graph_inputs_hold_every_rows_tables_as_they_grow_shift_and_change(monkeypatch):
    """The staging buffers rewrite only the blocks a row's tables gained since they last held it;
    rows that moved, lists made anew (same length, other blocks), another bucket's layout and the
    two staging sets taking turns must still leave every real row's tables, up to their length,
    in the graph's input buffers, and the padding rows' first prompt block the scratch block."""
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 4)
    graphs = LLMEngine(_model(), None, EngineConfig(block_size=4, max_num_seqs=4)).runner.graphs
    assert graphs is not None
    seqs = {i: ([20 + i], [30 + i]) for i in range(4)}  # prompt and response tables, as the manager holds them

    def fill(picks):
        r = DecodeRows([], [], [], [], [], [], [])
        for i in picks:
            p, t = seqs[i]
            r.token_ids.append(1)
            r.positions.append(4 * len(p) + 4 * len(t) - 1)
            r.slots.append(t[-1] * 4 + 3)
            r.prompt_tables.append(p)
            r.prompt_lens.append(4 * len(p))
            r.response_tables.append(t)
            r.response_lens.append(4 * len(t))
        size = graphs.bucket(len(picks))
        graphs._fill(r, size)
        b = graphs._buckets[size]
        for row, i in enumerate(picks):
            assert b.prompt_tables[row, :len(seqs[i][0])].tolist() == seqs[i][0], (picks, row)
            assert b.response_tables[row, :len(seqs[i][1])].tolist() == seqs[i][1], (picks, row)
        assert b.prompt_tables[len(picks):, 0].tolist() == [graphs.scratch_block] * (size - len(picks))

    for step in range(3):  # both staging sets, then one again: tables grow a block each time
        fill([0, 1, 2])
        for i in range(3):
            seqs[i][1].append(40 + 10 * step + i)
    fill([0, 1])                      # bucket 2: the same rows in place, in another layout
    fill([0, 1])
    fill([1, 2])                      # row 0 left: the others moved up
    fill([0, 1, 2])                   # back in bucket 4, where this staging set last wrote other rows
    seqs[1] = ([21], [50, 51, 52, 53])  # sequence 1's segments made anew: same lengths, other blocks
    fill([0, 1, 2, 3])
    fill([0, 1, 2, 3])
    fill([0, 1, 2])                   # row 3 padding in both staging sets, then back
    fill([0, 1, 2])
    fill([0, 1, 2, 3])
    fill([0, 1, 2, 3])
    fill([3])


def _async_run(monkeypatch, async_decode: bool, prompts, params, events=None, max_num_seqs: int = 8, **config):
    """Run `prompts` through an engine whose decode steps of up to 8 rows go through `DecodeGraphs`
    (eager here), launching steps ahead or not, with `step_to_completion`'s `events`.
    Returns ({request_id: token ids of each sample}, the graphs, steps taken)."""
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 8)
    engine = LLMEngine(_model(), None, EngineConfig(block_size=4, max_num_seqs=max_num_seqs,
                                                    async_decode=async_decode, **config))
    outs, steps = step_to_completion(engine, prompts, params, events)
    return outs, engine.runner.graphs, steps


def test_steps_launched_ahead_change_nothing(monkeypatch):
    """Async decode (the next graphed step launched on the device's tokens before the host reads
    them) gives the tokens of synchronous steps, through a stop token, samples drawn from seeded
    generators, n=2, rows reaching their limits, block boundaries (block_size 4), a batch shrinking
    through the buckets, an abort and a request arriving mid-way. A step launched ahead is used
    when the next step's rows are its rows or some of them in the same bucket (rows that stopped
    or were aborted drop out)."""
    from lengthwise import SamplingParams

    prompts = [[5, 17, 9, 3, 50], list(range(10, 40)), [7], [1, 2, 3], [8, 8, 8, 9]]
    greedy = dict(temperature=0.0, ignore_eos=True)
    plain, _, _ = _async_run(monkeypatch, False, prompts[:1], [SamplingParams(max_tokens=30, **greedy)])
    stop = plain["0"][0][6]  # a token request 0 generates at index 6 (or before): its stop token below
    params = [SamplingParams(max_tokens=30, stop_token_ids=[stop], **greedy),
              SamplingParams(max_tokens=17, temperature=0.9, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=9, **greedy),
              SamplingParams(max_tokens=22, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=13, n=2, temperature=1.0, seed=7, ignore_eos=True)]
    late = SamplingParams(max_tokens=6, **greedy)

    def arrive(engine):
        assert engine.runner.graphs._ahead is not None or not engine.config.async_decode  # one is in flight
        engine.add_request([3, 3, 4], late, request_id="late")

    cases = {"stop": {}, "abort": {6: lambda e: e.abort_request("3")}, "arrival": {11: arrive}}
    for name, events in cases.items():
        want, sync_graphs, _ = _async_run(monkeypatch, False, prompts, params, events)
        got, graphs, steps = _async_run(monkeypatch, True, prompts, params, events)
        assert got == want, name
        assert sync_graphs.launched_ahead == 0
        assert len(got["0"][0]) <= 7 and got["0"][0][-1] == stop
        assert graphs.used_ahead >= steps // 2, name
        # Rerun: the arrival's step (a prefill comes first), and a step whose rows moved to a
        # smaller bucket (another bucket's kernels would not give the same bits).
        assert (name == "arrival") <= graphs.launched_ahead - graphs.used_ahead <= 2, name
        if name == "stop":  # request 0 stopped with 5 rows left in the bucket of 8: the rest used
            assert graphs.used_ahead_in_part >= 1


def test_rows_at_their_token_limit_launch_ahead_unless_it_would_be_wasted(monkeypatch):
    """A row whose next token is its last does not hold the others back: the step after it is
    launched, the ended row gathered out, when the rows left stay in the bucket and nothing waits
    for the room it frees. Launched only when it gets used; the tokens of synchronous steps."""
    from lengthwise import SamplingParams

    prompts = [[5, 17, 9], [30, 2], [7, 7], [1, 2, 3, 4], [6, 1]]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (6, 9, 12, 20, 20)]
    want, _, _ = _async_run(monkeypatch, False, prompts, params)
    got, graphs, steps = _async_run(monkeypatch, True, prompts, params)
    assert got == want
    # Every step launched the next but the prefill and three ends into smaller buckets (1, 2, 4, 8):
    # 5 -> 4 rows, 3 -> 2 and 2 -> 0. The end 4 -> 3 stays in bucket 4: launched, gathered out.
    assert graphs.launched_ahead == graphs.used_ahead == steps - 4
    assert graphs.used_ahead_in_part == 1
    # Two rows at a time with the rest waiting: an end admits the next request, so nothing is
    # launched ahead of a step in which a row takes its last token.
    want, _, _ = _async_run(monkeypatch, False, prompts, params, max_num_seqs=2)
    got, graphs, steps = _async_run(monkeypatch, True, prompts, params, max_num_seqs=2)
    assert got == want and graphs.launched_ahead == graphs.used_ahead > 0
    assert graphs.used_ahead_in_part == 0


def test_rows_launched_past_their_end_take_no_block_from_the_prefix_cache(monkeypatch):
    """A static batch's rows end at their limits while the next batch waits (a batch policy: their
    ends admit no one, so the step after is launched). The ended rows take no block for the
    token they will never have: a block taken for them could be a cached prompt block of the next
    batch, which would then find less of its prompts cached than in synchronous steps, and
    compute other bits. Prompts sharing prefixes, 2-token blocks, a pool that evicts."""
    from lengthwise import SamplingParams

    a = [26, 34, 33, 10, 40, 12, 2, 0, 19, 67, 37, 38, 47, 79, 74, 3, 40, 63, 13, 31, 63, 69, 47, 65, 6]
    b = [50, 69, 53, 47, 46, 68, 51, 47, 3, 70, 49, 28, 79, 6, 49, 30, 21, 67, 72]
    prompts = [a + [1, 64], a[:17], b[:14], a[:19] + [0], b + [16], a[:16], a[:20] + [18, 12], b + [1, 64],
               a + [57, 70, 59], b + [1, 18, 57, 79, 43, 55], a[:16] + [37], a[:20]]
    limits = [(2, None), (12, None), (2, None), (10, None), (9, None), (5, None), (3, 1), (7, 1), (5, 1), (10, 1),
              (7, 1), (5, 1)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=lp) for m, lp in limits]
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 8)
    results = {}
    for flag in (False, True):
        engine = LLMEngine(_model(), None, EngineConfig(
            block_size=2, max_num_seqs=8, max_model_len=48, kv_cache_memory=24576, async_decode=flag,
            policy="static", policy_options={"batch_size": 6}, max_num_batched_tokens=64))
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(p, sp, request_id=str(i))
        while engine.has_unfinished_requests():
            engine.step()
        outs = [engine.pop_finished(str(i)) for i in range(len(prompts))]
        results[flag] = [(o.num_cached_tokens, o.outputs[0].token_ids, [x.logprob for x in o.outputs[0].logprobs or []])
                         for o in outs]
        if flag:
            assert engine.runner.graphs.used_ahead == engine.runner.graphs.launched_ahead > 0
    assert sum(cached for cached, _, _ in results[False]) > 0  # the second batch found prefixes cached
    assert results[True] == results[False]


def test_no_step_is_launched_ahead_while_a_stop_would_admit(monkeypatch):
    """With requests waiting, a row that stops on a stop token frees room and the next step admits
    (a prefill): steps are launched ahead only once nothing waits, so none is wasted."""
    from lengthwise import SamplingParams

    prompts = [[5, 17, 9], [30, 2], [7, 7], [1, 2, 3, 4]]
    free = SamplingParams(max_tokens=12, temperature=0.0)
    plain, _, _ = _async_run(monkeypatch, False, prompts, [free] * 4, max_num_seqs=2)
    params = [SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[plain["0"][0][3]])] + [free] * 3
    want, _, _ = _async_run(monkeypatch, False, prompts, params, max_num_seqs=2)
    got, graphs, steps = _async_run(monkeypatch, True, prompts, params, max_num_seqs=2)
    assert got == want and len(got["0"][0]) <= 4
    assert 0 < graphs.used_ahead == graphs.launched_ahead < steps // 2


def test_batch_policies_launch_ahead_while_later_batches_wait(monkeypatch):
    """Static batches: the waiting requests join only when the batch ends, so rows that may stop
    are launched ahead mid-batch (not when one member is left); the same tokens as synchronous."""
    from lengthwise import SamplingParams

    prompts = [[5, 17, 9], [30, 2], [7, 7], [1, 2, 3, 4], [6], [9, 9, 9]]
    free = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.0) for i in range(6)]
    plain, _, _ = _async_run(monkeypatch, False, prompts, free)
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.0, stop_token_ids=[plain[str(i)][0][4]])
              for i in range(6)]
    opts = dict(policy="static", policy_options={"batch_size": 3})
    want, _, _ = _async_run(monkeypatch, False, prompts, params, **opts)
    got, graphs, steps = _async_run(monkeypatch, True, prompts, params, **opts)
    assert got == want
    assert graphs.used_ahead >= 1 and graphs.launched_ahead - graphs.used_ahead <= 4


@pytest.mark.parametrize("fcr", ["recompute", "continue"])
def test_async_decode_keeps_fcr_scheduling(monkeypatch, fcr):
    """Sequence scheduling with failure collection: rows collected at their batch's cap (no step is
    launched past it) and their reruns; the same tokens, collections and batch rows as synchronous."""
    from lengthwise import SamplingParams
    from lengthwise.predict import ConstantPredictor

    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 8)
    const = ConstantPredictor(5.0, edges=[0.0, 12.0], probs=[1.0])
    prompts = [[5 + i, 17, 9][: 1 + i % 3] for i in range(6)]
    params = [SamplingParams(max_tokens=4 + 3 * (i % 4), temperature=0.0, ignore_eos=True) for i in range(6)]
    results = {}
    for flag in (False, True):
        engine = LLMEngine(_model(), None, EngineConfig(
            block_size=4, max_num_seqs=8, async_decode=flag, policy="sequence", length_predictor=const,
            policy_options={"bucket": 6, "fcr": fcr, "vbs": False, "vbs_fixed": 4}))
        outs, steps = step_to_completion(engine, prompts, params)
        g = engine.runner.graphs
        results[flag] = (outs, steps, engine.scheduler.num_collected, engine.stats.row_steps, g.launched_ahead,
                         g.used_ahead)
    assert results[True][:4] == results[False][:4]
    assert results[True][2] > 0  # some rows were collected
    assert 0 < results[True][5] == results[True][4]


def test_no_step_is_launched_ahead_of_logprobs(monkeypatch):
    """Rows that ask for logprobs read the step's logits after the tokens: nothing may overtake them."""
    from lengthwise import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    _, graphs, _ = _async_run(monkeypatch, True, [[5, 17, 9], [4]], [params, params])
    assert graphs.launched_ahead == 0
    with pytest.raises(ValueError, match="async_decode"):
        EngineConfig(async_decode=1)

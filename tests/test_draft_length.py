"""Adaptive draft lengths (sched/draft_length.py): the step cost fit, the per-sequence acceptance
estimate, the break-even rule, and the scheduler and engine using them. Step costs are injected
(no timing), so every case is deterministic."""

from __future__ import annotations

import math
import random

import pytest
from conftest import make_hf_model, save_hf_model

from lengthwise import SamplingParams
from lengthwise.config import EngineConfig
from lengthwise.engine.llm import run_to_completion
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model import load_model
from lengthwise.sched import Scheduler, make_policy
from lengthwise.sched.draft_length import DraftLengthPlanner, StepCostModel
from lengthwise.sequence import Request


def _seq(name: str = "r"):
    return Request(name, [1, 2, 3], SamplingParams(max_tokens=100), 0.0, 100).seqs[0]


class _Cost(StepCostModel):
    """A step cost fixed by the test: `base + per_token * tokens`, whatever the steps measure."""

    def __init__(self, base: float, per_token: float) -> None:
        super().__init__()
        self.base, self.per_token = base, per_token

    def observe(self, tokens: int, seconds: float) -> None:
        pass


def test_step_cost_model_fits_a_line_and_keeps_it_through_steps_of_one_size():
    cost = StepCostModel()
    cost.observe(8, 0.010 + 0.0005 * 8)
    assert cost.per_token is None  # one size: no slope yet
    rng = random.Random(0)
    for _ in range(200):
        t = rng.choice([1, 4, 16, 40, 130])
        cost.observe(t, 0.010 + 0.0005 * t)
    assert cost.base == pytest.approx(0.010, rel=1e-6) and cost.per_token == pytest.approx(0.0005, rel=1e-6)
    for _ in range(400):  # only batch-16 steps from now on: the slope cannot be refit, so it stays
        cost.observe(16, 0.018 + 1e-4 * rng.random())
    assert cost.per_token == pytest.approx(0.0005, rel=0.02) and cost.base == pytest.approx(0.010, rel=0.02)
    # A newer cost replaces an older one within a few tens of varied steps (the fit fades old steps).
    for _ in range(300):
        t = rng.choice([1, 4, 16, 40, 130])
        cost.observe(t, 0.002 + 0.001 * t)
    assert cost.base == pytest.approx(0.002, rel=1e-3) and cost.per_token == pytest.approx(0.001, rel=1e-3)
    flat = StepCostModel()
    for t in (1, 50) * 4:
        flat.observe(t, 0.01 if t == 1 else 0.005)  # faster with more tokens (noise): never a negative cost
    assert flat.per_token == 0.0 and flat.base == pytest.approx(0.0075, rel=0.05)


def test_step_cost_model_shrugs_off_outliers_and_fits_without_a_fixed_cost():
    """A first step that builds kernels (100x slower) and a later host pause are clipped, so the
    fit stays close to the truth; a fit that says steps cost nothing but their tokens is not
    believed (there is always a launch or a weight read)."""
    rng = random.Random(1)
    cost = StepCostModel()
    cost.observe(2, 1.0)  # the truth: 0.010 + 0.0005 * 2 = 0.011 s
    for i in range(60):
        t = rng.choice([2, 6, 10, 18])
        cost.observe(t, 0.5 if i == 40 else 0.010 + 0.0005 * t)
    assert cost.base == pytest.approx(0.010, rel=0.25) and cost.per_token == pytest.approx(0.0005, rel=0.25)
    unclipped = StepCostModel(max_ratio=math.inf)  # what clipping avoids: the pauses swamp the slope
    rng = random.Random(1)
    unclipped.observe(2, 1.0)
    for i in range(60):
        t = rng.choice([2, 6, 10, 18])
        unclipped.observe(t, 0.5 if i == 40 else 0.010 + 0.0005 * t)
    assert unclipped.per_token < 0.0002 and unclipped.base > 0.02
    through_origin = StepCostModel()  # steps that cost only their tokens: no draft pays
    for i in range(20):
        t = [2, 6, 10, 18][i % 4]
        through_origin.observe(t, 0.001 * t)
    assert through_origin.base == pytest.approx(0.0, abs=1e-9) and through_origin.per_token == pytest.approx(0.001)
    planner = DraftLengthPlanner(cost=through_origin)
    planner.begin_step(4)
    assert planner.max_draft(_seq(), 8) == 0


def test_max_draft_is_the_longest_draft_whose_last_token_pays_for_itself():
    for base, per_token, rows in [(10.0, 1.0, 1), (10.0, 1.0, 16), (1.0, 1.0, 4), (12.0, 0.5, 64)]:
        planner = DraftLengthPlanner(cost=_Cost(base, per_token))
        planner.begin_step(rows)
        value = base / rows + per_token  # what skipping one of those rows' steps saves
        for kept, refused in [(1, 1), (9, 1), (3, 7), (40, 1), (0, 5)]:
            seq = _seq()
            planner.forget(seq)
            planner.observe_draft(seq, kept + refused, kept)  # one draft: `kept` kept, then one refused
            alpha = planner.acceptance(seq)
            for limit in (0, 1, 4, 15):
                want = max([0] + [i for i in range(1, limit + 1) if alpha ** i * value > per_token])
                assert planner.max_draft(seq, limit) == want, (base, per_token, rows, alpha, limit)


def test_acceptance_is_per_sequence_shrunk_to_all_rows_and_fades_back_without_drafts():
    planner = DraftLengthPlanner(cost=_Cost(10.0, 1.0))
    good, bad, new = _seq("good"), _seq("bad"), _seq("new")
    planner.begin_step(4)
    for _ in range(10):
        planner.observe_draft(good, 4, 4)  # every drafted token kept
        planner.observe_draft(bad, 4, 0)  # every first token refused
    assert planner.acceptance(good) > 0.85 and planner.acceptance(bad) < 0.2
    prior = planner.acceptance(new)  # a row with no drafts yet: the acceptance of all rows
    assert planner.acceptance(bad) < prior < planner.acceptance(good)
    assert planner.max_draft(good, 8) > planner.max_draft(new, 8)
    assert planner.max_draft(bad, 8) == 0
    # `bad` drafts nothing, so nothing new is learnt of it: its old evidence fades and it is tried again.
    for _ in range(60):
        planner.begin_step(4)
    assert planner.acceptance(bad) == pytest.approx(prior, abs=0.01) and planner.max_draft(bad, 8) > 0
    planner.observe_draft(bad, 0, 0)  # no draft: no evidence
    planner.forget(good)
    assert planner.acceptance(good) == planner.acceptance(new)


def test_when_no_row_drafts_for_a_while_every_row_drafts_one_token_once():
    """A break-even above any acceptance (here 0.9 > the prior 0.8) would stop drafting for good,
    and with it all learning: after `explore_after` steps without a verified draft, each row
    drafts all it may for a step; a verified draft ends the exploration."""
    planner = DraftLengthPlanner(cost=_Cost(1.0, 9.0), explore_after=5)  # batch 1: 9 / (1 + 9) = 0.9
    seq = _seq()
    counts = []
    for _ in range(12):
        planner.begin_step(1)
        counts.append(planner.max_draft(seq, 4))
    assert counts == [0] * 5 + [4] * 7
    planner.observe_draft(seq, 1, 0)  # refused: the estimate falls further under 0.9, and exploring ends
    planner.begin_step(1)
    assert planner.max_draft(seq, 4) == 0
    for _ in range(5):
        planner.begin_step(1)
    assert planner.max_draft(seq, 4) == 4


def test_the_acceptance_of_all_rows_fades_back_to_the_optimistic_prior():
    planner = DraftLengthPlanner(cost=_Cost(10.0, 1.0))
    planner.begin_step(1)
    for _ in range(20):
        planner.observe_draft(_seq(), 4, 0)
    new = _seq("new")
    assert planner.acceptance(new) < 0.1
    for _ in range(600):
        planner.begin_step(1)
    assert planner.acceptance(new) == pytest.approx(planner.initial_acceptance, abs=0.02)
    with pytest.raises(ValueError, match="prior_weight"):
        DraftLengthPlanner(prior_weight=0)
    with pytest.raises(ValueError, match="row_decay"):
        DraftLengthPlanner(row_decay=1.5)


def test_without_a_measured_cost_every_draft_is_verified():
    planner = DraftLengthPlanner()
    planner.begin_step(64)
    seq = _seq()
    planner.observe_draft(seq, 4, 0)
    assert planner.max_draft(seq, 6) == 6
    planner.cost = _Cost(5.0, 0.0)  # a step whose time does not grow with its tokens: drafts are free
    planner.begin_step(64)
    assert planner.max_draft(seq, 6) == 6


class _FixedDraft:
    def __init__(self, draft: list[int]) -> None:
        self.draft = draft

    def propose(self, seq, max_tokens):
        return self.draft[:max_tokens]

    def forget(self, seq):
        pass


def test_scheduler_drafts_per_row_what_the_planner_allows():
    planner = DraftLengthPlanner(cost=_Cost(10.0, 1.0))
    sched = Scheduler(make_policy("fcfs"), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                      proposer=_FixedDraft([7] * 8), draft_planner=planner)
    good = Request("good", [1, 2], SamplingParams(max_tokens=50), 0.0, 50)
    bad = Request("bad", [1, 2], SamplingParams(max_tokens=50), 0.0, 50)
    for r in (good, bad):
        sched.add(r)
    sched.schedule()
    for r in (good, bad):
        r.seqs[0].output_ids.append(3)
    for _ in range(25):
        planner.observe_draft(good.seqs[0], 8, 8)
        planner.observe_draft(bad.seqs[0], 8, 0)
    out = sched.schedule()
    # Two rows: a kept token saves 10 / 2 + 1 = 6 per step and costs 1, so a row drafts while alpha^i > 1/6.
    drafts = {c.request.request_id: len(c.draft) for c in out.chunks}
    alpha = planner.acceptance(good.seqs[0])
    assert drafts == {"good": min(8, math.ceil(math.log(1 / 6) / math.log(alpha)) - 1), "bad": 0}
    assert drafts["good"] >= 4
    sched.accept_draft(good.seqs[0], drafts["good"], 0)  # refused: good's acceptance falls
    assert planner.acceptance(good.seqs[0]) < alpha
    sched.finish_sequence(good.seqs[0], "stop")  # a finished row's estimate is dropped, an aborted one's too
    assert sched.abort(bad) and planner._rows == {}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("draft-length"))


def test_engine_drafts_less_where_verified_tokens_cost_more_and_keeps_plain_decodings_tokens(llama_dir):
    """The same requests with a cheap and a dear verified token (injected step costs): greedy
    outputs are plain decoding's either way; the dear one drafts fewer tokens, and the engine
    feeds the planner what its steps and drafts measured."""
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], list(range(10, 30)) * 2, [9, 9, 9, 9], [40, 41, 42]]
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)] * len(prompts)

    observed: list[int] = []

    def run(spec, cost=None):
        engine = LLMEngine(load_model(llama_dir, "float32", "cpu"), None,
                           EngineConfig(block_size=4, max_num_seqs=8, speculative_config=spec))
        planner = engine.scheduler.draft_planner
        if cost is not None:
            planner.cost = cost
        elif planner is not None:
            observe = planner.observe_step
            planner.observe_step = lambda tokens, seconds: (observed.append(tokens), observe(tokens, seconds))
        outs = run_to_completion(engine, prompts, params)
        return [o.outputs[0].token_ids for o in outs], engine

    spec = {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 1, "adaptive": True}
    plain, _ = run(None)
    cheap_out, cheap = run(spec, _Cost(10.0, 0.01))
    dear_out, dear = run(spec, _Cost(2.0, 1.0))
    measured_out, measured = run(spec)
    assert cheap_out == plain and dear_out == plain and measured_out == plain
    assert 0 < dear.stats.draft_tokens < 0.8 * cheap.stats.draft_tokens, (dear.stats, cheap.stats)
    assert dear.stats.acceptance_rate > cheap.stats.acceptance_rate  # what it still drafts is kept more often
    fit = measured.scheduler.draft_planner.cost
    assert fit.per_token is not None and fit.per_token >= 0 and fit.base >= 0  # drafted steps differ in size
    # Decode steps only (4 rows of 1 + up to 6 tokens); the prompts' step (58 tokens) costs otherwise per token.
    assert len(observed) >= 5 and max(observed) <= 4 * 7 and min(observed) >= 1

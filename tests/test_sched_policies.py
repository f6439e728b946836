"""Scheduling policies on fake clocks and fake lengths: a pure-Python model that emits token 7 and
stops each request at its true length. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lengthwise.sampling_params import SamplingParams
from lengthwise.sched import Scheduler, make_policy
from lengthwise.sched.policy import SchedulerView, predicted_need
from lengthwise.sequence import Request


@dataclass
class FakeClock:
    t: float = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Run:
    """What a drive observed: per step, the running request ids; per request, prefill tokens fed."""

    steps: list[set[str]] = field(default_factory=list)
    admitted_order: list[str] = field(default_factory=list)
    prefill: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)  # id -> output length
    finish_count: dict[str, int] = field(default_factory=dict)
    row_steps: int = 0
    restarted: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finish_time: dict[str, float] = field(default_factory=dict)


def req(rid: str, prompt_len: int, true_len: int, predicted: float | None = None, max_tokens: int = 64,
        arrival: float = 0.0, priority: int = 0) -> Request:
    r = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), arrival, max_tokens,
                priority=priority)
    r.predicted_length = predicted
    r.true_len = true_len  # type: ignore[attr-defined]  (the fake model's stopping point)
    return r


def drive(policy, requests: list[Request], *, num_blocks: int = 400, block_size: int = 4, max_num_seqs: int = 64,
          budget: int = 256, clock: FakeClock | None = None, step_s: float = 1.0,
          arrivals: dict[float, list[Request]] | None = None, prefix_caching: bool = False,
          limit: int = 20_000, max_loras: int | None = None) -> tuple[Run, Scheduler]:
    clock = clock or FakeClock()
    s = Scheduler(policy, num_blocks, block_size, max_num_seqs, budget, clock=clock,
                  enable_prefix_caching=prefix_caching, max_loras=max_loras)
    run = Run()
    pending = sorted((arrivals or {0.0: requests}).items())
    while pending or s.has_unfinished():
        while pending and pending[0][0] <= clock.t:
            for r in pending.pop(0)[1]:
                s.add(r)
        before = {r.request_id for r in s.running}
        out = s.schedule()
        run.restarted += [r.request_id for r in out.restarted]
        run.preempted += [r.request_id for r in out.preempted]
        run.row_steps += out.rows
        for r in s.running:
            if r.request_id not in before:
                run.admitted_order.append(r.request_id)
        run.steps.append({r.request_id for r in s.running})
        for c in out.chunks:
            if c.seq is None:
                run.prefill[c.request.request_id] = run.prefill.get(c.request.request_id, 0) + c.num_tokens
            if not c.sample:
                continue
            for seq in (c.request.active_seqs if c.seq is None else [c.seq]):
                seq.output_ids.append(7)
                r = seq.request
                n = len(seq.output_ids)
                if n >= r.true_len or n >= r.max_tokens:
                    s.finish_sequence(seq, "stop" if n >= r.true_len else "length")
                    if r.finished:
                        run.finished[r.request_id] = n
                        run.finish_count[r.request_id] = run.finish_count.get(r.request_id, 0) + 1
                        run.finish_time[r.request_id] = clock.t
        clock.t += step_s
        assert len(run.steps) < limit, "no progress"
    return run, s


def expected(requests: list[Request]) -> dict[str, int]:
    return {r.request_id: min(r.true_len, r.max_tokens) for r in requests}


# -- static ---------------------------------------------------------------------------------------

def test_static_runs_fcfs_batches_and_nothing_joins_a_running_batch():
    rs = [req(str(i), 5, true_len=3 + (i * 7) % 20) for i in range(10)]
    run, s = drive(make_policy("static", {"batch_size": 4}), rs)
    assert run.finished == expected(rs)
    assert run.admitted_order == [str(i) for i in range(10)]
    batches = [{"0", "1", "2", "3"}, {"4", "5", "6", "7"}, {"8", "9"}]
    for running in run.steps:
        assert any(running <= b for b in batches), running  # never two batches at once
    # Idle rows count: a batch keeps its 4 rows until its longest member ends.
    lens = expected(rs)
    assert run.row_steps == sum(len(b) * max(lens[i] for i in b) for b in batches)


# -- sequence scheduling ----------------------------------------------------------------------------

def test_sequence_sorts_each_window_by_prediction():
    rs = [req(str(i), 4, true_len=t, predicted=t) for i, t in enumerate([40, 5, 30, 10, 20, 8, 35, 2])]
    policy = make_policy("sequence", {"window": 4, "vbs": False, "vbs_fixed": 2, "fcr": None})
    run, _ = drive(policy, rs)
    assert run.finished == expected(rs)
    # Window 1 = ids 0-3 sorted by prediction, then window 2 = ids 4-7 sorted.
    assert run.admitted_order == ["1", "3", "2", "0", "7", "5", "4", "6"]


def test_vbs_gives_short_buckets_bigger_batches_from_the_kv_budget():
    rs = [req(f"s{i}", 4, true_len=8, predicted=8, max_tokens=200) for i in range(40)]
    rs += [req(f"l{i}", 4, true_len=150, predicted=150, max_tokens=200) for i in range(40)]
    policy = make_policy("sequence", {"bucket": 50, "fcr": "recompute"})
    run, s = drive(policy, rs, num_blocks=400, block_size=4)
    assert run.finished == expected(rs)
    short_batch = max(len(x) for x in run.steps if any(i.startswith("s") for i in x))
    long_batch = max(len(x) for x in run.steps if any(i.startswith("l") for i in x))
    # 400 blocks of 4 tokens: a 50-token bucket row needs 2 + 13 blocks, a 150-token one 2 + 38.
    assert short_batch == 26 and long_batch == 9, (short_batch, long_batch)


def test_geometric_buckets_without_merging_keep_each_batch_within_the_growth_factor():
    policy = make_policy("sequence", {"bucket": 8, "bucket_growth": 1.2, "merge": False})
    tops = [policy.bucket_of(req("x", 2, 1, predicted=p, max_tokens=512)) for p in (1, 8, 8.5, 10, 10.5, 100, 600)]
    assert tops == [8, 8, 10, 12, 12, 103, 512]  # tops 8, 9.6, 11.52, ..., 102.7 rounded up; max_tokens caps
    lengths = [3, 5, 8, 9, 10, 11, 12, 20, 21, 24, 40, 45, 47, 100, 110, 120]
    rs = [req(str(i), 4, true_len=n, predicted=n, max_tokens=200) for i, n in enumerate(lengths)]
    run, _ = drive(policy, rs, num_blocks=400, block_size=4)
    assert run.finished == expected(rs)
    by_id = {r.request_id: r.true_len for r in rs}
    for members in {frozenset(x) for x in run.steps if x}:
        got = [by_id[i] for i in members]
        assert max(got) <= 1.2 * max(8, min(got)) + 1, got  # never lengths 3 and 47 in one batch
    merging = make_policy("sequence", {"bucket": 8, "bucket_growth": 1.2})
    drive(merging, [req(str(i), 4, true_len=n, predicted=n, max_tokens=200) for i, n in enumerate(lengths)],
          num_blocks=400, block_size=4)
    assert merging.batches_served < policy.batches_served
    for bad in ({"bucket_growth": 1.0}, {"bucket_growth": "2"}, {"merge": "no"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_policy("sequence", bad)


def test_vbs_sizes_the_next_batch_from_the_blocks_free_now():
    """Batches are cut one at a time: blocks that suspended (fcr=continue) rows still hold are
    not counted, so the next batch fits instead of being admitted piecemeal."""
    policy = make_policy("sequence", {"bucket": 50})
    rs = [req(str(i), 4, true_len=40, predicted=40, max_tokens=200) for i in range(3)]
    full = SchedulerView(now=0.0, num_running_requests=0, num_running_seqs=0, num_free_blocks=400,
                         num_blocks=400, seq_slots=64, block_size=4, max_num_seqs=64)
    half = SchedulerView(now=0.0, num_running_requests=0, num_running_seqs=0, num_free_blocks=200,
                         num_blocks=400, seq_slots=64, block_size=4, max_num_seqs=64)
    assert policy.rows_for(rs, 50, full) == 26 and policy.rows_for(rs, 50, half) == 13  # (400 - 4) // 15


@pytest.mark.parametrize("mode", ["recompute", "continue"])
def test_fcr_collects_exactly_the_rows_that_hit_the_cap_and_finishes_them(mode):
    # Predictions of 10 (bucket 50) for all; the true lengths of 3 of them exceed 50.
    true = [12, 70, 30, 55, 9, 48, 90, 20]
    rs = [req(str(i), 6, true_len=t, predicted=10, max_tokens=128) for i, t in enumerate(true)]
    policy = make_policy("sequence", {"bucket": 50, "fcr": mode, "vbs": False, "vbs_fixed": 8})
    run, s = drive(policy, rs)
    assert run.finished == expected(rs)
    assert all(c == 1 for c in run.finish_count.values())
    failed = {r.request_id for r in rs if r.num_collected}
    assert failed == {"1", "3", "6"}
    assert s.num_collected == 3
    for r in rs:
        # recompute feeds the prompt again; continue keeps the KV and never re-prefills it.
        again = mode == "recompute" and r.request_id in failed
        assert run.prefill[r.request_id] == (12 if again else 6), r.request_id
    assert sorted(run.restarted) == (sorted(failed) if mode == "recompute" else [])
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks and not s.suspended


def test_fcr_continue_spills_parked_kv_when_nothing_else_fits():
    # Tiny cache: collected rows keep their blocks, so the failure batch must spill some of them.
    rs = [req(str(i), 8, true_len=60, predicted=5, max_tokens=64) for i in range(6)]
    policy = make_policy("sequence", {"bucket": 10, "fcr": "continue", "vbs": False, "vbs_fixed": 6})
    run, s = drive(policy, rs, num_blocks=60, block_size=4)
    assert run.finished == expected(rs)
    assert s.kv.num_free_blocks == 60


# -- multi-bin ------------------------------------------------------------------------------------

def test_multibin_with_oracle_lengths_forms_single_bin_batches():
    import random

    rng = random.Random(0)
    lens = [rng.randint(1, 100) for _ in range(64)]
    rs = [req(str(i), 3, true_len=t, predicted=t, max_tokens=128) for i, t in enumerate(lens)]
    edges = [25.0, 50.0, 75.0]
    policy = make_policy("multibin", {"bins": 4, "batch_size": 4, "edges": edges})
    run, _ = drive(policy, rs)
    assert run.finished == expected(rs)
    import bisect

    bin_of = {r.request_id: bisect.bisect_left(edges, r.predicted_length) for r in rs}
    for running in run.steps:
        assert len({bin_of[i] for i in running}) <= 1, running


def test_multibin_learns_edges_from_recent_predictions_and_releases_full_bins_in_order():
    policy = make_policy("multibin", {"bins": 2, "batch_size": 2})
    rs = [req(str(i), 3, true_len=p, predicted=p, max_tokens=128) for i, p in enumerate([10, 90, 12, 95, 11, 92])]
    for r in rs:
        policy.add(r)
    assert policy.current_edges() == [51.0]  # the median of six predictions
    formed = [[r.request_id for r in m] for m, _ in policy.ready]
    assert formed[0] == ["0", "2"]  # bin 0 filled first (edges were still settling for "1")


def test_multibin_max_wait_bounds_the_wait_of_a_lonely_bin():
    clock = FakeClock()
    long_one = req("long", 3, true_len=5, predicted=500)
    shorts = {float(t): [req(f"s{t}", 3, true_len=2, predicted=5, arrival=float(t))] for t in range(1, 200)}
    arrivals = {0.0: [long_one], **shorts}
    policy = make_policy("multibin", {"bins": 2, "batch_size": 8, "max_wait": 20.0, "edges": [100.0]})
    run, _ = drive(policy, [], arrivals=arrivals, clock=clock)
    first = next(i for i, x in enumerate(run.steps) if "long" in x)
    assert first <= 22  # released by max_wait, not after the short stream dries up
    assert run.finished["long"] == 5


# -- continuous -----------------------------------------------------------------------------------

def test_sjf_admits_shortest_prediction_first():
    rs = [req(str(i), 3, true_len=4, predicted=p) for i, p in enumerate([50, 5, 20, 1])]
    run, _ = drive(make_policy("continuous-sjf"), rs, max_num_seqs=1)
    assert run.admitted_order == ["3", "1", "2", "0"]


def test_policies_bound_a_prediction_by_min_tokens_and_max_tokens():
    """What a request allows for sure overrides its prediction: one predicted at 500 with
    max_tokens 8 is short, one predicted at 1 with min_tokens 40 is not."""
    capped = req("capped", 3, true_len=8, predicted=500, max_tokens=8)
    middle = req("middle", 3, true_len=4, predicted=20)
    floored = Request("floored", [1, 2, 3], SamplingParams(max_tokens=64, min_tokens=40), 0.0, 64)
    floored.predicted_length, floored.true_len = 1, 40  # type: ignore[attr-defined]
    run, _ = drive(make_policy("continuous-sjf"), [floored, middle, capped], max_num_seqs=1)
    assert run.admitted_order == ["capped", "middle", "floored"]
    view = SchedulerView(now=0.0, num_running_requests=0, num_running_seqs=0, num_free_blocks=100, num_blocks=100,
                         seq_slots=1, block_size=4)
    fresh = Request("fresh", [1, 2, 3], SamplingParams(max_tokens=64, min_tokens=40), 0.0, 64)
    fresh.predicted_length = 1
    assert predicted_need(fresh, view, 0.5) == 1 + 10  # a prompt block + 40 tokens in blocks of 4


def test_sjf_aging_lets_a_long_request_finish_under_a_stream_of_short_ones():
    clock = FakeClock()
    long_one = req("long", 3, true_len=10, predicted=400, max_tokens=400)
    # A short request arrives every step: without aging the long one would wait forever.
    arrivals = {0.0: [long_one], **{float(t): [req(f"s{t}", 3, true_len=1, predicted=1, arrival=float(t))]
                                    for t in range(1, 400)}}
    run, _ = drive(make_policy("continuous-sjf", {"aging": 20.0}), [], arrivals=arrivals, clock=clock,
                   max_num_seqs=1)
    first = next(i for i, x in enumerate(run.steps) if "long" in x)
    assert first <= 25  # 400 tokens / 20 per second of waiting
    assert run.finished["long"] == 10


def test_sjf_preempts_the_request_admission_ranks_last():
    """The victim follows the aged priority: a long request that aging admitted is protected
    (preempting it by predicted work alone made it wait and recompute over and over)."""
    policy = make_policy("continuous-sjf", {"aging": 1.0})
    old_long = req("old-long", 3, 10, predicted=300, arrival=0.0)  # 300 - 400 s waited = -100
    new_short = req("new-short", 3, 10, predicted=20, arrival=399.0)  # 20 - 1 = 19
    new_long = req("new-long", 3, 10, predicted=200, arrival=399.0)  # 199
    assert policy.victim([old_long, new_short], now=400.0) is new_short
    assert policy.victim([old_long, new_short, new_long], now=400.0) is new_long


def test_sjf_has_lower_mean_latency_than_fcfs_when_requests_queue():
    """Mixed lengths arriving faster than they are served (fake clock, predictions within 2x of
    the truth): serving short jobs first lowers the mean latency, the acceptance's Poisson case."""
    import random

    rng = random.Random(0)

    def workload():
        t, out = 0.0, {}
        for i in range(150):
            t += rng.expovariate(0.6)
            true = rng.choice([2, 3, 5, 8, 60, 90])
            out.setdefault(round(t), []).append(
                req(str(i), 3, true_len=true, predicted=true * rng.uniform(0.5, 2.0), max_tokens=128, arrival=round(t)))
        return {float(k): v for k, v in out.items()}

    mean = {}
    for name in ("fcfs", "continuous-sjf"):
        rng.seed(0)
        arrivals = workload()
        run, _ = drive(make_policy(name), [], arrivals=arrivals, num_blocks=200, max_num_seqs=8)
        reqs = [r for rs in arrivals.values() for r in rs]
        assert run.finished == expected(reqs)
        mean[name] = sum(run.finish_time[r.request_id] - r.arrival_time for r in reqs) / len(reqs)
    assert mean["continuous-sjf"] < 0.8 * mean["fcfs"], mean


def test_predictive_admission_preempts_less_than_admit_then_preempt():
    rs = [req(str(i), 4, true_len=40, predicted=40, max_tokens=64) for i in range(24)]
    plain, s_plain = drive(make_policy("fcfs"), [req(r.request_id, 4, 40, 40, 64) for r in rs], num_blocks=90)
    pred, s_pred = drive(make_policy("fcfs", {"predictive": True, "quantile": 0.9}), rs, num_blocks=90)
    assert plain.finished == pred.finished == expected(rs)
    assert s_plain.num_preemptions > 0 and s_pred.num_preemptions == 0


# -- user priorities (vLLM's `priority`) -------------------------------------------------------------

def test_priority_policy_admits_by_priority_then_arrival():
    rs = [req(str(i), 3, true_len=4, priority=p, arrival=float(i)) for i, p in enumerate([2, 0, 1, 0, 2])]
    run, _ = drive(make_policy("priority"), rs, max_num_seqs=1)
    assert run.admitted_order == ["1", "3", "2", "0", "4"]
    assert run.preempted == []


@pytest.mark.parametrize("name", ["priority", "continuous-sjf"])
@pytest.mark.parametrize("short_of", ["slots", "blocks"])
def test_an_urgent_request_preempts_a_less_urgent_one_and_equals_do_not(name, short_of):
    """A request of a more urgent class (lower priority) that cannot start (no sequence slot, or
    no blocks) preempts the least urgent running request; it then runs at once, and the victim
    finishes later in full. One of the same class waits its turn."""
    long_ = req("long", 40, true_len=40, predicted=40, priority=1, max_tokens=40)
    same = req("same", 4, true_len=3, predicted=3, priority=1, arrival=5.0)
    urgent = req("urgent", 28, true_len=3, predicted=3, priority=0, arrival=10.0)
    # "blocks": 20 blocks of 4 hold all of long (10 + 10), whose 10 + 3 at step 10 leave 7 free:
    # too few for urgent's 7 + 1 and the headroom's 1.
    sizing = {"max_num_seqs": 1} if short_of == "slots" else {"num_blocks": 20, "max_num_seqs": 8}
    run, s = drive(make_policy(name), [], arrivals={0.0: [long_], 5.0: [same], 10.0: [urgent]}, **sizing)
    assert run.preempted == ["long"]
    assert "urgent" in run.steps[10]  # admitted the step it arrived
    assert run.finish_time["urgent"] < run.finish_time["long"]
    assert run.finished == expected([long_, same, urgent])
    if short_of == "slots":  # `same` had no slot and was not let in by preempting its equal
        assert run.finish_time["same"] > run.finish_time["urgent"]
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks


def test_a_block_shortage_preempts_the_least_urgent_running_request():
    """Running requests are continued most urgent first, so when blocks run out mid-step the
    victim is a less urgent one even if it was admitted first."""
    low = req("low", 4, true_len=30, priority=2, max_tokens=30)
    high = req("high", 4, true_len=30, priority=0, max_tokens=30, arrival=1.0)
    run, _ = drive(make_policy("priority"), [], arrivals={0.0: [low], 1.0: [high]}, num_blocks=15)
    assert "low" in run.preempted and "high" not in run.preempted
    assert run.finished == expected([low, high])


@pytest.mark.parametrize("name", ["priority", "continuous-sjf"])
def test_priority_preemption_follows_predictive_admission(name):
    """Under predictive admission a request is let in by its predicted need, not its first block:
    an urgent request that the blocks would take but the prediction would not still preempts the
    less urgent one (else it waited for it to finish, which was then preempted anyway)."""
    long_ = req("long", 8, true_len=100, predicted=100, priority=1, max_tokens=100)
    urgent = req("urgent", 8, true_len=3, predicted=3, priority=0, arrival=2.0, max_tokens=100)
    run, _ = drive(make_policy(name, {"predictive": True}), [], arrivals={0.0: [long_], 2.0: [urgent]},
                   num_blocks=28, max_num_seqs=8)
    assert run.preempted == ["long"] and run.finish_time["urgent"] == 4.0
    assert run.finished == expected([long_, urgent])


def test_no_preemption_that_cannot_let_the_urgent_request_in():
    """An urgent request that would not fit even with every less urgent request gone (an equal
    holds the cache) preempts no one: the short less urgent request finishes undisturbed."""
    hi = req("hi-run", 40, true_len=30, priority=0, max_tokens=30)
    lo = req("lo-run", 4, true_len=8, priority=1, max_tokens=30)
    urgent = req("urgent", 40, true_len=3, priority=0, arrival=2.0, max_tokens=30)
    run, _ = drive(make_policy("priority"), [], arrivals={0.0: [hi, lo], 2.0: [urgent]}, num_blocks=22)
    assert run.preempted == [] and run.finish_time["lo-run"] == 7.0
    assert run.finished == expected([hi, lo, urgent])


def test_a_prompt_prefix_shared_with_a_running_request_is_not_preempted_for():
    """Prefix caching: the urgent prompt extends the running one's, whose blocks it will share, so
    it fits without preempting anyone (counting its whole prompt preempted the running request
    only to admit it again in the same step, its answer's KV lost)."""
    running = req("running", 40, true_len=30, priority=1, max_tokens=30)
    urgent = req("urgent", 44, true_len=3, priority=0, max_tokens=30, arrival=12.0)
    run, _ = drive(make_policy("priority"), [], arrivals={0.0: [running], 12.0: [urgent]}, num_blocks=22,
                   prefix_caching=True)
    assert run.preempted == [] and run.prefill["urgent"] == 4  # 40 prompt tokens shared
    assert run.finished == expected([running, urgent])


def test_priority_preemption_makes_room_for_an_adapter_and_never_readmits_its_victims_at_once():
    """max_loras=1: an urgent request of another adapter needs the adapter's place and two slots:
    both less urgent requests (one adapter) are preempted once, it runs at once, they resume."""
    from lengthwise.lora.request import LoRARequest

    a, b = LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/b")
    first = req("first", 8, true_len=40, priority=1, max_tokens=40)
    second = req("second", 8, true_len=40, priority=1, max_tokens=40, arrival=0.5)
    first.lora_request = second.lora_request = a
    urgent = Request("urgent", list(range(1, 9)), SamplingParams(max_tokens=40, n=2), 2.0, 40, priority=0,
                     lora_request=b)
    urgent.true_len = 3  # type: ignore[attr-defined]
    run, _ = drive(make_policy("priority"), [], arrivals={0.0: [first, second], 2.0: [urgent]}, max_num_seqs=3,
                   max_loras=1)
    assert sorted(run.preempted) == ["first", "second"] and run.finish_time["urgent"] == 4.0
    assert run.prefill == {"first": 16, "second": 16, "urgent": 8}  # each recomputed its prompt once


@pytest.mark.parametrize("name", ["fcfs", "priority"])
def test_a_preempted_request_goes_back_to_its_place_among_equals(name):
    """Requests that arrived together keep their order across a preemption (vLLM puts a preempted
    request back at the queue's front): its key lives while it runs and goes when it finishes."""
    policy = make_policy(name)
    r0, r1, r2 = (req(str(i), 4, true_len=5) for i in range(3))
    for r in (r0, r1, r2):
        policy.add(r)
    view = SchedulerView(now=0.0, num_running_requests=0, num_running_seqs=0, num_free_blocks=100,
                         num_blocks=100, seq_slots=8, block_size=4)
    policy.admitted(r0)
    assert list(policy.candidates(view)) == [r1, r2]
    policy.preempted(r0)
    assert list(policy.candidates(view)) == [r0, r1, r2]
    policy.admitted(r0)
    policy.finished(r0)
    assert not policy.remove(r0) and policy.remove(r1) and list(policy.candidates(view)) == [r2]
    assert len(policy._keys) == 1  # only r2's: nothing kept for finished or removed requests
    # Among equal arrivals the victim is the last admitted, which has the least work to lose.
    assert policy.victim([r0, r1, r2], now=0.0) is r2


def test_sjf_orders_by_priority_class_before_predicted_length_and_aging():
    """Within a class, shortest predicted first; a class is never overtaken, not even by a
    request of a lower class that has waited long enough to age past everything."""
    policy = make_policy("continuous-sjf", {"aging": 1.0})
    old_low = req("old-low", 3, 5, predicted=1, priority=1, arrival=0.0)  # aged to -999
    long_hi = req("long-hi", 3, 5, predicted=500, priority=0, arrival=999.0)
    short_hi = req("short-hi", 3, 5, predicted=5, priority=0, arrival=999.0)
    for r in (old_low, long_hi, short_hi):
        policy.add(r)
    view = SchedulerView(now=1000.0, num_running_requests=0, num_running_seqs=0, num_free_blocks=100,
                         num_blocks=100, seq_slots=8, block_size=4)
    assert [r.request_id for r in policy.candidates(view)] == ["short-hi", "long-hi", "old-low"]
    assert policy.most_urgent(1000.0) is short_hi
    assert policy.victim([old_low, long_hi, short_hi], 1000.0) is old_low


def test_policies_that_ignore_priority_say_so():
    assert make_policy("priority").supports_priority and make_policy("continuous-sjf").supports_priority
    for name in ("fcfs", "continuous", "static", "sequence", "multibin"):
        assert not make_policy(name).supports_priority, name


def test_policy_options_are_validated_by_name():
    with pytest.raises(ValueError, match="no option"):
        make_policy("static", {"batchsize": 4})
    with pytest.raises(ValueError, match="fcr"):
        make_policy("sequence", {"fcr": "retry"})
    with pytest.raises(ValueError, match="batch_size"):
        make_policy("multibin", {"batch_size": 0})
    with pytest.raises(ValueError, match="edges"):
        make_policy("multibin", {"bins": 3, "edges": [5.0]})
    with pytest.raises(ValueError, match="aging"):
        make_policy("continuous-sjf", {"aging": 0})
    with pytest.raises(ValueError, match="pad"):
        make_policy("static", {"pad": "yes"})


# -- every policy: nothing lost, nothing duplicated -------------------------------------------------

POLICIES = [("fcfs", {}), ("fcfs", {"predictive": True}), ("continuous-sjf", {}), ("priority", {}),
            ("priority", {"predictive": True}), ("static", {"batch_size": 3}),
            ("static", {"batch_size": 3, "pad": True}),
            ("sequence", {"window": 5, "fcr": "recompute"}), ("sequence", {"window": 5, "fcr": "continue"}),
            ("sequence", {"vbs": False, "fcr": None}), ("sequence", {"window": 5, "vbs": "paper", "pad": True}),
            ("multibin", {"bins": 3, "batch_size": 3, "max_wait": 5.0})]


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(POLICIES),
       reqs=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 40), st.integers(1, 60), st.integers(0, 30),
                               st.integers(0, 2)),
                     min_size=1, max_size=25),
       num_blocks=st.integers(30, 120))
def test_no_request_is_lost_or_duplicated_under_random_arrivals(policy, reqs, num_blocks):
    arrivals: dict[float, list[Request]] = {}
    rs = []
    prioritised = make_policy(*policy).supports_priority  # random classes: priority preemption too
    for i, (prompt, true_len, pred, at, prio) in enumerate(reqs):
        r = req(str(i), prompt, true_len=true_len, predicted=pred, max_tokens=48, arrival=float(at),
                priority=prio if prioritised else 0)
        rs.append(r)
        arrivals.setdefault(float(at), []).append(r)
    run, s = drive(make_policy(*policy), [], arrivals=arrivals, num_blocks=num_blocks, block_size=4,
                   max_num_seqs=8, budget=64)
    assert run.finished == expected(rs)
    assert all(c == 1 for c in run.finish_count.values())
    assert s.kv.num_free_blocks == num_blocks and not s.running and len(s.policy) == 0


@pytest.mark.parametrize("name, options", [("static", {"batch_size": 4}), ("fcfs", {}),
                                           ("sequence", {"bucket": 4, "fcr": "continue"}),
                                           ("multibin", {"bins": 2, "batch_size": 3})])
def test_stop_may_admit_whenever_a_stop_lets_a_request_in(name, options):
    """The engine launches no decode step ahead when `stop_may_admit()`: so it must be true before
    every step after which a stop let a request in, and (for batch policies) false mid-batch."""
    rs = [req(str(i), 5, true_len=3 + (i * 7) % 13, predicted=3 + (i * 5) % 11) for i in range(12)]
    policy = make_policy(name, options)
    s = Scheduler(policy, 40, 4, 6, 256, clock=FakeClock())
    for r in rs:
        s.add(r)
    said, stopped_then_admitted, quiet_steps = [], 0, 0
    while s.has_unfinished():
        before = {r.request_id for r in s.running}
        out = s.schedule()
        if said and said[-1][1] and {r.request_id for r in s.running} - before:
            stopped_then_admitted += 1
            assert said[-1][0], "a stop let a request in although stop_may_admit() was false"
        flag, stopped = policy.stop_may_admit(), False
        quiet_steps += not flag
        for c in out.chunks:
            if c.sample:
                for seq in (c.request.active_seqs if c.seq is None else [c.seq]):
                    seq.output_ids.append(7)
                    if len(seq.output_ids) >= min(seq.request.true_len, seq.request.max_tokens):
                        s.finish_sequence(seq, "stop")
                        stopped = True
        said.append((flag, stopped))
        assert len(said) < 5000
    assert stopped_then_admitted > 0
    if name != "fcfs":
        assert quiet_steps > 0  # mid-batch, with requests waiting, steps may be launched ahead


def test_sequence_vbs_paper_uses_the_papers_batch_size_table():
    """vbs="paper": 256 rows up to 50 predicted tokens, 128, 64, 32 up to 200, then 16; failure
    batches (uncapped) 16; a leftover merges only below max(half, 16)."""
    from types import SimpleNamespace

    policy = make_policy("sequence", {"vbs": "paper"})
    view = SimpleNamespace(max_num_seqs=1000)
    policy.capped = True
    assert [policy.rows_for([], n, view) for n in (50, 100, 150, 200, 250, 512)] == [256, 128, 64, 32, 16, 16]
    policy.capped = False
    assert policy.rows_for([], 50, view) == 16
    assert make_policy("sequence", {"vbs": "paper"}).rows_for([], 50, SimpleNamespace(max_num_seqs=8)) == 8
    with pytest.raises(ValueError, match="vbs"):
        make_policy("sequence", {"vbs": "table"})

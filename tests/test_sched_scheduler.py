"""The step scheduler and FCFS policy on their own: pure Python, a fake model that emits token 7."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lengthwise.sampling_params import SamplingParams
from lengthwise.sched import FCFSPolicy, Scheduler, make_policy
from lengthwise.sequence import Request, RequestStatus


def _request(rid: str, prompt_len: int, max_tokens: int, arrival: float, n: int = 1) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, n=n), arrival,
                   max_tokens)


def _step(s: Scheduler) -> list:
    """Plan a step and play the model: every sampling chunk gives each of its sequences token 7."""
    out = s.schedule()
    for c in out.chunks:
        if not c.sample:
            continue
        for seq in (c.request.active_seqs if c.seq is None else [c.seq]):
            seq.output_ids.append(7)
            if len(seq.output_ids) >= seq.request.max_tokens:
                s.finish_sequence(seq, "length")
    return out


def _drain(s: Scheduler, limit: int = 10_000) -> list:
    plans = []
    while s.has_unfinished():
        plans.append(_step(s))
        assert len(plans) < limit, "scheduler stopped making progress"
    return plans


def test_sched_modules_do_not_import_torch():
    for path in (Path(__file__).parents[1] / "lengthwise" / "sched").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        names |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "torch" not in names, path


def test_fcfs_admits_in_arrival_order_within_the_sequence_limit():
    s = Scheduler(FCFSPolicy(), num_blocks=100, block_size=4, max_num_seqs=2, max_num_batched_tokens=100)
    reqs = [_request(str(i), 3, 2, arrival=t) for i, t in enumerate([3.0, 1.0, 2.0])]
    for r in reqs:
        s.add(r)
    first = s.schedule()
    assert [c.request.request_id for c in first.chunks] == ["1", "2"]
    assert reqs[0].status is RequestStatus.WAITING and s.num_waiting == 1


def test_token_budget_chunks_long_prompts_and_decodes_go_first():
    s = Scheduler(FCFSPolicy(), num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    short, long = _request("a", 3, 5, 0.0), _request("b", 25, 2, 1.0)
    s.add(short)
    s.add(long)
    plan = _step(s)
    assert [(c.request.request_id, c.start, c.end) for c in plan.chunks] == [("a", 0, 3), ("b", 0, 7)]
    plan = _step(s)  # a's decode (1 token) comes before b's next chunk, within the budget of 10
    assert [(c.request.request_id, c.seq is None, c.end - c.start) for c in plan.chunks] == [
        ("a", False, 1), ("b", True, 9)]
    for plan in _drain(s):
        assert plan.num_tokens <= 10
    assert long.seqs[0].output_ids == [7, 7] and short.seqs[0].output_ids == [7] * 5
    assert s.kv.num_free_blocks == 100


def test_n_samples_share_one_prompt_segment():
    s = Scheduler(FCFSPolicy(), num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    r = _request("r", 10, 6, 0.0, n=4)
    s.add(r)
    _step(s)  # prefill: one prompt chunk samples a first token for all 4 sequences
    assert [len(q.output_ids) for q in r.seqs] == [1, 1, 1, 1]
    assert len(s.kv.prompt_segment("r").blocks) == 3
    assert s.kv.num_free_blocks == 100 - 3
    _step(s)  # each sequence writes its first token into its own response block
    assert s.kv.num_free_blocks == 100 - 3 - 4
    assert all(s.kv.pool.refcount(b) == 4 for b in s.kv.prompt_segment("r").blocks)
    _drain(s)
    assert s.kv.num_free_blocks == 100


def test_preemption_when_blocks_run_out_recomputes_and_finishes_everything():
    # 12 blocks of 4 tokens: three requests of 4 + 20 tokens cannot all hold their full context.
    s = Scheduler(FCFSPolicy(), num_blocks=12, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    reqs = [_request(str(i), 4, 20, float(i)) for i in range(3)]
    for r in reqs:
        s.add(r)
    plans = _drain(s)
    assert s.num_preemptions > 0
    assert any(p.preempted for p in plans)
    assert max(r.num_preemptions for r in reqs) > 0
    assert reqs[0].num_preemptions == 0  # FCFS: the oldest request is never the victim
    assert all(r.seqs[0].output_ids == [7] * 20 for r in reqs)
    assert s.kv.num_free_blocks == 12
    # A preempted request's first step back re-feeds its prompt and then its generated tokens.
    back = next(r for r in reqs if r.num_preemptions)
    assert back.status is RequestStatus.FINISHED


def test_abort_frees_blocks_of_running_and_waiting_requests():
    s = Scheduler(FCFSPolicy(), num_blocks=50, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    running, waiting = _request("a", 9, 10, 0.0, n=2), _request("b", 3, 10, 1.0)
    s.add(running)
    s.add(waiting)
    _step(s)
    _step(s)
    assert s.kv.num_free_blocks < 50 and running.status is RequestStatus.RUNNING
    assert s.abort(running) and s.abort(waiting)
    assert s.kv.num_free_blocks == 50
    assert not s.has_unfinished()
    assert [q.finish_reason for q in running.seqs] == ["abort", "abort"]
    assert not s.abort(running)  # already finished


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(FCFSPolicy(), 10, 4, 0, 10)

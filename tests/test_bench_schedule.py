"""`lengthwise bench schedule` end to end on the built-in model and a small alpaca-style file."""

from __future__ import annotations

import json

import pytest

from lengthwise.bench.schedule import KEYS, parse_policy
from lengthwise.cli import main


def test_parse_policy_specs():
    spec = parse_policy("sequence:fcr=continue,vbs=false,bucket=25")
    assert spec.name == "sequence" and spec.options == {"fcr": "continue", "vbs": False, "bucket": 25}
    assert parse_policy("continuous").options == {}
    spec = parse_policy("sequence:bucket=10@oracle")
    assert spec.options == {"bucket": 10} and spec.predictor == "oracle" and spec.label.endswith("@oracle")
    with pytest.raises(ValueError, match="key=value"):
        parse_policy("static:16")
    # A JSON list keeps its commas: the paper's fixed multi-bin edges can be given.
    spec = parse_policy("multibin:bins=4,edges=[30,93,168],batch_size=16")
    assert spec.options == {"bins": 4, "edges": [30, 93, 168], "batch_size": 16}
    # A label is the spec as typed, and parses back to the same spec (a bare word stays bare).
    for text in ("sequence:vbs=paper,pad=true", "sequence:fcr=continue@oracle", "multibin:edges=[30,93]",
                 'static:note="12"', 'static:note="a b"'):
        spec = parse_policy(text)
        assert parse_policy(spec.label) == spec
    assert parse_policy("sequence:vbs=paper,pad=true").label == "sequence:vbs=paper,pad=true"


def test_bench_schedule_reproduces_lengths_and_sorting_cuts_padding(random_model, tmp_path):
    lengths = [3, 40, 5, 38, 4, 41, 6, 39]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "prompt": f"the sea {i}", "lengths": {"t0.0": n}})
                            + "\n" for i, n in enumerate(lengths)))
    out = tmp_path / "out"
    assert main(["bench", "schedule", "--model", str(random_model), "--data", str(data), "--num-requests", "8",
                 "--predictor", "oracle", "--policy", "static:batch_size=2",
                 "--policy", "sequence:vbs=false,vbs_fixed=2", "--policy", "continuous",
                 "--json", str(tmp_path / "r.json"), "--out-dir", str(out)]) == 0
    records = {r["policy"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    for r in records.values():
        assert set(KEYS) <= set(r)
        assert r["output_tokens"] == sum(lengths)  # eos_after reproduces every true length
    static, seq = records["static"], records["sequence"]
    # FCFS pairs a short with a long request: each pair pads to ~40; sorted pairs do not.
    assert static["padded_steps_per_request"] == pytest.approx(sum(2 * max(a, b) for a, b in
                                                                   zip(lengths[::2], lengths[1::2], strict=True)) / 8)
    assert seq["padded_steps_per_request"] < 0.7 * static["padded_steps_per_request"]
    assert seq["failure_rate"] == 0.0  # oracle predictions never hit their bucket's cap
    assert records["continuous"]["effective_token_ratio"] == pytest.approx(1.0)
    assert (out / "schedule.png").is_file() and "| static" in (out / "schedule.md").read_text()


def test_bench_schedule_reports_each_priority_class(random_model, tmp_path):
    """`--priorities`: the priority policy gets the classes (one slot: class 0 starts first), fcfs
    does not (the engine would refuse them) but is measured on the same split."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "prompt": f"the sea {i}", "lengths": {"t0.0": 6}}) + "\n"
                            for i in range(10)))
    out = tmp_path / "out"
    assert main(["bench", "schedule", "--model", str(random_model), "--data", str(data), "--num-requests", "10",
                 "--max-num-seqs", "1", "--priorities", "0:1,1:1", "--policy", "fcfs", "--policy", "priority",
                 "--json", str(tmp_path / "r.json"), "--out-dir", str(out)]) == 0
    records = {r["policy"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    split = {c: m["num_requests"] for c, m in records["fcfs"]["priority_classes"].items()}
    assert split == {c: m["num_requests"] for c, m in records["priority"]["priority_classes"].items()}
    assert sorted(split) == ["0", "1"] and sum(split.values()) == 10
    prio = records["priority"]["priority_classes"]
    assert prio["0"]["ttft_p99_s"] < prio["1"]["ttft_mean_s"]  # every urgent one started before the others' mean
    assert "| priority | 0 |" in (out / "schedule.md").read_text()


@pytest.mark.parametrize("policy, options", [
    ("static", {"batch_size": 4}),
    ("sequence", {"vbs": False, "vbs_fixed": 4, "fcr": None}),  # one batch of the four, run to its end
    ("multibin", {"bins": 1, "batch_size": 4}),
])
def test_pad_computes_the_finished_rows_without_changing_any_output(random_model, policy, options):
    """`pad=true` is the papers' executor: a finished row keeps being computed until its batch
    ends (the paper's 1.86x compares sequence and static both so). The padding rows really run
    through the model (the forward sees them), yet every real row's tokens are those of the
    unpadded run."""
    from lengthwise import SamplingParams
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.model import load_model
    from lengthwise.tokenizer import Tokenizer

    model = load_model(random_model, "float32", "cpu")
    prompts = ["the sea is", "a ship", "far away in the night", "blue"]
    lengths = [3, 12, 6, 9]

    def serve(pad: bool):
        engine = LLMEngine(model, Tokenizer(random_model), EngineConfig(
            policy=policy, policy_options={**options, "pad": pad}))
        fed: list[int] = []
        forward = model.forward

        def counting(ids, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            fed.append(ids.shape[0])
            return forward(ids, *a, **k)

        model.forward = counting
        try:
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
                engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                   request_id=str(i))
            outs = {}
            while engine.has_unfinished_requests():
                for r in engine.step():
                    if r.finished:
                        outs[r.request_id] = list(engine.requests.pop(r.request_id).seqs[0].output_ids)
        finally:
            del model.forward
        return outs, engine.stats, sum(fed)

    plain, plain_stats, plain_fed = serve(False)
    padded, padded_stats, padded_fed = serve(True)
    assert padded == plain and [len(plain[str(i)]) for i in range(4)] == lengths
    assert plain_stats.padding_row_steps == 0
    # Decode steps 2..12 of the batch: rows finish after 3, 6 and 9 tokens; every step keeps 4 rows.
    idle = sum(4 - sum(n >= t for n in lengths) for t in range(2, 13))
    assert padded_stats.padding_row_steps == idle > 0
    assert padded_fed == plain_fed + idle
    assert padded_stats.row_steps == plain_stats.row_steps

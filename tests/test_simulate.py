"""`lengthwise simulate`: the queueing simulator against the multi-bin formula, against the real engine,
and its workload, routing and step-model pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lengthwise.bench import simulate as sim
from lengthwise.bench.schedule import KEYS, PolicySpec
from lengthwise.bench.step_model import StepFeatures, StepModel
from lengthwise.cli import build_parser, main
from lengthwise.sched import make_policy


def _args(*argv: str):
    return build_parser().parse_args(["simulate", "--quiet", *argv])


def _run(*argv: str) -> list[dict]:
    return sim.run(_args(*argv))


# -- the analytic model ------------------------------------------------------------------------

@pytest.mark.parametrize("bins", [1, 2, 4, 8, 16, 32])
def test_multibin_throughput_matches_the_analytic_formula(bins):
    """Uniform lengths on [1, 20], B = 128, exact predictions, fixed equal-mass edges, a constant step
    time, all requests at once (a saturated queue): throughput is the formula's within 2%.

    The draw is stratified, exactly 128 * m lengths uniform within each bin, so every batch is full
    (a random draw leaves each bin a partial batch at the end, which the formula does not model)."""
    scale, batch, step_s = 8, 128, 0.01
    rng = np.random.default_rng(bins)
    per_bin = batch * max(1, 16 // bins)  # 16 to 32 full batches in all
    bounds = [1 + 19 * i / bins for i in range(bins + 1)]
    units = np.concatenate([rng.uniform(lo, hi, per_bin) for lo, hi in zip(bounds, bounds[1:], strict=False)])
    units = units[rng.permutation(len(units))]
    n = len(units)
    w = sim.Workload([str(i) for i in range(n)], [1] * n, [max(1, round(u * scale)) for u in units],
                     (units * scale).tolist(), [0.0] * n, ("uniform", "1", "20"))
    options = {"bins": bins, "batch_size": batch, "edges": [scale * e for e in bounds[1:-1]]}
    step = StepModel.constant(step_s)
    res = sim.simulate(w, lambda: make_policy("multibin", options), 1, "round-robin", step, 1 << 20, 16, 256,
                       100_000, 1 << 20, progress=False)
    args = _args("--lengths", "uniform:1:20", "--token-scale", str(scale))
    r = sim.record(res, w, PolicySpec("multibin", options), args, 1, step)
    assert r["bins"] == bins and r["servers"] == 1 and r["num_requests"] == n
    analytic = batch / (sim.multibin_batch_time(1, 20, batch, bins) * step_s * scale)
    assert r["analytic_requests_per_s"] == pytest.approx(analytic)
    assert r["requests_per_s"] == pytest.approx(analytic, rel=0.02)


def test_the_formula_rises_with_bins_towards_its_limit():
    times = [sim.multibin_batch_time(1, 20, 8, k) for k in (1, 2, 4, 8, 16, 32)]
    assert times == sorted(times, reverse=True)
    assert times[0] == pytest.approx((1 + 8 * 20) / 9)  # k = 1: E[max of 8 uniforms]
    assert sim.multibin_batch_time(1, 20, 8, 10 ** 9) == pytest.approx(10.5)


# -- the engine against the simulator ------------------------------------------------------------

WORDS = ["the", "sea", "is", "blue", "and", "a", "ship", "sails", "far", "away", "in", "night"]


def _alpaca_like(path, n: int, seed: int):
    g = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = " ".join(g.choice(WORDS, int(g.integers(3, 40))))
            f.write(json.dumps({"id": str(i), "prompt": prompt, "lengths": {"t0.0": int(g.integers(4, 90))}}) + "\n")
    return path


def test_the_simulator_replays_the_engines_schedule_step_for_step(random_model, tmp_path):
    """The same 48 requests through the real engine (`bench schedule`) and the simulator, on a
    cache small enough to preempt: every policy takes the same number of steps, preempts the same
    number of times and pads the same rows, so the simulator's only model is the step time.
    Deterministic (oracle predictions, all requests at once; the step time does not decide order)."""
    data = _alpaca_like(tmp_path / "d.jsonl", 48, 2)
    common = ["--model", str(random_model), "--max-num-seqs", "32", "--priorities", "0:1,1:2"]
    policies = ["static:batch_size=8", "continuous", "continuous-sjf", "priority", "fcfs:predictive=true",
                "sequence:batch_size=16", "multibin:bins=2,batch_size=8"]
    argv = [a for p in policies for a in ("--policy", p)]
    assert main(["bench", "schedule", *common, "--data", str(data), "--num-requests", "48", "--predictor", "oracle",
                 "--threads", "1", "--kv-cache-tokens", "1024", *argv, "--json", str(tmp_path / "e.json"),
                 "--out-dir", str(tmp_path / "e")]) == 0
    engine = {r["label"]: r for r in json.loads((tmp_path / "e.json").read_text())}
    simulated = {r["label"]: r for r in _run(*common, *argv, "--lengths", "file", "--data", str(data),
                                             "--num-requests", "48", "--num-blocks", "64",
                                             "--out-dir", str(tmp_path / "s"))}
    assert set(engine) == set(simulated) == set(policies)
    for name, e in engine.items():
        s = simulated[name]
        got = [s[k] for k in ("steps", "preemptions", "output_tokens", "padded_steps_per_request")]
        assert got == [e[k] for k in ("steps", "preemptions", "output_tokens", "padded_steps_per_request")], name
        assert {c: m["num_requests"] for c, m in s["priority_classes"].items()} == {
            c: m["num_requests"] for c, m in e["priority_classes"].items()}
    assert engine["continuous"]["preemptions"] > 0 and engine["priority"]["preemptions"] > 0  # the cache is tight


def test_a_calibrated_step_model_times_the_engine_within_reason(random_model, tmp_path):
    """Calibrate the step model on one workload, then serve another in the engine and in the
    simulator. How close the simulated throughput comes is a benchmark (docs/benchmarks.md, "Engine
    versus the calibrated simulator": within 15% there); this host's speed drifts by up to a third
    between windows of a few seconds, so here only a gross error (a unit, a missing term) fails:
    the ratio must lie within 0.5-2."""
    calib, data = _alpaca_like(tmp_path / "calib.jsonl", 48, 1), _alpaca_like(tmp_path / "d.jsonl", 48, 2)
    common = ["--model", str(random_model), "--max-num-seqs", "32"]
    argv = ["--policy", "static:batch_size=8", "--policy", "continuous"]
    steps = tmp_path / "steps.json"
    assert main(["simulate", "calibrate", *common, "--data", str(calib), "--num-requests", "48", "--threads", "1",
                 "--repeats", "1", "--out", str(steps)]) == 0
    model = StepModel.load(steps)
    assert model.source["kind"] == "calibrated" and model.source["steps"] > 50 and model.base_s > 0
    assert main(["bench", "schedule", *common, "--data", str(data), "--num-requests", "48", "--predictor", "oracle",
                 "--threads", "1", *argv, "--json", str(tmp_path / "e.json"), "--out-dir", str(tmp_path / "e")]) == 0
    engine = {r["policy"]: r for r in json.loads((tmp_path / "e.json").read_text())}
    simulated = {r["policy"]: r for r in _run(*common, *argv, "--lengths", "file", "--data", str(data),
                                              "--num-requests", "48", "--step-model", str(steps),
                                              "--out-dir", str(tmp_path / "s"))}
    for name in engine:
        ratio = simulated[name]["requests_per_s"] / engine[name]["requests_per_s"]
        assert 0.5 <= ratio <= 2.0, (name, ratio)


# -- determinism, routing, workloads ----------------------------------------------------------------

def test_deterministic_for_a_seed():
    argv = ["--policy", "continuous-sjf", "--policy", "multibin:bins=2", "--lengths", "lognormal:3:1",
            "--predictions", "lognormal:0.5", "--arrival", "gamma:50:0.5", "--num-requests", "300",
            "--step-model", "constant:0.002", "--num-blocks", "200"]
    a, b = _run(*argv, "--seed", "3"), _run(*argv, "--seed", "3")
    assert a == b
    assert _run(*argv, "--seed", "4") != a


def test_length_aware_router_gives_each_replica_one_range_of_predictions():
    w = sim.make_workload(_args("--lengths", "exponential:50", "--num-requests", "400", "--predictions",
                                "lognormal:0.3"))
    res = sim.simulate(w, lambda: make_policy("continuous"), 4, "length-aware", StepModel.constant(0.01),
                       1 << 16, 16, 64, 4096, 1 << 20, progress=False)
    pred = dict(zip(w.ids, w.predicted, strict=True))
    ranges = [[pred[i] for i, j in res.replica_of.items() if j == k] for k in range(4)]
    assert all(len(r) in range(80, 121) for r in ranges)  # equal-mass: about 100 each
    for lo, hi in zip(ranges, ranges[1:], strict=False):
        assert max(lo) <= min(hi)  # replica k's predictions all lie below replica k+1's
    rr = sim.simulate(w, lambda: make_policy("continuous"), 4, "round-robin", StepModel.constant(0.01),
                      1 << 16, 16, 64, 4096, 1 << 20, progress=False)
    assert [rr.replica_of[i] for i in w.ids[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert len(res.requests) == len(rr.requests) == 400
    assert all(r.finished for r in res.requests)


def test_least_loaded_router_balances_unfinished_requests():
    w = sim.make_workload(_args("--lengths", "uniform:1:30", "--num-requests", "64", "--arrival", "all"))
    res = sim.simulate(w, lambda: make_policy("continuous"), 4, "least-loaded", StepModel.constant(0.01),
                       1 << 16, 16, 64, 4096, 1 << 20, progress=False)
    counts = np.bincount(list(res.replica_of.values()), minlength=4)
    assert counts.tolist() == [16, 16, 16, 16]


def test_arrivals_lengths_and_prediction_noise_follow_their_specs():
    rng = np.random.default_rng(0)
    gaps = np.diff(sim.draw_arrivals("poisson:10", 20000, rng))
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    bursty = np.diff(sim.draw_arrivals("gamma:10:0.25", 20000, rng))
    assert bursty.mean() == pytest.approx(0.1, rel=0.05)
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4, rel=0.15)  # CV^2 = 1 / burstiness
    assert sim.draw_arrivals("all", 3, rng) == [0, 0, 0]
    lens = np.array(sim.draw_lengths("uniform:1:20", 20000, rng, 10))
    assert lens.min() >= 10 and lens.max() <= 200 and lens.mean() == pytest.approx(105, rel=0.02)
    assert np.mean(sim.draw_lengths("exponential:40", 20000, rng, 1)) == pytest.approx(40, rel=0.05)
    true = [100] * 20000
    noisy = np.array(sim.predict("lognormal:0.5", [str(i) for i in range(20000)], true, rng))
    assert np.log(noisy / 100).std() == pytest.approx(0.5, rel=0.05)
    assert sim.predict("oracle", ["a"], [7], rng) == [7.0]


def test_recorded_predictions_are_read_by_id(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "b", "predicted": 12.5}\n{"id": "a", "predicted": 3}\n')
    rng = np.random.default_rng(0)
    assert sim.predict(f"file:{path}", ["a", "b"], [1, 1], rng) == [3.0, 12.5]
    with pytest.raises(ValueError, match="no prediction"):
        sim.predict(f"file:{path}", ["a", "c"], [1, 1], rng)


@pytest.mark.parametrize("flag, value, match", [
    ("--lengths", "uniform:5", "takes 2"), ("--lengths", "normal:1:2", "unknown kind"),
    ("--arrival", "poisson:-1", "RATE"), ("--predictions", "lognormal:x", "numbers"),
    ("--step-model", "constant:-1", "base_s"), ("--servers", "0", "--servers"), ("--bins", "a,b", "--bins"),
    ("--policy", "nosuch", "unknown"), ("--policy", "multibin:colour=1", "no option"),
    ("--num-blocks", "1", "does not fit"), ("--priorities", "0:1,urgent:2", "--priorities"),
    ("--priorities", "0:1,0:2", "each class once"), ("--priorities", "0:0", "weight > 0"),
])
def test_bad_input_names_the_flag(flag, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _run(flag, value, "--num-requests", "8", "--out-dir", str(tmp_path))


def test_cli_writes_the_bench_schedule_keys_table_and_plot(tmp_path):
    out = tmp_path / "out"
    assert main(["simulate", "--quiet", "--policy", "static:batch_size=4", "--policy", "multibin", "--bins", "1,2",
                 "--batch-size", "4", "--servers", "1,2", "--num-requests", "64", "--json", str(tmp_path / "s.json"),
                 "--out-dir", str(out)]) == 0
    records = json.loads((tmp_path / "s.json").read_text())
    assert len(records) == 6  # (static, multibin k=1, multibin k=2) x (1, 2 servers)
    for r in records:
        assert set(KEYS) | {"servers", "bins", "analytic_requests_per_s", "bin_wait_mean_s"} <= set(r)
        assert r["num_requests"] == 64 and r["analytic_requests_per_s"] is not None
    assert [r["servers"] for r in records] == [1, 1, 1, 2, 2, 2]
    assert (out / "simulate.png").stat().st_size > 0 and "analytic" in (out / "simulate.md").read_text()


def test_priority_classes_serve_the_urgent_first_at_no_cost_in_throughput(tmp_path):
    """A fifth of the requests in class 0, near saturation: under `priority` and `continuous-sjf`
    the urgent class's first token comes at once and its latency halves; FCFS serves the classes
    alike; throughput stays within 5%. The report has a per-class table and panel."""
    runs = {r["policy"]: r for r in _run(
        "--policy", "fcfs", "--policy", "priority", "--policy", "continuous-sjf", "--lengths", "exponential:50",
        "--predictions", "lognormal:0.5", "--arrival", "poisson:6", "--max-num-seqs", "16",
        "--num-requests", "400", "--priorities", "0:1,1:4", "--out-dir", str(tmp_path))}
    fcfs = runs["fcfs"]["priority_classes"]
    assert sum(m["num_requests"] for m in fcfs.values()) == 400 and 60 <= fcfs["0"]["num_requests"] <= 100
    assert fcfs["0"]["latency_mean_s"] == pytest.approx(fcfs["1"]["latency_mean_s"], rel=0.2)
    for name in ("priority", "continuous-sjf"):
        classes = runs[name]["priority_classes"]
        assert classes["0"]["latency_mean_s"] < 0.6 * fcfs["0"]["latency_mean_s"], name
        assert classes["0"]["ttft_p99_s"] < 0.1 * fcfs["0"]["ttft_p99_s"], name
        assert classes["0"]["preempted"] == 0 and classes["1"]["preempted"] > 0, name
        assert runs[name]["requests_per_s"] == pytest.approx(runs["fcfs"]["requests_per_s"], rel=0.05)
    assert _run("--num-requests", "8", "--out-dir", str(tmp_path))[0]["priority_classes"] is None
    assert main(["simulate", "--quiet", "--policy", "priority", "--num-requests", "32", "--priorities", "0:1,1:1",
                 "--arrival", "poisson:50", "--out-dir", str(tmp_path / "o")]) == 0
    assert "| priority | 0 |" in (tmp_path / "o" / "simulate.md").read_text()
    assert (tmp_path / "o" / "simulate.png").stat().st_size > 0


# -- the step model -------------------------------------------------------------------------------

def test_step_model_fit_recovers_known_coefficients_and_stays_non_negative():
    rng = np.random.default_rng(0)
    feats = [StepFeatures(int(r), int(p), int(c)) for r, p, c in zip(rng.integers(1, 64, 200),
                                                                       rng.integers(0, 500, 200),
                                                                       rng.integers(0, 20000, 200), strict=True)]
    true = StepModel(0.02, 0.001, 0.0002, 1e-6)
    secs = [true(f) * (1 + 0.01 * rng.standard_normal()) for f in feats]
    fit = StepModel.fit(feats, secs)
    for name in ("base_s", "per_row_s", "per_prefill_token_s", "per_context_token_s"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=0.1)
    assert abs(fit.source["total_error"]) < 0.01
    # A feature that only adds noise with a negative slope is dropped, not given a negative cost.
    neg = StepModel.fit(feats, [0.01 + 0.001 * f.rows - 1e-7 * f.context_tokens for f in feats])
    assert neg.per_context_token_s == 0 and neg.per_row_s > 0


def test_step_model_round_trips_and_rejects_bad_files(tmp_path):
    m = StepModel(0.01, 0.002, source={"kind": "test"})
    assert StepModel.load(m.save(tmp_path / "m.json")) == m
    assert StepModel.parse("constant:0.5") == StepModel.constant(0.5)
    (tmp_path / "bad.json").write_text('{"base_s": 1, "colour": 2}')
    with pytest.raises(ValueError, match="only"):
        StepModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot be read"):
        StepModel.parse(str(tmp_path / "missing.json"))


def test_step_model_fits_the_two_kinds_of_step_apart_and_round_trips(tmp_path):
    """Steps with a long prefill chunk cost more per row than short steps (on the CPU they leave
    the fused decode forward): `split` fits each kind its own coefficients and `__call__` picks."""
    rng = np.random.default_rng(1)
    short = StepModel(0.02, 0.001, 0.0002, 1e-6)
    long = StepModel(0.03, 0.003, 0.003, 2e-6)  # op by op: a decode row costs what a prompt token does
    feats, secs = [], []
    for _ in range(300):
        rows, prefill, context = int(rng.integers(1, 64)), int(rng.integers(0, 200)), int(rng.integers(0, 20000))
        query = int(rng.integers(1, 64)) if prefill else 1
        f = StepFeatures(rows, prefill, context, query, rows + prefill)
        feats.append(f)
        secs.append((long if query > 16 or f.tokens > 256 else short)(f))
    fit = StepModel.fit(feats, secs, split=(16, 256))
    assert fit.long is not None and (fit.long_query_tokens, fit.long_step_tokens) == (16, 256)
    for part, true in ((fit, short), (fit.long, long)):
        for name in ("base_s", "per_row_s", "per_prefill_token_s", "per_context_token_s"):
            assert getattr(part, name) == pytest.approx(getattr(true, name), rel=1e-6)
    assert fit(StepFeatures(8, 0, 800, 1, 8)) == pytest.approx(short(StepFeatures(8, 0, 800)))
    assert fit(StepFeatures(8, 40, 800, 40, 48)) == pytest.approx(long(StepFeatures(8, 40, 800)))
    assert fit.long.per_row_s == fit.long.per_prefill_token_s  # one cost per fed token
    assert fit(StepFeatures(300, 0, 800, 1, 300)) == pytest.approx(long(StepFeatures(300, 0, 800)))
    assert fit.source["mean_abs_error_s"] < 1e-9
    one = StepModel.fit(feats, secs)  # a single model cannot fit both
    assert one.long is None and one.source["mean_abs_error_s"] > 1e-3
    back = StepModel.load(fit.save(tmp_path / "split.json"))
    assert back == fit and back.coefficients()["long"]["per_row_s"] == pytest.approx(0.003)
    # Too few steps of one kind: one model for all, rather than a fit on a handful.
    kinds = [fit.is_long(f) for f in feats]
    pick = [i for i, k in enumerate(kinds) if not k][:40] + [i for i, k in enumerate(kinds) if k][:3]
    few = StepModel.fit([feats[i] for i in pick], [secs[i] for i in pick], split=(16, 256))
    assert few.long is None and few.long_query_tokens is None
    (tmp_path / "half.json").write_text('{"base_s": 1, "long": {"base_s": 2}}')
    with pytest.raises(ValueError, match="long_query_tokens"):
        StepModel.load(tmp_path / "half.json")


def test_prefix_caching_finds_the_shared_prompt_prefix_as_the_engine_does():
    """Real prompt tokens that share a 48-token template: with prefix caching (the engine's
    default) later requests feed only their own tokens; synthetic prompts never share a block."""
    n = 24
    prompts = [[5] * 48 + [100 + i] * 8 for i in range(n)]
    w = sim.Workload([str(i) for i in range(n)], [len(p) for p in prompts], [4] * n, [4.0] * n, [0.0] * n,
                     ("file",), prompts)
    prefill_only = StepModel(1e-3, per_prefill_token_s=1e-3)

    def elapsed(workload, caching):
        return sim.simulate(workload, lambda: make_policy("static", {"batch_size": 1}), 1, "round-robin",
                            prefill_only, 4096, 16, 8, 2048, 1 << 20, progress=False,
                            prefix_caching=caching).elapsed_s

    without, with_cache = elapsed(w, False), elapsed(w, True)
    # 24 x 56 prompt tokens without; with, 48 of the first prompt's tokens once and 8 (+ the
    # uncached remainder) for the others: about 60% less prefill time.
    assert with_cache < 0.6 * without
    synthetic = sim.Workload(w.ids, w.prompt_lens, w.lengths, w.predicted, w.arrivals, ("file",))
    assert synthetic.prompt(3)[0] != synthetic.prompt(4)[0]
    assert elapsed(synthetic, True) == pytest.approx(elapsed(synthetic, False))

"""`lengthwise simulate`: the scheduling policies on a simulated clock, at any scale.

    lengthwise simulate --policy multibin --bins 1,2,4,8,16,32 --batch-size 128 --lengths uniform:1:20 \\
        --token-scale 10 --step-model constant:0.1 --arrival all --num-requests 20000 --json sim.json
    lengthwise simulate --policy continuous --policy sequence --data dev.jsonl --predictions lognormal:0.5 \\
        --step-model steps.json --servers 8 --router length-aware --arrival poisson:20
    lengthwise simulate calibrate --model llama-100m --data dev.jsonl --out steps.json

A discrete-event simulator. Each replica is the engine's own `Scheduler` with the engine's own
policy object (`sched/`, unchanged); only the model is fake: every sampled sequence gains one
token per step and stops at its true length. A step's duration comes from a `StepModel`: a
constant per step (the multi-bin paper's model) or one fitted to the real engine's steps by
`simulate calibrate`. A router sends each arriving request to one of `--servers` replicas:
round-robin, least-loaded (fewest unfinished requests), or length-aware (replica i owns the i-th
equal-mass range of predicted lengths: multi-bin batching across machines).

Workloads: lengths from an alpaca-lengths file (`--data`, `--lengths file`) or a distribution
(`uniform:A:B`, `exponential:MEAN`, `lognormal:MU:SIGMA`, drawn as real numbers and multiplied by
`--token-scale` into whole tokens, so that a fine scale approximates continuous service times);
arrivals all at once, Poisson, or gamma with a burstiness factor (vLLM's benchmark); predictions
exact (`oracle`), with lognormal noise of a given sigma, or read from a predictor's recorded
`{id, predicted}` JSONL (`lengthwise predictor eval --predictions-out`).

Reports the same keys as `lengthwise bench schedule` (table, JSON, PNG) plus `servers`, `bins`,
per-bin mean waiting time, and `analytic_requests_per_s` where the multi-bin throughput formula
applies (uniform lengths, exact predictions, constant step time, static or multi-bin batches).
Deterministic for a `--seed`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lengthwise.argtypes import output_file, positive_int
from lengthwise.bench.schedule import (
    HARD_CAP,
    PolicySpec,
    draw_priorities,
    format_class_table,
    format_table,
    parse_policy,
    per_class_latency,
)
from lengthwise.bench.step_model import StepModel, step_features
from lengthwise.bench.workloads import read_alpaca_records
from lengthwise.sampling_params import SamplingParams
from lengthwise.sched import Scheduler, make_policy
from lengthwise.sequence import Request

ROUTERS = ("round-robin", "least-loaded", "length-aware")


# -- the workload --------------------------------------------------------------------------------

@dataclass
class Workload:
    """Per request: id, prompt tokens, true output length, predicted length and arrival time."""

    ids: list[str]
    prompt_lens: list[int]
    lengths: list[int]
    predicted: list[float]
    arrivals: list[float]
    distribution: tuple[str, ...] = ()  # the parsed `--lengths` spec (for the analytic model)
    # The prompts' real token ids (with `--model`), so that prefix caching finds what the engine's
    # finds (alpaca prompts share a template); None: synthetic prompts that share nothing.
    prompt_ids: list[list[int]] | None = None
    priorities: list[int] | None = None  # per request, from `--priorities` (None: all 0)

    def prompt(self, i: int) -> list[int]:
        """Request `i`'s prompt tokens: the real ones, or a synthetic prompt whose first token is
        unique to it (prefix-cache keys chain from the first block, so no two share a block)."""
        if self.prompt_ids is not None:
            return self.prompt_ids[i]
        return [2 + i, *[1] * (self.prompt_lens[i] - 1)]


def _parts(spec: str, flag: str, kinds: dict[str, int]) -> tuple[str, list[float]]:
    kind, *args = spec.split(":")
    if kind not in kinds:
        raise ValueError(f"{flag} {spec!r}: unknown kind {kind!r}; one of {sorted(kinds)}")
    if len(args) != kinds[kind]:
        raise ValueError(f"{flag} {spec!r}: {kind} takes {kinds[kind]} ':'-separated number(s)")
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: parameters must be numbers") from None
    return kind, values


def draw_lengths(spec: str, n: int, rng: np.random.Generator, scale: float) -> list[int]:
    """`n` whole-token lengths from `uniform:A:B`, `exponential:MEAN` or `lognormal:MU:SIGMA` times `scale`."""
    kind, p = _parts(spec, "--lengths", {"uniform": 2, "exponential": 1, "lognormal": 2})
    if kind == "uniform":
        if not 0 < p[0] <= p[1]:
            raise ValueError(f"--lengths {spec!r}: need 0 < A <= B")
        x = rng.uniform(p[0], p[1], n)
    elif kind == "exponential":
        if p[0] <= 0:
            raise ValueError(f"--lengths {spec!r}: MEAN must be > 0")
        x = rng.exponential(p[0], n)
    else:
        if p[1] < 0:
            raise ValueError(f"--lengths {spec!r}: SIGMA must be >= 0")
        x = rng.lognormal(p[0], p[1], n)
    return [max(1, int(round(v * scale))) for v in x]


def draw_arrivals(spec: str, n: int, rng: np.random.Generator) -> list[float]:
    """`all` (every request at 0), `poisson:RATE` or `gamma:RATE:BURSTINESS` (requests/s; burstiness 1
    is Poisson, below 1 burstier), as vLLM's benchmark draws them."""
    if spec == "all":
        return [0.0] * n
    kind, p = _parts(spec, "--arrival", {"poisson": 1, "gamma": 2})
    rate = p[0]
    if rate <= 0:
        raise ValueError(f"--arrival {spec!r}: RATE must be > 0")
    if kind == "poisson":
        gaps = rng.exponential(1 / rate, n)
    else:
        if p[1] <= 0:
            raise ValueError(f"--arrival {spec!r}: BURSTINESS must be > 0")
        gaps = rng.gamma(p[1], 1 / (rate * p[1]), n)
    return np.cumsum(gaps).tolist()


def predict(spec: str, ids: list[str], lengths: list[int], rng: np.random.Generator) -> list[float]:
    """`oracle`, `lognormal:SIGMA` (true length x e^N(0, SIGMA)) or `file:PATH` ({id, predicted} JSONL)."""
    if spec == "oracle":
        return [float(n) for n in lengths]
    if spec.startswith("file:"):
        path = Path(spec[5:])
        if not path.is_file():
            raise ValueError(f"--predictions {spec!r}: no such file")
        table: dict[str, float] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                table[str(rec["id"])] = float(rec["predicted"])
        missing = [i for i in ids if i not in table]
        if missing:
            raise ValueError(f"--predictions {spec!r} has no prediction for {len(missing)} request(s), "
                             f"e.g. {missing[0]}")
        return [table[i] for i in ids]
    kind, p = _parts(spec, "--predictions", {"lognormal": 1})
    if p[0] < 0:
        raise ValueError(f"--predictions {spec!r}: SIGMA must be >= 0")
    return (np.asarray(lengths, dtype=float) * np.exp(rng.normal(0.0, p[0], len(lengths)))).tolist()


def make_workload(args: argparse.Namespace) -> Workload:
    """The requests of one simulation, deterministic for `args.seed`."""
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    if args.lengths is None:  # --data alone means its lengths: never read a file only to ignore it
        args.lengths = "file" if args.data is not None else "uniform:1:20"
    elif args.data is not None and args.lengths != "file":
        raise ValueError(f"--data is only read with --lengths file, not --lengths {args.lengths}")
    if args.lengths == "file":
        if args.data is None:
            raise ValueError("--lengths file needs --data (an alpaca-lengths JSONL file)")
        ids, prompts, lengths = map(list, zip(*read_alpaca_records(args.data, n, args.length_key), strict=True))
        lengths = [min(x, HARD_CAP) for x in lengths]  # `bench schedule`'s cap, the first paper's
        prompt_ids = None
        if args.prompt_tokens:
            prompt_lens = [args.prompt_tokens] * n
        elif args.model:  # the served model's own token counts, as the engine sees them
            from lengthwise.bench.presets import resolve_model
            from lengthwise.tokenizer import Tokenizer

            tok = Tokenizer(resolve_model(args.model)[0])
            prompt_ids = [tok.encode(p) for p in prompts]
            prompt_lens = [len(t) for t in prompt_ids]
        else:  # about 4 characters per token, as for English BPE vocabularies
            prompt_lens = [max(1, len(p) // 4) for p in prompts]
        dist: tuple[str, ...] = ("file",)
    else:
        ids = [str(i) for i in range(n)]
        prompt_ids = None
        lengths = draw_lengths(args.lengths, n, rng, args.token_scale)
        prompt_lens = [args.prompt_tokens or 1] * n
        dist = tuple(args.lengths.split(":"))
    predicted = predict(args.predictions, ids, lengths, rng)
    arrivals = draw_arrivals(args.arrival, n, rng)
    # Their own stream, as `bench schedule` draws them: request i has the same class in both.
    priorities = draw_priorities(args.priorities, n, args.seed) if args.priorities else None
    return Workload(ids, prompt_lens, lengths, predicted, arrivals, dist, prompt_ids, priorities)


# -- the simulator -------------------------------------------------------------------------------

class SimClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Replica:
    """One simulated engine: the real scheduler and policy, a fake model, a simulated clock."""

    scheduler: Scheduler
    clock: SimClock
    step_model: StepModel
    poll_s: float
    free_at: float = 0.0   # when the step in flight ends
    steps: int = 0
    row_steps: int = 0
    unfinished: int = 0
    idle_polls: int = 0    # consecutive steps that scheduled nothing

    def add(self, request: Request, now: float) -> None:
        self.scheduler.add(request)
        self.unfinished += 1
        self.free_at = max(self.free_at, now)

    def step(self, true_len: dict[str, int], admitted_at: dict[str, float]) -> list[Request]:
        """Run the step that starts at `free_at`; returns the requests it finished."""
        now = self.clock.t = self.free_at
        out = self.scheduler.schedule()
        for r in out.restarted:  # FCR recompute: the discarded tokens were never seen
            r.first_token_time = None
        if not out.chunks:  # a batch policy holding requests back (e.g. a bin not yet due): look again later
            self.free_at = now + self.poll_s
            self.idle_polls += 1
            return []
        self.idle_polls = 0
        dt = self.step_model(step_features(out.chunks, out.padding_rows))
        end = self.free_at = now + dt
        self.steps += 1
        if any(c.sample for c in out.chunks):  # as the engine counts them: steps that sampled
            self.row_steps += out.rows
        done = []
        for c in out.chunks:
            admitted_at.setdefault(c.request.request_id, now)
            if not c.sample:
                continue
            r = c.request
            for seq in (r.active_seqs if c.seq is None else [c.seq]):
                seq.output_ids.append(7)
                if r.first_token_time is None:
                    r.first_token_time = end
                n = len(seq.output_ids)
                if n >= true_len[r.request_id] or n >= r.max_tokens:
                    self.scheduler.finish_sequence(seq, "stop" if n >= true_len[r.request_id] else "length")
                    if r.finished:
                        r.finish_time = end
                        self.unfinished -= 1
                        done.append(r)
        return done


def route(router: str, replicas: list[Replica], i: int, predicted: float, edges: list[float]) -> int:
    if router == "round-robin":
        return i % len(replicas)
    if router == "least-loaded":
        return min(range(len(replicas)), key=lambda j: (replicas[j].unfinished, j))
    return int(np.searchsorted(edges, predicted, side="left"))  # length-aware: replica j owns bin j


def equal_mass_edges(values: list[float], parts: int) -> list[float]:
    """The `parts - 1` inner edges that split `values` into equal-mass ranges."""
    return np.quantile(np.asarray(values, dtype=float), [j / parts for j in range(1, parts)]).tolist()


@dataclass
class SimResult:
    requests: list[Request]
    replicas: list[Replica]
    admitted_at: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    replica_of: dict[str, int] = field(default_factory=dict)  # request id -> the replica it was routed to


def simulate(w: Workload, policy_factory: Callable[[], Any], servers: int, router: str, step_model: StepModel,
             num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
             max_tokens: int, desc: str = "", progress: bool = True, prefix_caching: bool = True) -> SimResult:
    """Serve workload `w` on `servers` replicas, each with a fresh policy from `policy_factory`.
    `prefix_caching` as the engine's (on by default there too)."""
    if servers < 1:
        raise ValueError(f"--servers must be >= 1, got {servers}")
    if router not in ROUTERS:
        raise ValueError(f"--router must be one of {ROUTERS}, got {router!r}")
    poll = max(step_model.base_s, 1e-3)
    replicas = []
    for _ in range(servers):
        clock = SimClock()
        replicas.append(Replica(Scheduler(policy_factory(), num_blocks, block_size, max_num_seqs,
                                          max_num_batched_tokens, clock=clock, enable_prefix_caching=prefix_caching),
                                clock, step_model, poll))
    for i, (p, n) in enumerate(zip(w.prompt_lens, w.lengths, strict=True)):
        if -(-p // block_size) + -(-min(n, max_tokens) // block_size) > num_blocks:
            raise ValueError(f"request {w.ids[i]} ({p} prompt + {n} output tokens) does not fit a replica's "
                             f"--num-blocks {num_blocks} of {block_size} tokens")
    edges = equal_mass_edges(w.predicted, servers) if router == "length-aware" else []
    true_len = dict(zip(w.ids, w.lengths, strict=True))
    order = sorted(range(len(w.ids)), key=lambda i: (w.arrivals[i], i))
    requests: list[Request] = []
    admitted_at: dict[str, float] = {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    replica_of: dict[str, int] = {}
    nxt, finished = 0, 0
    bar = tqdm(total=len(order), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    while finished < len(order):
        busy = [r for r in replicas if r.unfinished]
        step_at = min((r.free_at for r in busy), default=math.inf)
        if nxt < len(order) and w.arrivals[order[nxt]] <= step_at:
            i = order[nxt]
            t = w.arrivals[i]
            req = Request(w.ids[i], w.prompt(i), params, t, max_tokens,
                          priority=w.priorities[i] if w.priorities else 0)
            req.predicted_length = w.predicted[i]
            requests.append(req)
            j = replica_of[req.request_id] = route(router, replicas, nxt, w.predicted[i], edges)
            replicas[j].add(req, t)
            nxt += 1
            continue
        replica = min(busy, key=lambda r: r.free_at)
        done = replica.step(true_len, admitted_at)
        if replica.idle_polls > 100_000 and nxt >= len(order) and not replica.scheduler.running:
            raise RuntimeError(f"the {replica.scheduler.policy.name} policy holds {replica.unfinished} requests "
                               "back with nothing running and nothing left to arrive")  # a policy bug
        finished += len(done)
        bar.update(len(done))
    bar.close()
    elapsed = max((r.finish_time for r in requests), default=0.0)  # the clock starts at 0, as the engine's run
    return SimResult(requests, replicas, admitted_at, elapsed, replica_of)


# -- analytic model and report -------------------------------------------------------------------

def multibin_batch_time(a: float, b: float, batch: int, bins: int) -> float:
    """E[service time of a batch] for `batch` i.i.d. U(a, b) lengths in one of `bins` equal-mass bins
    (seeds.md): (a + b) / 2 + (b - a)(B - 1) / (2k(B + 1)). k = 1 is static batching: (a + Bb) / (B + 1)."""
    return (a + b) / 2 + (b - a) * (batch - 1) / (2 * bins * (batch + 1))


def analytic_requests_per_s(w: Workload, spec: PolicySpec, args: argparse.Namespace, servers: int,
                            step_model: StepModel) -> float | None:
    """The multi-bin formula's saturated throughput, where it applies; else None."""
    if (w.distribution[:1] != ("uniform",) or args.predictions != "oracle" or spec.name not in ("static", "multibin")
            or step_model.per_row_s or step_model.per_prefill_token_s or step_model.per_context_token_s):
        return None
    a, b = float(w.distribution[1]), float(w.distribution[2])
    batch = int(spec.options.get("batch_size", 16))
    bins = int(spec.options.get("bins", 4)) if spec.name == "multibin" else 1
    unit_s = step_model.base_s * args.token_scale  # seconds per unit of length
    return servers * batch / (multibin_batch_time(a, b, batch, bins) * unit_s)


def record(result: SimResult, w: Workload, spec: PolicySpec, args: argparse.Namespace, servers: int,
           step_model: StepModel) -> dict[str, Any]:
    """The run's metrics, with `lengthwise bench schedule`'s keys (vLLM's definitions)."""
    done = result.requests
    tokens = sum(len(s.output_ids) for r in done for s in r.seqs)
    lat = np.array([r.finish_time - r.arrival_time for r in done])
    ttft = np.array([r.first_token_time - r.arrival_time for r in done])
    tpot = [(r.finish_time - r.first_token_time) / (n - 1) for r in done
            if (n := sum(len(s.output_ids) for s in r.seqs)) > 1]
    row_steps = max(1, sum(r.row_steps for r in result.replicas))
    elapsed = max(result.elapsed_s, 1e-12)
    finish = np.sort([r.finish_time for r in done])
    lo, hi = finish[len(finish) // 10], finish[(len(finish) * 9) // 10]  # the middle 80% of completions
    steady = (np.searchsorted(finish, hi, "right") - np.searchsorted(finish, lo, "right")) / max(hi - lo, 1e-12)
    bins = int(spec.options.get("bins", 4)) if spec.name == "multibin" else None
    waits = [result.admitted_at[r.request_id] - r.arrival_time for r in done]
    bin_wait = None
    if bins:
        edges = equal_mass_edges(w.predicted, bins)
        idx = np.searchsorted(edges, [r.predicted_length for r in done], side="left")
        bin_wait = [float(np.mean([x for x, j in zip(waits, idx, strict=True) if j == b] or [0.0]))
                    for b in range(bins)]
    return {"policy": spec.name, "options": spec.options, "label": spec.label,
            "requests_per_s": len(done) / elapsed, "output_tokens_per_s": tokens / elapsed,
            "steady_requests_per_s": float(steady),
            "padded_steps_per_request": row_steps / len(done), "effective_token_ratio": tokens / row_steps,
            "failure_rate": sum(r.num_collected > 0 for r in done) / len(done),
            "preemptions": sum(r.scheduler.num_preemptions for r in result.replicas),
            "latency_mean_s": float(lat.mean()), "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)), "ttft_mean_s": float(ttft.mean()),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "tpot_mean_s": float(np.mean(tpot)) if tpot else 0.0,
            "elapsed_s": elapsed, "num_requests": len(done), "output_tokens": tokens,
            "steps": sum(r.steps for r in result.replicas), "servers": servers, "bins": bins,
            "router": args.router, "bin_wait_mean_s": bin_wait, "wait_mean_s": float(np.mean(waits)),
            "analytic_requests_per_s": analytic_requests_per_s(w, spec, args, servers, step_model),
            "priority_classes": per_class_latency(done, dict(zip(w.ids, w.priorities, strict=True)))
            if w.priorities else None,
            "lengths": args.lengths, "arrival": args.arrival, "predictions": args.predictions,
            "step_model": step_model.coefficients(), "seed": args.seed}


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag} {text!r}: values must be >= 1")
    return values


def expand_specs(args: argparse.Namespace) -> list[PolicySpec]:
    """`--policy` specs, with `--bins` and `--batch-size` filled into the policies that take them
    (a comma list of bins sweeps: one spec per value)."""
    specs = []
    for text in args.policy or ["multibin"]:
        spec = parse_policy(text)
        if spec.predictor:
            raise ValueError(f"--policy {text!r}: the simulator takes predictions from --predictions, not '@'")
        if args.batch_size is not None and spec.name in ("static", "multibin") and "batch_size" not in spec.options:
            spec.options["batch_size"] = args.batch_size
        if spec.name == "multibin" and "bins" not in spec.options and args.bins:
            for k in _int_list(args.bins, "--bins"):
                specs.append(PolicySpec(spec.name, {**spec.options, "bins": k}))
            continue
        specs.append(spec)
    return specs


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    step_model = StepModel.parse(args.step_model)
    specs = expand_specs(args)
    for spec in specs:
        make_policy(spec.name, spec.options)  # bad names and options fail before any work
    w = make_workload(args)
    results = []
    for servers in _int_list(args.servers, "--servers"):
        for spec in specs:
            label = f"{spec.label} x{servers}" if servers > 1 else spec.label
            res = simulate(w, lambda s=spec: make_policy(s.name, s.options), servers, args.router, step_model,
                           args.num_blocks, args.block_size, args.max_num_seqs, args.max_num_batched_tokens,
                           args.max_tokens, desc=label, progress=not args.quiet,
                           prefix_caching=not args.no_prefix_caching)
            rec = record(res, w, spec, args, servers, step_model)
            rec["label"] = label
            results.append(rec)
    return results


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Throughput (the analytic formula's beside it where it applies) and mean latency per run, and,
    when the runs sweep multi-bin's k, throughput against k: simulated, steady and analytic."""
    from lengthwise.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    labels = [r["label"] for r in results]
    sweeps: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if r["policy"] == "multibin":
            sweeps.setdefault(r["servers"], []).append(r)
    sweeps = {k: v for k, v in sweeps.items() if len(v) > 1}
    classes = sorted({c for r in results for c in (r.get("priority_classes") or {})}, key=int)
    cols = 2 + bool(sweeps) + bool(classes)
    fig, axes = plt.subplots(1, cols, figsize=(6.5 * cols, 0.45 * len(labels) + 2.5))
    y = np.arange(len(labels))
    axes[0].barh(y - 0.2, [r["requests_per_s"] for r in results], 0.4, label="simulated")
    analytic = [r["analytic_requests_per_s"] or 0 for r in results]
    if any(analytic):
        axes[0].barh(y + 0.2, analytic, 0.4, label="analytic (multi-bin formula)")
        axes[0].legend()
    axes[0].set_yticks(y, labels)
    axes[0].set_title("requests/s")
    axes[1].barh(y, [r["latency_mean_s"] for r in results])
    axes[1].set_yticks([])
    axes[1].set_title("mean latency (s)")
    for ax in axes[:2]:
        ax.invert_yaxis()
    if sweeps:
        ax = axes[2]
        for servers, runs in sorted(sweeps.items()):
            runs = sorted(runs, key=lambda r: r["bins"])
            ks = [r["bins"] for r in runs]
            ax.plot(ks, [r["requests_per_s"] for r in runs], "o-", label=f"{servers} server(s): simulated")
            ax.plot(ks, [r["steady_requests_per_s"] for r in runs], "s--", label=f"{servers}: steady state")
            if all(r["analytic_requests_per_s"] for r in runs):
                ax.plot(ks, [r["analytic_requests_per_s"] for r in runs], "k:", label=f"{servers}: analytic")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bins k")
        ax.set_title("multi-bin throughput (requests/s)")
        ax.legend(fontsize=8)
    if classes:
        ax = axes[-1]
        h = 0.8 / len(classes)
        for k, c in enumerate(classes):
            ax.barh(y - 0.4 + h * (k + 0.5), [(r.get("priority_classes") or {}).get(c, {}).get("ttft_mean_s", 0)
                                             for r in results], h, label=f"priority {c}")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_title("mean time to first token by priority class (s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_sim_table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | servers | req/s | analytic req/s | steady req/s | latency mean/p99 s | TTFT mean s | "
             "effective | per-bin wait s |", "|" + "---|" * 9]
    for r in results:
        a = r["analytic_requests_per_s"]
        waits = " / ".join(f"{x:.1f}" for x in r["bin_wait_mean_s"]) if r["bin_wait_mean_s"] else "-"
        lines.append(f"| {r['label']} | {r['servers']} | {r['requests_per_s']:.3f} | "
                     f"{f'{a:.3f}' if a else '-'} | {r['steady_requests_per_s']:.3f} | "
                     f"{r['latency_mean_s']:.1f} / {r['latency_p99_s']:.1f} | {r['ttft_mean_s']:.1f} | "
                     f"{r['effective_token_ratio']:.1%} | {waits} |")
    classes = format_class_table(results)
    return "\n".join(lines) + (f"\n\n{classes}" if classes else "")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", action="append", help="NAME[:key=value,...] as in bench schedule; repeat for "
                   "several (default multibin)")
    p.add_argument("--bins", default=None, help="multibin: bins, or a comma list to sweep (e.g. 1,2,4,8)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="static/multibin batch size B")
    p.add_argument("--servers", default="1", help="replicas behind the router, or a comma list to sweep")
    p.add_argument("--router", default="round-robin", choices=ROUTERS)
    p.add_argument("--lengths", default=None, help="file (with --data), uniform:A:B, exponential:MEAN, "
                   "lognormal:MU:SIGMA (default: file with --data, else uniform:1:20)")
    p.add_argument("--token-scale", type=float, default=1.0, help="tokens per unit of a drawn length (default 1)")
    p.add_argument("--data", type=Path, default=None, help="alpaca-lengths JSONL for --lengths file")
    p.add_argument("--length-key", default="t0.0", help="which length of each record (default t0.0)")
    p.add_argument("--prompt-tokens", type=positive_int, default=None, help="prompt length of every request "
                   "(default: with --data, the --model tokenizer's count, else characters / 4; else 1)")
    p.add_argument("--model", default=None, help="checkpoint or preset whose tokenizer counts --data prompts")
    p.add_argument("--predictions", default="oracle", help="oracle, lognormal:SIGMA, or file:PATH")
    p.add_argument("--priorities", default=None, metavar="CLASS:WEIGHT,...", help="requests' priority classes "
                   "(lower first, under the priority and continuous-sjf policies), e.g. 0:1,1:9; reports "
                   "each class's latency")
    p.add_argument("--arrival", default="all", help="all, poisson:RATE, gamma:RATE:BURSTINESS")
    p.add_argument("--num-requests", type=positive_int, default=1024)
    p.add_argument("--step-model", default="constant:0.05", help="constant:SECONDS or a JSON file from "
                   "`simulate calibrate` (default constant:0.05)")
    p.add_argument("--num-blocks", type=int, default=1 << 20, help="KV blocks per replica (default: unlimited)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step (the "
                   "engine's default, 2048)")
    p.add_argument("--max-tokens", type=int, default=1 << 20, help="per-request cap (default: none)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the replicas' prefix caching off (the "
                   "engine's is on by default; with --model the prompts' real tokens find the same hits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=output_file, default=None, help="write one record per run here")
    p.add_argument("--out-dir", type=Path, default=Path("simulate-results"), help="table and PNG (default "
                   "simulate-results)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.token_scale <= 0:
        raise ValueError(f"--token-scale must be > 0, got {args.token_scale}")
    results = run(args)
    table = format_sim_table(results) + "\n\n" + format_table(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "simulate.md").write_text(table + "\n")
    print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    png = plot(results, args.out_dir / "simulate.png")
    if png is not None:
        print(f"[simulate] plot: {png}", file=sys.stderr)
    return 0

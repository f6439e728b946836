"""`lengthwise bench schedule`: every scheduling policy on one workload, in one executor, one run.

The workload is alpaca-lengths: each request's prompt, and its true `t0.0` length reproduced with
`eos_after` (each sample ends exactly there, as if the model emitted EOS), under the paper's hard
cap of 512 (`max_tokens`). The true length is hidden from the predictor and the policy; the
predictor (`--predictor DIR`, or `oracle`) runs inside the engine, so its time counts. Arrivals
are all at once (the paper's setting) or Poisson at `--request-rate`.

Per policy: requests/s, output tokens/s, padded steps per request (row-steps / requests: the
first paper's "avg length"), effective token ratio (real tokens / row-steps), FCR failure rate,
preemptions, and latency, TTFT and TPOT with vLLM's `benchmark_serving` definitions.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lengthwise.argtypes import output_file, positive_float, positive_int
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot
from lengthwise.bench.workloads import read_alpaca_lengths

HARD_CAP = 512
DEFAULT_POLICIES = ["static:batch_size=16", "sequence", "sequence:vbs=false,fcr=null,vbs_fixed=16",
                    "sequence:fcr=continue", "continuous", "continuous-sjf", "continuous:predictive=true",
                    "multibin:bins=4,batch_size=16"]
KEYS = ["policy", "options", "requests_per_s", "output_tokens_per_s", "padded_steps_per_request",
        "effective_token_ratio", "failure_rate", "preemptions", "latency_mean_s", "latency_p50_s", "latency_p99_s",
        "ttft_mean_s", "ttft_p99_s", "tpot_mean_s"]


@dataclass
class PolicySpec:
    name: str
    options: dict[str, Any]
    predictor: str | None = None  # overrides --predictor for this run

    @property
    def label(self) -> str:
        """The spec as `--policy` takes it back (a bare word stays bare: `vbs=paper`, not `vbs="paper"`)."""
        return self.name + (":" + ",".join(f"{k}={_option_text(v)}" for k, v in self.options.items())
                            if self.options else "") + (f"@{self.predictor}" if self.predictor else "")


def _option_text(value: Any) -> str:
    text = json.dumps(value)
    if isinstance(value, str) and value and not any(c in value for c in ",=@[]{}\"' \\"):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value  # parse_policy reads a word that is not JSON as this same string
    return text


def parse_policy(text: str) -> PolicySpec:
    """`NAME`, `NAME:key=value,key=value` (values parsed as JSON where they can be), and an optional
    `@PREDICTOR` suffix (a directory or `oracle`) that replaces `--predictor` for this run."""
    text, _, predictor = text.partition("@")
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, _split_options(rest)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--policy {text!r}: option {item!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return PolicySpec(name, options, predictor or None)


def _split_options(text: str) -> list[str]:
    """`a=1,b=[2,3]` -> `["a=1", "b=[2,3]"]`: commas inside brackets belong to a JSON value."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def draw_priorities(spec: str, n: int, seed: int) -> list[int]:
    """`n` priority classes drawn from `CLASS:WEIGHT,...` (e.g. `0:1,1:9`: a tenth urgent), from a
    stream of their own (`seed` + 1), so that `bench schedule` and `simulate` give request i the
    same class."""
    classes, weights = [], []
    for part in spec.split(","):
        cls, sep, weight = part.partition(":")
        try:
            classes.append(int(cls))
            weights.append(float(weight) if sep else math.nan)
        except ValueError:
            raise ValueError(f"--priorities {spec!r}: expected CLASS:WEIGHT pairs, e.g. 0:1,1:9") from None
    if not all(w > 0 for w in weights) or len(set(classes)) != len(classes):
        raise ValueError(f"--priorities {spec!r}: each class once, with a weight > 0")
    p = np.asarray(weights) / sum(weights)
    return [classes[k] for k in np.random.default_rng(seed + 1).choice(len(classes), size=n, p=p)]


def per_class_latency(done: list[Any], class_of: dict[str, int]) -> dict[str, dict[str, float]]:
    """Latency and TTFT of each priority class of finished requests (`class_of`: request id ->
    its class, which a policy that ignores priorities never saw); keys are the classes as text."""
    out = {}
    for cls in sorted(set(class_of.values())):
        rs = [r for r in done if class_of[r.request_id] == cls]
        if not rs:
            continue
        lat = np.array([r.finish_time - r.arrival_time for r in rs])
        ttft = np.array([r.first_token_time - r.arrival_time for r in rs])
        out[str(cls)] = {"num_requests": len(rs), "latency_mean_s": float(lat.mean()),
                         "latency_p99_s": float(np.percentile(lat, 99)), "ttft_mean_s": float(ttft.mean()),
                         "ttft_p99_s": float(np.percentile(ttft, 99)),
                         "preempted": sum(r.num_preemptions > 0 for r in rs)}
    return out


def format_class_table(results: list[dict[str, Any]]) -> str:
    """Each run's latency per priority class (empty when no run has classes)."""
    if not any(r.get("priority_classes") for r in results):
        return ""
    lines = ["| run | priority | requests | latency mean/p99 s | TTFT mean/p99 s | preempted |", "|" + "---|" * 6]
    for r in results:
        for c, m in (r.get("priority_classes") or {}).items():
            lines.append(f"| {r['label']} | {c} | {m['num_requests']} | {m['latency_mean_s']:.1f} / "
                         f"{m['latency_p99_s']:.1f} | {m['ttft_mean_s']:.1f} / {m['ttft_p99_s']:.1f} | "
                         f"{m['preempted']} |")
    return "\n".join(lines)


def add_subcommand(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("schedule", help="scheduling policies side by side on alpaca-lengths",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-100m", help="checkpoint directory or preset (default llama-100m)")
    p.add_argument("--data", required=True, type=Path, help="alpaca-lengths JSONL (e.g. dev.jsonl)")
    p.add_argument("--num-requests", type=positive_int, default=1024)
    p.add_argument("--predictor", default=None, help="predictor directory or 'oracle' (default: none)")
    p.add_argument("--policy", action="append", default=None, metavar="NAME[:k=v,...][@PREDICTOR]",
                   help=f"a policy run (repeat); default: {' '.join(DEFAULT_POLICIES)}")
    p.add_argument("--request-rate", type=positive_float, default=None,
                   help="Poisson arrivals per second (default: all at 0)")
    p.add_argument("--priorities", default=None, metavar="CLASS:WEIGHT,...", help="requests' priority classes, "
                   "e.g. 0:1,1:9 (policies that order by priority get them; the table reports each class)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--json", type=output_file, default=None, help="write the list of per-policy records here")
    p.add_argument("--out-dir", type=Path, default=Path("bench-schedule"), help="table and PNG go here")
    p.set_defaults(func=cmd_schedule)


def cmd_schedule(args: argparse.Namespace) -> int:
    import torch

    from lengthwise.config import EngineConfig
    from lengthwise.model import load_model
    from lengthwise.tokenizer import Tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    specs = [parse_policy(t) for t in (args.policy or DEFAULT_POLICIES)]
    records_in = read_alpaca_lengths(args.data, args.num_requests)
    model_dir, label = resolve_model(args.model, args.seed)
    model = load_model(model_dir, args.dtype, "auto")
    tokenizer = Tokenizer(model_dir)
    lengths = [min(n, HARD_CAP) for _, n in records_in]
    context = model.config.max_context
    for i, ((text, _), n) in enumerate(zip(records_in, lengths, strict=True)):
        need = len(tokenizer.encode(text)) + n
        if need > context:  # the engine would cut it at the context and the table would not say so
            raise ValueError(f"--data request {i} needs {need} positions (prompt + recorded length {n}), more than "
                             f"{label}'s context of {context}: use a model with a longer context or fewer requests")
    arrivals = ([0.0] * len(lengths) if args.request_rate is None else
                np.cumsum(np.random.default_rng(args.seed).exponential(1 / args.request_rate, len(lengths))).tolist())
    priorities = draw_priorities(args.priorities, len(lengths), args.seed) if args.priorities else None
    kv_bytes = None
    if args.kv_cache_tokens is not None:
        if args.kv_cache_tokens < 1:
            raise ValueError(f"--kv-cache-tokens must be positive, got {args.kv_cache_tokens}")
        from lengthwise.kv.storage import KVCacheStorage

        mc = model.config
        kv_bytes = KVCacheStorage.bytes_per_block(mc.num_layers, 16, mc.num_kv_heads, mc.head_dim, model.dtype) * (
            -(-args.kv_cache_tokens // 16))
    results = []
    for spec in specs:
        config = EngineConfig(dtype=args.dtype, kv_cache_memory=kv_bytes, max_num_seqs=args.max_num_seqs,
                              policy=spec.name, policy_options=spec.options,
                              length_predictor=spec.predictor or args.predictor)
        rec = run_policy(model, tokenizer, config, [t for t, _ in records_in], lengths, arrivals, spec, priorities)
        rec["model"] = label
        rec["predictor"] = spec.predictor or args.predictor
        results.append(rec)
        print(format_row(rec), file=sys.stderr)
        if args.json is not None:  # after every policy, so a long run that is cut keeps what it measured
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        gc.collect()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    classes = format_class_table(results)
    table += f"\n\n{classes}" if classes else ""
    (args.out_dir / "schedule.md").write_text(table + "\n")
    print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out_dir / "schedule.png")
    return 0


def run_policy(model: Any, tokenizer: Any, config: Any, prompts: list[str] | list[list[int]],
               lengths: list[int] | None, arrivals: list[float], spec: PolicySpec,
               priorities: list[int] | None = None) -> dict[str, Any]:
    """Serve the workload under one policy on a fresh engine (same model weights); return its record.
    With `lengths`, each request generates exactly its recorded length (hidden from the policy);
    with None, greedy decoding runs to the model's own end of sequence (at most HARD_CAP tokens).
    `priorities`: each request's class, given to a policy that orders by priority; the record
    reports each class's latency under every policy."""
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.sampling_params import SamplingParams

    engine = LLMEngine(model, tokenizer, config)
    params = SamplingParams(max_tokens=HARD_CAP, temperature=0.0, ignore_eos=lengths is not None)
    oracle = config.length_predictor == "oracle"
    if oracle and lengths is None:
        raise ValueError("the oracle predictor needs the workload's lengths")
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    prioritised = priorities is not None and engine.scheduler.policy.supports_priority
    nxt = 0
    done: list[Any] = []
    bar = tqdm(total=len(prompts), desc=spec.label, unit="req", dynamic_ncols=True)
    start = time.monotonic()
    while len(done) < len(prompts):
        now = time.monotonic() - start
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            i = order[nxt]
            engine.add_request(prompts[i], params, request_id=str(i), arrival_time=start + arrivals[i],
                               true_length=lengths[i] if oracle else None,
                               eos_after=lengths[i] if lengths is not None else None,
                               priority=priorities[i] if prioritised else 0)
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.05, arrivals[order[nxt]] - now)))
            continue
        for r in engine.step():
            if r.finished:
                done.append(engine.requests.pop(r.request_id))
                bar.update(1)
    elapsed = time.monotonic() - start
    bar.close()
    tokens = sum(r.num_generated for r in done)
    lat = np.array([r.finish_time - r.arrival_time for r in done])
    ttft = np.array([r.first_token_time - r.arrival_time for r in done])
    tpot = [(r.finish_time - r.first_token_time) / (r.num_generated - 1) for r in done if r.num_generated > 1]
    row_steps = max(1, engine.stats.row_steps)
    return {"policy": spec.name, "options": spec.options, "label": spec.label,
            "requests_per_s": len(done) / elapsed, "output_tokens_per_s": tokens / elapsed,
            "padded_steps_per_request": row_steps / len(done), "effective_token_ratio": tokens / row_steps,
            "failure_rate": sum(r.num_collected > 0 for r in done) / len(done),
            "preemptions": engine.scheduler.num_preemptions,
            "latency_mean_s": float(lat.mean()), "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)), "ttft_mean_s": float(ttft.mean()),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "tpot_mean_s": float(np.mean(tpot)) if tpot else 0.0,
            "elapsed_s": elapsed, "num_requests": len(done), "output_tokens": tokens,
            "prediction_s": engine.length.stats.seconds, "steps": engine.stats.sampling_steps,
            "padding_row_steps": engine.stats.padding_row_steps,
            "priority_classes": None if priorities is None else per_class_latency(
                done, {str(i): c for i, c in enumerate(priorities)})}


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['label']}: {r['requests_per_s']:.3f} req/s, {r['output_tokens_per_s']:.1f} tok/s, "
            f"padded steps {r['padded_steps_per_request']:.1f}, effective {r['effective_token_ratio']:.1%}, "
            f"failures {r['failure_rate']:.1%}, preemptions {r['preemptions']}, "
            f"latency mean {r['latency_mean_s']:.1f} s")


def format_table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["policy"] == "static"), None)
    head = ["policy", "req/s", "tok/s", "vs static", "padded steps/req", "effective", "FCR failures", "preempt",
            "latency mean/p50/p99 s", "TTFT mean/p99 s", "TPOT ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ratio = f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x" if base else "-"
        lines.append("| " + " | ".join([
            r["label"], f"{r['requests_per_s']:.3f}", f"{r['output_tokens_per_s']:.1f}", ratio,
            f"{r['padded_steps_per_request']:.1f}", f"{r['effective_token_ratio']:.1%}", f"{r['failure_rate']:.1%}",
            str(r["preemptions"]),
            f"{r['latency_mean_s']:.1f} / {r['latency_p50_s']:.1f} / {r['latency_p99_s']:.1f}",
            f"{r['ttft_mean_s']:.1f} / {r['ttft_p99_s']:.1f}", f"{r['tpot_mean_s'] * 1000:.1f}"]) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    labels = [r["label"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.5 * len(labels) + 2.5))
    for ax, key, title in ((axes[0], "output_tokens_per_s", "output tokens/s"),
                           (axes[1], "effective_token_ratio", "effective token ratio"),
                           (axes[2], "latency_mean_s", "mean latency (s)")):
        ax.barh(labels, [r[key] for r in results])
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

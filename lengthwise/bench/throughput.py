"""`lengthwise bench throughput`: lengthwise against two transformers baselines on one workload.

Same model, dtype, device, thread count and token-id prompts for every engine (tokenised once,
here, with `lengthwise.Tokenizer`); output lengths fixed per request with EOS ignored. Each engine
runs in its own subprocess (see `lengthwise.bench.engines`), one after the other, so its peak RSS
is its own; the timed region is the generation of the whole workload, after a short warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lengthwise.argtypes import add_speculative_argument, output_file, positive_int, positive_int_list
from lengthwise.bench import report as rep
from lengthwise.bench.engines import TRANSFORMERS_ENGINES
from lengthwise.bench.presets import PRESETS, resolve_model
from lengthwise.bench.workloads import WORKLOADS, Workload, alpaca_lengths, synthetic
from lengthwise.config import KV_CACHE_DTYPES

ENGINES = ("lengthwise", "transformers", "transformers-cb")
WARMUP_SEED = 987654321
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-100m",
                   help=f"checkpoint directory or preset ({', '.join(PRESETS)}; default llama-100m)")
    p.add_argument("--workload", choices=WORKLOADS, default="synthetic",
                   help="alpaca-lengths (needs --data) or synthetic (seeded, no files); default synthetic")
    p.add_argument("--data", default=None,
                   help="alpaca-lengths JSONL file, e.g. ../shared/data/alpaca-lengths/dev.jsonl")
    p.add_argument("--num-requests", type=positive_int, default=1000, help="requests in the workload (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload (default 0)")
    p.add_argument("--max-output-len", type=int, default=None,
                   help="cap every request's output length at this many tokens (smoke runs)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)} (default all)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(),
                   help=f"torch.set_num_threads in every engine (default os.cpu_count() = {os.cpu_count()})")
    p.add_argument("--batch-size", type=positive_int_list, default=[32],
                   help="static batch size of the transformers baseline, or a comma list to sweep (e.g. "
                   "16,32,64,128): each runs, the fastest is the 'transformers' the ratio is taken against "
                   "(default 32)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="run every engine this many times, interleaved; each row is its median run, with "
                   "every run's time in the JSON (default 1)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="lengthwise without prefix caching (which the static baseline cannot do): the ratio "
                   "without that advantage")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most sequences in one step (lengthwise max_num_seqs, transformers-cb max_requests_per_batch)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (lengthwise max_num_batched_tokens, "
                        "transformers-cb max_batch_tokens)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (transformers-cb page_size)")
    p.add_argument("--kv-cache-tokens", type=int, default=32768,
                   help="KV cache capacity in tokens for both paged engines (default 32768)")
    p.add_argument("--policy", default="fcfs", help="lengthwise scheduling policy (default fcfs)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="lengthwise's KV cache dtype (default auto: the model's). Its KV memory stays the bytes of "
                        "--kv-cache-tokens in the model's dtype, the baselines', so a narrower cache (bfloat16 under "
                        "float32, fp8) holds more tokens in the same memory")
    add_speculative_argument(p)  # lengthwise only: the baselines decode a token per step
    p.add_argument("--cb-prefix-sharing", action=argparse.BooleanOptionalAction, default=True,
                   help="transformers-cb's prefix sharing (allow_block_sharing; default on, as transformers "
                        "ships it): requests reuse the KV blocks of a common prompt prefix, e.g. the Alpaca template")
    p.add_argument("--warmup-requests", type=int, default=4,
                   help="warm-up requests run first, untimed: random prompts as long as the workload's first ones, "
                        "sharing no prefix with it (default 4)")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--roofline", action="store_true",
                   help="also measure copy bandwidth and one lengthwise request of 128 tokens against it")
    p.add_argument("--json", type=output_file, default="throughput.json",
                   help="JSON report path (default throughput.json)")
    p.add_argument("--plot", default=None, help="PNG bar chart path (default: the JSON path with .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_engines(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise ValueError(f"--engines {text!r}: unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    return list(dict.fromkeys(names))


def check_args(args: argparse.Namespace) -> None:
    if isinstance(args.batch_size, int):  # (a Namespace built in code)
        args.batch_size = [args.batch_size]
    if not args.batch_size or min(args.batch_size) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for name in ("num_requests", "max_output_len", "threads", "max_num_seqs", "max_num_batched_tokens",
                 "block_size", "kv_cache_tokens", "warmup_tokens"):
        value = getattr(args, name)
        if name == "max_output_len" and value is None:
            continue
        if value is None or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    if args.workload == "alpaca-lengths" and args.data is None:
        raise ValueError("--workload alpaca-lengths needs --data FILE (e.g. ../shared/data/alpaca-lengths/dev.jsonl)")
    if args.workload == "synthetic" and args.data is not None:
        raise ValueError("--data is only for --workload alpaca-lengths")
    if args.data is not None and not Path(args.data).is_file():
        raise ValueError(f"--data {args.data!r}: no such file")
    # Checked here, not inside an engine's subprocess after the other engines have run.
    from lengthwise.config import SpeculativeConfig
    from lengthwise.model.loader import resolve_device
    from lengthwise.sched import make_policy

    resolve_device(args.device)
    make_policy(args.policy)
    SpeculativeConfig.parse(getattr(args, "speculative_config", None))


def check_dependencies(engines: list[str]) -> None:
    """Fail before any engine runs if a baseline or the plot cannot."""
    if any(e in TRANSFORMERS_ENGINES for e in engines) and importlib.util.find_spec("transformers") is None:
        raise ValueError("the transformers baselines need transformers: pip install 'lengthwise[bench]', "
                         "or pass --engines lengthwise")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the PNG plot needs matplotlib: pip install 'lengthwise[bench]'")


def build_workload(args: argparse.Namespace, model_dir: Path) -> tuple[Workload, list[list[int]]]:
    """The workload, and the warm-up prompts: random ids (their own seed) as long as its first prompts, so
    that no engine's prefix cache can carry work from the warm-up into the timed run."""
    from lengthwise.model.config import ModelConfig
    from lengthwise.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    config = ModelConfig.from_dir(model_dir)
    vocab = min(tokenizer.vocab_size, config.vocab_size)
    if args.workload == "alpaca-lengths":
        workload = alpaca_lengths(args.data, tokenizer, args.num_requests)
    else:
        workload = synthetic(args.num_requests, args.seed, vocab, tokenizer.bos_token_id)
    if args.max_output_len is not None:
        workload.output_lens = [min(n, args.max_output_len) for n in workload.output_lens]
        workload.info["max_output_len"] = args.max_output_len
    workload.check_fits(config.max_position_embeddings)
    rng = np.random.default_rng(WARMUP_SEED)
    warmup = [rng.integers(3, vocab, size=len(p)).tolist() for p in workload.prompts[:args.warmup_requests]]
    return workload, warmup


def median_run(group: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one engine's repeated runs, the one with the median time (the lower of the two middle
    ones for an even count), carrying every run's time in `elapsed_runs_s`."""
    ordered = sorted(group, key=lambda r: r["elapsed_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["elapsed_runs_s"] = [round(r["elapsed_s"], 3) for r in group]
    return chosen


def best_static(raws: list[dict[str, Any]]) -> None:
    """Of a batch-size sweep of the static baseline (`transformers-bN` rows), name the fastest
    `transformers`: the ratio is taken against the baseline at its best, not at a size we chose."""
    sweep = [r for r in raws if r["engine"].startswith("transformers-b")]
    if sweep:
        best = max(sweep, key=lambda r: r["output_tokens"] / r["elapsed_s"])
        best["engine"] = "transformers"


def run_engine(engine: str, spec: dict[str, Any], workdir: Path, label: str | None = None) -> dict[str, Any]:
    """Run one engine in a fresh Python process and return its raw measurements."""
    name = label or engine
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "engine": engine}))
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    # The child imports this same lengthwise, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "lengthwise.bench.engines", str(spec_path), str(out_path)],
                          env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"engine {engine!r} failed (exit status {proc.returncode}); its error is printed above")
    return json.loads(out_path.read_text())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed `args`; print the table, write the JSON and PNG; return the report."""
    check_args(args)
    engines = parse_engines(args.engines)
    check_dependencies(engines)
    model_dir, model_label = resolve_model(args.model)
    workload, warmup = build_workload(args, model_dir)
    json_path = Path(args.json)
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    progress = not args.no_progress
    prefix_caching = not getattr(args, "no_prefix_caching", False)
    spec = {"model_dir": str(model_dir), "dtype": args.dtype, "device": args.device, "threads": args.threads,
            "batch_size": args.batch_size[0], "max_num_seqs": args.max_num_seqs, "prefix_caching": prefix_caching,
            "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size,
            "kv_cache_tokens": args.kv_cache_tokens, "policy": args.policy,
            "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
            "speculative_config": getattr(args, "speculative_config", None),
            "cb_prefix_sharing": args.cb_prefix_sharing, "warmup_prompts": warmup, "warmup_tokens": args.warmup_tokens,
            "progress": progress, "prompts": workload.prompts, "output_lens": workload.output_lens}
    config = {"model": model_label, "model_dir": str(model_dir), "dtype": args.dtype, "device": args.device,
              "threads": args.threads, "engines": engines, "workload": workload.summary(),
              "batch_size": args.batch_size, "max_num_seqs": args.max_num_seqs, "prefix_caching": prefix_caching,
              "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size,
              "kv_cache_tokens": args.kv_cache_tokens, "policy": args.policy,
              "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
              "speculative_config": getattr(args, "speculative_config", None),
              "repeats": getattr(args, "repeats", 1),
              "warmup": {"requests": len(warmup), "max_tokens": args.warmup_tokens,
                         "prompts": f"random ids (seed {WARMUP_SEED}), lengths of the first {len(warmup)} prompts"},
              "sampling": "greedy, EOS ignored, per-request max_tokens",
              "transformers_cb": {"max_new_tokens": "per request (add_request(max_new_tokens=...))",
                                  "num_blocks": -(-args.kv_cache_tokens // args.block_size),
                                  "page_size": args.block_size, "max_batch_tokens": args.max_num_batched_tokens,
                                  "max_requests_per_batch": args.max_num_seqs,
                                  "allow_block_sharing": args.cb_prefix_sharing},
              "versions": versions(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    print(rep.header(config), file=sys.stderr)
    roofline = None
    with tempfile.TemporaryDirectory(prefix="lengthwise-bench-") as tmp:
        runs = [(e, bs) for e in engines for bs in (args.batch_size if e == "transformers" else [None])]
        repeats = getattr(args, "repeats", 1)
        by_label: dict[str, list[dict[str, Any]]] = {}
        for r in range(repeats):  # rounds interleave the engines, so a drifting machine hits them alike
            for k, (engine, bs) in enumerate(runs, 1):
                label = engine if bs is None or len(args.batch_size) == 1 else f"{engine}-b{bs}"
                round_note = f" (round {r + 1}/{repeats})" if repeats > 1 else ""
                print(f"[bench] {k}/{len(runs)}: {label}{round_note}", file=sys.stderr)
                start = time.perf_counter()
                raw = run_engine(engine, spec if bs is None else {**spec, "batch_size": bs}, Path(tmp), label)
                print(f"[bench] {label}: {raw['elapsed_s']:.1f} s timed, {time.perf_counter() - start:.1f} s in "
                      "all (start-up, load, warm-up)", file=sys.stderr)
                raw["num_requests"] = len(workload)
                raw["engine"] = label
                by_label.setdefault(label, []).append(raw)
        raws = [median_run(group) for group in by_label.values()]
        best_static(raws)
        if args.roofline:
            print("[bench] roofline: copy bandwidth and one lengthwise request alone", file=sys.stderr)
            roofline = run_engine("roofline", spec, Path(tmp))
            roofline.pop("engine", None)
    report = rep.build_report([rep.summarise(r) for r in raws], config, roofline, rep.compare_outputs(raws))
    print(rep.format_table(report))
    rep.write_json(report, json_path)
    rep.plot(report, plot_path)
    print(f"[bench] wrote {json_path} and {plot_path}", file=sys.stderr)
    return report


def versions() -> dict[str, str | None]:
    import torch

    from lengthwise import __version__

    out: dict[str, str | None] = {"lengthwise": __version__, "torch": torch.__version__,
                                  "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    return out


def add_subcommand(bench_sub: argparse._SubParsersAction) -> None:
    """Register `throughput` under `lengthwise bench`."""
    p = bench_sub.add_parser(
        "throughput", help="lengthwise vs transformers (static batches and continuous batching)",
        description="Offline throughput of lengthwise and two transformers baselines on the same workload, "
                    "model, dtype and token-id prompts, each engine in its own subprocess. Prints a table and "
                    "writes a JSON report and a PNG bar chart.")
    add_arguments(p)
    p.set_defaults(func=cmd_throughput)


def cmd_throughput(args: argparse.Namespace) -> int:
    try:
        run(args)
    except RuntimeError as e:  # an engine's subprocess failed; its traceback is already on stderr
        print(f"lengthwise: error: {e}", file=sys.stderr)
        return 1
    return 0

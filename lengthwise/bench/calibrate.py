"""`lengthwise simulate calibrate`: fit the simulator's step-time model to the real engine.

    lengthwise simulate calibrate --model llama-100m --data dev.jsonl --num-requests 64 --out steps.json

Serves the first `--num-requests` alpaca-lengths prompts (each generating its true length, as
`bench schedule` does) through the engine under each `--policy`, times every `engine.step()`
(`--repeats` times over), and fits `StepModel` (base + rows + prefill tokens + context tokens)
to the measured steps. The policies are chosen to cover the batch sizes and prefill mixes the
simulated policies produce: continuous batching ramps from many rows down to one, static
batches of 8 hold few rows.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lengthwise.argtypes import input_file, output_file, positive_int
from lengthwise.bench.schedule import HARD_CAP, parse_policy
from lengthwise.bench.step_model import StepFeatures, StepModel, step_features
from lengthwise.bench.workloads import read_alpaca_lengths

WARMUP_STEPS = 3  # per policy: the first steps pay one-off costs (kernel build, packing, allocation)


def measure_steps(engine: Any, prompts: list[str], lengths: list[int]) -> tuple[list[StepFeatures], list[float]]:
    """Serve `prompts` (all at once) on `engine`; (features, seconds) of every step after the warm-up."""
    from lengthwise.sampling_params import SamplingParams

    planned: list[StepFeatures] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():  # noqa: ANN202
        out = schedule()
        planned.append(step_features(out.chunks, out.padding_rows))
        return out

    engine.scheduler.schedule = recording_schedule
    params = SamplingParams(max_tokens=HARD_CAP, temperature=0.0, ignore_eos=True)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.add_request(p, params, request_id=str(i), eos_after=n)
    features, seconds = [], []
    bar = tqdm(total=len(prompts), desc="calibrating", unit="req", dynamic_ncols=True)
    try:
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            finished = sum(r.finished for r in engine.step())
            dt = time.perf_counter() - t0
            bar.update(finished)
            if len(planned) > WARMUP_STEPS and planned[-1].rows + planned[-1].prefill_tokens > 0:
                features.append(planned[-1])
                seconds.append(dt)
    finally:
        engine.scheduler.schedule = schedule
        bar.close()
    for rid in list(engine.requests):
        engine.requests.pop(rid)
    return features, seconds


def calibrate(args: argparse.Namespace) -> StepModel:
    import torch

    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.data is None:
        raise ValueError("simulate calibrate needs --data (or --from-steps)")
    from lengthwise.bench.presets import resolve_model
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.model import load_model
    from lengthwise.tokenizer import Tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_dir, label = resolve_model(args.model)
    model = load_model(model_dir, args.dtype, "auto")
    records = read_alpaca_lengths(args.data, args.num_requests)
    prompts, lengths = [t for t, _ in records], [min(n, HARD_CAP) for _, n in records]
    kv_bytes = None
    if args.kv_cache_tokens is not None:
        from lengthwise.kv.storage import KVCacheStorage

        mc = model.config
        kv_bytes = KVCacheStorage.bytes_per_block(mc.num_layers, 16, mc.num_kv_heads, mc.head_dim, model.dtype) * (
            -(-args.kv_cache_tokens // 16))
    features: list[StepFeatures] = []
    seconds: list[float] = []
    for text in args.policy or ["continuous", "static:batch_size=8"]:
        spec = parse_policy(text)
        config = EngineConfig(dtype=args.dtype, kv_cache_memory=kv_bytes, max_num_seqs=args.max_num_seqs,
                              policy=spec.name, policy_options=spec.options)
        f: list[StepFeatures] = []
        s: list[float] = []
        for _ in range(args.repeats):  # a fresh engine each time: no prefix cache carried over
            f2, s2 = measure_steps(LLMEngine(model, Tokenizer(model_dir), config), prompts, lengths)
            f, s = f + f2, s + s2
        print(f"[calibrate] {spec.label}: {len(s)} steps, {sum(s):.1f} s", flush=True)
        features += f
        seconds += s
    if args.save_steps is not None:  # the raw measurements, to refit offline (StepModel.fit)
        args.save_steps.write_text("".join(json.dumps({**asdict(f), "seconds": t}) + "\n"
                                           for f, t in zip(features, seconds, strict=True)))
    split = None
    if not args.no_split:
        from lengthwise.ops.cpu import decode as cpu_decode

        if cpu_decode.eligible(model, 1):  # short steps run the fused CPU forward, long ones op by op
            split = (cpu_decode.MAX_QUERY_LEN, cpu_decode.max_rows())
    return StepModel.fit(features, seconds, split=split, source={
        "kind": "calibrated", "model": label, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "data": str(args.data), "num_requests": args.num_requests, "repeats": args.repeats, "policies": args.policy or
        ["continuous", "static:batch_size=8"], "kv_cache_tokens": args.kv_cache_tokens})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-100m", help="checkpoint directory or preset (default llama-100m)")
    p.add_argument("--data", type=Path, default=None, help="alpaca-lengths JSONL (e.g. dev.jsonl); required "
                   "unless --from-steps")
    p.add_argument("--num-requests", type=positive_int, default=64)
    p.add_argument("--policy", action="append", help="policies to measure under (default: continuous and "
                   "static:batch_size=8)")
    p.add_argument("--repeats", type=int, default=2, help="serve the workload this many times per policy (default 2): "
                   "more steps, over a longer window of a host's varying speed")
    p.add_argument("--no-split", action="store_true", help="one set of coefficients for every step (by default "
                   "the steps that leave the fused CPU decode forward get their own)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (as bench schedule)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--out", required=True, type=output_file, help="JSON file to write the step model to")
    p.add_argument("--from-steps", type=input_file, default=None, help="fit to the steps a --save-steps file holds "
                   "instead of running the engine")
    p.add_argument("--save-steps", type=Path, default=None, help="also write every measured step (features and "
                   "seconds) to this JSONL file")


def refit(path: Path, split: bool) -> StepModel:
    """A step model fitted to steps saved by `--save-steps` (no engine run)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    features = [StepFeatures(**{k: v for k, v in r.items() if k != "seconds"}) for r in rows]
    from lengthwise.ops.cpu.decode import MAX_QUERY_LEN, max_rows

    return StepModel.fit(features, [r["seconds"] for r in rows], split=(MAX_QUERY_LEN, max_rows()) if split else None,
                         source={"kind": "calibrated", "refit_of": str(path)})


def main(args: argparse.Namespace) -> int:
    model = refit(args.from_steps, not args.no_split) if args.from_steps is not None else calibrate(args)
    model.save(args.out)
    src = model.source
    print(f"[calibrate] {model.describe()}; mean abs error {src['mean_abs_error_s'] * 1e3:.2f} ms of a "
          f"{src['mean_step_s'] * 1e3:.2f} ms mean step, total {src['total_error']:+.1%}; wrote {args.out}")
    return 0

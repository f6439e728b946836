"""Candidates for the CPU decode path: one decode forward pass (LM head included) per variant and batch.

    .venv/bin/python benchmarks/cpu_decode_candidates.py [--model llama-100m] [--threads 2] [--rows 1,2,4,8,16]
        [--compile]

Variants:
- `mkl`: torch ops per layer + the C++ segment attention kernel, MKL's `F.linear` for every matmul
  (`LENGTHWISE_CPU_FUSED=0`): the path before the fused one, and still the path of long prefill
  chunks. (A third variant, the same with weights prepacked for oneDNN, was measured and removed:
  docs/benchmarks.md);
- `fused`: the default, `lengthwise/ops/cpu/decode_forward.cpp`: every layer in one C++ call, one
  OpenMP region, matmuls on panel-packed weights, the LM head included;
- `compile-layers` (with `--compile`, batch 1 only): each decoder layer's forward through
  `torch.compile` (inductor's C++ backend) on the op-by-op path; the C++ attention kernel is not a
  registered custom op, so each layer compiles as two graphs around it.

Each row decodes one token with `--context` tokens cached. Prints best-of-3 ms per forward (5
forwards each), the weight-read bound and the fraction of it reached.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from lengthwise import LLM, ModelConfig
from lengthwise.bench.engines import decode_weight_bytes
from lengthwise.bench.kernels import best_of_ms, copy_bandwidth_gbs, decode_forward_fn
from lengthwise.bench.presets import resolve_model
from lengthwise.ops.cpu.decode import PACKED_WEIGHTS_ENV


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-100m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,8,16", help="comma-separated decode batch sizes")
    p.add_argument("--context", type=int, default=64, help="cached tokens per row")
    p.add_argument("--compile", action="store_true", help="also time torch.compile per layer (batch 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, _ = resolve_model(args.model)
    rows_list = [int(r) for r in args.rows.split(",")]
    # The op-by-op variant must run on dense weights (MKL): keep them, as the fused path then packs its own copy.
    os.environ[PACKED_WEIGHTS_ENV] = "0"
    engine = LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=max(rows_list),
                 max_model_len=min(1024, ModelConfig.from_dir(model_dir).max_position_embeddings)).engine
    model = engine.model
    ctx = args.context
    bound = decode_weight_bytes(model_dir, 4) / copy_bandwidth_gbs(torch.device("cpu")) / 1e6

    def make_step(rows: int) -> Callable[[], torch.Tensor]:
        return decode_forward_fn(engine, rows, ctx)

    print(f"weight-read bound {bound:.1f} ms per forward (context {ctx})")
    print("| rows | mkl ms | fused ms | fused vs mkl | mkl / fused % of bound |")
    print("|---|---|---|---|---|")
    variants = {"mkl": dict(LENGTHWISE_CPU_FUSED="0"),
                "fused": dict(LENGTHWISE_CPU_FUSED="1", LENGTHWISE_CPU_FUSED_MAX_ROWS=str(max(rows_list)))}
    for rows in rows_list:
        step = make_step(rows)
        ms = {}
        for name, env in variants.items():
            os.environ.update(env)
            ms[name] = best_of_ms(step)
        os.environ.pop("LENGTHWISE_CPU_FUSED_MAX_ROWS")
        frac = " / ".join(f"{bound / v:.0%}" for v in ms.values())
        print(f"| {rows} | {ms['mkl']:.1f} | {ms['fused']:.1f} | {ms['mkl'] / ms['fused']:.2f}x | {frac} |",
              flush=True)
    if args.compile:
        os.environ.update(variants["mkl"])
        step = make_step(1)  # compile-layers runs on the op-by-op path
        for layer in model.layers:
            layer.forward = torch.compile(layer.forward, dynamic=False)
        t0 = time.perf_counter()
        step()
        print(f"compile-layers, batch 1: compiled in {time.perf_counter() - t0:.0f} s, {best_of_ms(step):.1f} ms",
              flush=True)


if __name__ == "__main__":
    main()

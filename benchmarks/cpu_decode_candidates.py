"""Candidates for the CPU decode path, batch 1: one forward pass (LM head included) per variant.

    .venv/bin/python benchmarks/cpu_decode_candidates.py [--model llama-100m] [--threads 2]

Variants: `eager` (the engine's path today: torch ops + the C++ segment attention kernel) and
`compile-layers` (each decoder layer's forward through `torch.compile`, inductor's C++ backend;
the C++ attention kernel is not a registered custom op, so each layer compiles as two graphs
around it). Prints best-of-3 milliseconds per forward (5 forwards each) and compile time.
"""

from __future__ import annotations

import argparse
import time

import torch

from lengthwise import LLM
from lengthwise.bench.presets import resolve_model
from lengthwise.ops import AttentionMetadata

CONTEXT = 64


def forward_ms(fn) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        best = min(best, (time.perf_counter() - t0) / 5)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-100m")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, _ = resolve_model(args.model)
    engine = LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=4, max_model_len=1024).engine
    model, cache, bs = engine.model, engine.runner.cache, engine.runner.block_size
    blocks = list(range(-(-CONTEXT // bs)))
    ids, pos = torch.tensor([5]), torch.tensor([CONTEXT - 1])

    def step() -> torch.Tensor:
        meta = AttentionMetadata([0, 1], torch.tensor([CONTEXT - 1]), bs, torch.tensor([blocks], dtype=torch.int32),
                                 [CONTEXT])
        return model.compute_logits(model(ids, pos, meta, cache))

    print(f"eager: {forward_ms(step):.1f} ms", flush=True)
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
    t0 = time.perf_counter()
    step()
    print(f"compile-layers: compiled in {time.perf_counter() - t0:.0f} s, {forward_ms(step):.1f} ms", flush=True)


if __name__ == "__main__":
    main()

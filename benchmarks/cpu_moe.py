"""A mixture-of-experts model's decode on the CPU: the fused C++ step against the op-by-op path.

    .venv/bin/python benchmarks/cpu_moe.py [--model qwen3-moe-500m] [--batch 1,16] [--rounds 3]
        [--tokens 48] [--threads 2] [--out DIR]

One engine, one model (default the qwen3-moe-500m preset: 64 experts, 8 per token), the same
requests decoded with the fused decode step (`LENGTHWISE_CPU_FUSED=1`: routing and the chosen
experts in `decode_forward.cpp`) and without it (`=0`: the sparse layers through `ops/moe.py`, a
loop over the hit experts on the same bfloat16 panels), alternating in each round: the time per
decode step (first token to last of the slowest request of the batch) and the ratio of the two
in the same round. Greedy outputs of the two paths must be identical (checked). Writes
cpu-moe.json, .md and .png to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from lengthwise import LLM, SamplingParams
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot
from lengthwise.ops.cpu import decode as cpu_decode

PATHS = {"fused": "1", "op by op": "0"}
PROMPT = list(range(10, 26))


def step_ms(llm: LLM, batch: int, tokens: int) -> tuple[float, list[list[int]]]:
    prompts = [{"prompt_token_ids": [t + i for t in PROMPT]} for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    ms = max((o.metrics.finish_time - o.metrics.first_token_time) / (tokens - 1) * 1e3 for o in outs)
    return ms, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3-moe-500m")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, label = resolve_model(args.model)
    llm = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory=512 << 20)
    batches = [int(b) for b in args.batch.split(",")]
    times: dict[str, dict[int, list[float]]] = {p: {b: [] for b in batches} for p in PATHS}
    for r in range(args.rounds):
        for b in batches:
            outputs = {}
            for path, env in PATHS.items():
                os.environ[cpu_decode.FUSED_ENV] = env
                ms, outputs[path] = step_ms(llm, b, args.tokens)
                times[path][b].append(ms)
            if outputs["fused"] != outputs["op by op"]:
                raise SystemExit(f"round {r}, batch {b}: the fused and op-by-op paths generated different tokens")
            print(f"round {r} batch {b}: " + ", ".join(f"{p} {times[p][b][-1]:.2f} ms" for p in PATHS), flush=True)
    rows = [{"batch": b, **{f"{p} ms": round(statistics.median(times[p][b]), 2) for p in PATHS},
             "speed-up per round": [round(o / f, 2) for o, f in zip(times["op by op"][b], times["fused"][b],
                                                                    strict=True)]} for b in batches]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": label, "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
              "rows": rows, "times": {p: {str(b): v for b, v in t.items()} for p, t in times.items()}}
    (out / "cpu-moe.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ["| batch | fused ms/step | op-by-op ms/step | op-by-op / fused, per round |", "|---|---|---|---|"]
    table += [f"| {r['batch']} | {r['fused ms']} | {r['op by op ms']} | {r['speed-up per round']} |" for r in rows]
    (out / "cpu-moe.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    plt = pyplot()
    if plt is None:  # (matplotlib missing: the table and JSON stand)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.35
    for j, p in enumerate(PATHS):
        ax.bar([i + j * width for i in range(len(batches))], [statistics.median(times[p][b]) for b in batches],
               width, label=p)
    ax.set_xticks([i + width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per decode step (median round)")
    ax.set_title(f"{label}: fused MoE decode vs op by op ({args.threads} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cpu-moe.png", dpi=120)
    print(f"wrote {out}/cpu-moe.json, .md, .png")


if __name__ == "__main__":
    main()

"""Narrower KV caches against a float32 one on the CPU, in one run: speed, capacity and accuracy.

    .venv/bin/python benchmarks/cpu_kv_cache_dtype.py [--model llama-100m] [--threads 2] [--rounds 2]
        [--variants float32,bfloat16,fp8,fp8_e5m2] [--shapes 1x2048,16x1024,64x256,64x1024]
        [--requests 64] [--prompt-len 256] [--output-len 256] [--kv-cache-memory 512MiB]
        [--quality-model ../shared/models/stories260k] [--out DIR]

The same float32 model, its KV cache held in each of `--variants` (`EngineConfig.kv_cache_dtype`;
float32, the baseline, always first):

- **decode steps** (`--shapes`, ROWSxCONTEXT): one decode forward pass (the fused CPU path, LM head
  included, no scheduler) of ROWS rows with CONTEXT tokens each, ms per step; the K/V bytes it
  reads grow with ROWS x CONTEXT, the weight bytes do not;
- **a memory-bound workload** (`--requests` requests of `--prompt-len` random tokens, each decoding
  `--output-len` tokens, through the engine with continuous batching): with the same
  `--kv-cache-memory`, how many tokens each cache holds, how many sequences decode together on
  average, and the generated tokens per second;
- **accuracy**: teacher-forced over greedy continuations by the float32-cache engine, the mean
  |change| of the top-5 candidates' logprobs and how often the top-1 token stays the same, on
  `--quality-model` (a real trained model; skipped if absent) and on the benchmark model's
  random-token prompts; and how many greedy tokens stay identical.

The variants alternate within each of `--rounds` rounds and every ratio is taken within a round
(this host's speed moves between minutes); tables give the median round. Writes
kv-cache-dtype.json, .md and .png to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lengthwise import LLM, SamplingParams
from lengthwise.argtypes import kv_memory
from lengthwise.bench.agreement import agreement_table, llm_agreement
from lengthwise.bench.kernels import best_of_ms, decode_forward_fn
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot
from lengthwise.config import KV_CACHE_DTYPES
from lengthwise.engine.llm_engine import FP8_KV_DTYPES
from lengthwise.kv.storage import KVCacheStorage
from lengthwise.model.config import ModelConfig

BASE = "float32"
COLORS = ("#888888", "#4477aa", "#cc6677", "#ddaa33")
STORY_PROMPTS = ["Once upon a time", "The little dog", "One day, a boy named Tom", "Lily wanted to",
                 "The sun was", "Ben and his mom"]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, sep, context = item.partition("x")
        if not sep or not rows.isdigit() or not context.isdigit() or int(rows) < 1 or int(context) < 2:
            raise ValueError(f"--shapes: expected ROWSxCONTEXT items such as 64x1024, got {item!r}")
        shapes.append((int(rows), int(context)))
    return shapes


def parse_variants(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    bad = [v for v in names if v not in KV_CACHE_DTYPES or v == "auto"]
    if bad:
        raise ValueError(f"--variants: unknown KV cache dtype {bad[0]!r} (choose from "
                         f"{', '.join(d for d in KV_CACHE_DTYPES if d != 'auto')})")
    return [BASE, *dict.fromkeys(v for v in names if v != BASE)]


def bytes_per_token(model_dir: Path, dtype: str) -> int:
    c = ModelConfig.from_dir(model_dir)
    torch_dtype = FP8_KV_DTYPES.get(dtype) or getattr(torch, dtype)
    return KVCacheStorage.bytes_per_block(c.num_layers, 1, c.num_kv_heads, c.head_dim, torch_dtype)


def workload(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    """Every prompt through the engine at once; generated tokens per second and mean decode rows."""
    engine = llm.engine
    steps, rows = engine.stats.sampling_steps, engine.stats.row_steps
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens_per_s": generated / seconds, "seconds": seconds,
            "mean_rows": (engine.stats.row_steps - rows) / max(1, engine.stats.sampling_steps - steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-100m", help="a checkpoint directory or preset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="float32,bfloat16,fp8,fp8_e5m2", help="KV cache dtypes to compare")
    p.add_argument("--shapes", default="1x2048,16x1024,64x256,64x1024", help="decode steps, ROWSxCONTEXT")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--kv-cache-memory", type=kv_memory, default=512 << 20,
                   help="the workload's KV cache, bytes (e.g. 512MiB), the same for every dtype")
    p.add_argument("--quality-model", default=str(Path(__file__).resolve().parents[2] / "shared" / "models" /
                                                  "stories260k"))
    p.add_argument("--out", default="results/kv-cache-dtype")
    args = p.parse_args()
    shapes = parse_shapes(args.shapes)
    dtypes = parse_variants(args.variants)
    if not isinstance(args.kv_cache_memory, int):
        raise ValueError("--kv-cache-memory: give bytes (e.g. 512MiB), not a fraction, so every cache gets the same")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, label = resolve_model(args.model)
    max_len = max(c for _, c in shapes)
    max_rows = max(r for r, _ in shapes)
    need_tokens = max(r * c for r, c in shapes) + 16 * max_rows

    def step_llm(dtype: str) -> LLM:
        return LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=max_rows, max_model_len=max_len,
                   kv_cache_memory=need_tokens * bytes_per_token(model_dir, dtype), kv_cache_dtype=dtype)

    def load_workload(dtype: str) -> LLM:
        return LLM(model_dir, dtype="float32", device="cpu", max_model_len=args.prompt_len + args.output_len,
                   kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=dtype)

    steps_llms = {d: step_llm(d) for d in dtypes}
    work_llms = {d: load_workload(d) for d in dtypes}
    vocab = steps_llms[BASE].engine.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.requests, args.prompt_len), generator=g).tolist()
    for d in dtypes:  # warm-up: compile the kernels, pack the weights, touch the caches
        workload(work_llms[d], prompts[:2], 4)
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        row: dict[str, dict[str, float]] = {}
        for d in dtypes:
            row[d] = {f"step_{n}x{c}_ms": best_of_ms(decode_forward_fn(steps_llms[d].engine, n, c), repeats=3, calls=3)
                      for n, c in shapes}
        for d in dtypes:
            row[d].update(workload(work_llms[d], prompts, args.output_len))
        rounds.append(row)
        print(f"[kv-cache-dtype] round {r + 1}: " + "; ".join(
            f"{d}: " + ", ".join(f"{k} {v:.1f}" for k, v in x.items()) for d, x in row.items()), flush=True)
    results: dict[str, Any] = {
        "model": label, "threads": args.threads, "shapes": [f"{n}x{c}" for n, c in shapes],
        "requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "kv_cache_memory": args.kv_cache_memory, "variants": {}, "base": BASE}
    for d in dtypes:
        engine = work_llms[d].engine
        keys = list(rounds[0][d])
        results["variants"][d] = {
            "bytes_per_token": bytes_per_token(model_dir, d),
            "cache_tokens": engine.num_blocks * engine.config.block_size,
            **{k: round(statistics.median(x[d][k] for x in rounds), 3) for k in keys},
            "ratios": {k: round(statistics.median(
                (x[BASE][k] / x[d][k]) if k.endswith("_ms") else (x[d][k] / x[BASE][k]) for x in rounds), 3)
                for k in keys if k.startswith("step_") or k in ("tokens_per_s", "mean_rows")},
            "rounds": [{k: round(v, 3) for k, v in x[d].items()} for x in rounds]}
    del steps_llms, work_llms
    random_prompts = [{"prompt_token_ids": torch.randint(3, vocab, (32,), generator=g).tolist()} for _ in range(4)]
    results["quality"] = {}
    for d in dtypes[1:]:
        quality = results["quality"][d] = {label: _quality(model_dir, d, random_prompts, 64)}
        if Path(args.quality_model).is_dir():
            quality[Path(args.quality_model).name] = _quality(Path(args.quality_model), d, STORY_PROMPTS, 120)
    table = format_table(results)
    print(table)
    (out / "kv-cache-dtype.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "kv-cache-dtype.md").write_text(table + "\n")
    plot(results, out / "kv-cache-dtype.png")
    print(f"[kv-cache-dtype] wrote {out}/kv-cache-dtype.json, .md and .png")


def _quality(model_dir: Path, dtype: str, prompts: list[Any], greedy_tokens: int) -> dict[str, Any]:
    full, narrow = (LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory=1 << 28, kv_cache_dtype=d)
                    for d in (BASE, dtype))
    return llm_agreement(full, narrow, prompts, greedy_tokens)


def format_table(r: dict[str, Any]) -> str:
    names = list(r["variants"])
    lines = [f"{r['model']}, float32 model, {r['threads']} threads; speed-ups are each cache's over the "
             f"{r['base']} cache's within each round (> 1 is faster), median round", "",
             "| decode step, rows x context | " + " | ".join(f"{d} cache ms" for d in names) + " | "
             + " | ".join(f"{d} speed-up" for d in names[1:]) + " |", "|---" * (2 * len(names) - 0) + "|"]
    for s in r["shapes"]:
        k = f"step_{s}_ms"
        lines.append(f"| {s} | " + " | ".join(str(r["variants"][d][k]) for d in names) + " | "
                     + " | ".join(f"{r['variants'][d]['ratios'][k]:.2f}x" for d in names[1:]) + " |")
    lines += ["", f"{r['requests']} requests of {r['prompt_len']} prompt + {r['output_len']} generated tokens, "
              f"KV cache {r['kv_cache_memory'] / 2 ** 20:.0f} MiB:", "",
              "| KV cache | bytes per token | tokens held | mean decode rows | generated tokens/s | ratio |",
              "|---|---|---|---|---|---|"]
    for d, x in r["variants"].items():
        lines.append(f"| {d} | {x['bytes_per_token']} | {x['cache_tokens']} | {x['mean_rows']:.1f} | "
                     f"{x['tokens_per_s']:.0f} | {x['ratios']['tokens_per_s']:.2f}x |")
    for d, quality in r["quality"].items():
        lines += ["", *agreement_table(f"{d} cache vs {r['base']}, on", quality)]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(r["shapes"]))
    names = list(r["variants"])
    width = 0.8 / len(names)
    for i, d in enumerate(names):
        axes[0].bar([x + width * i for x in xs], [r["variants"][d][f"step_{s}_ms"] for s in r["shapes"]], width,
                    color=COLORS[i % len(COLORS)], label=f"{d} KV cache")
    axes[0].set_xticks([x + width * (len(names) - 1) / 2 for x in xs], r["shapes"])
    axes[0].set_xlabel("decode step: rows x context")
    axes[0].set_ylabel("ms per step")
    axes[0].legend()
    axes[1].bar(names, [r["variants"][d]["tokens_per_s"] for d in names],
                color=[COLORS[i % len(COLORS)] for i in range(len(names))])
    axes[1].set_ylabel("generated tokens/s")
    axes[1].set_title(f"{r['requests']} requests, KV cache {r['kv_cache_memory'] / 2 ** 20:.0f} MiB")
    fig.suptitle(f"KV cache dtypes on the CPU: {r['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

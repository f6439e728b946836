"""The fused CPU decode path's weight formats, side by side in one run: speed and what int8 and int4 cost.

    .venv/bin/python benchmarks/cpu_weight_formats.py [--model llama-100m-bf16] [--threads 2]
        [--batch 64] [--rows 1,2,4,8,16] [--rounds 3] [--variants all] [--quality-model ../shared/models/stories260k]
        [--out DIR]

One bfloat16 checkpoint (as real checkpoints are), served in float32 on the CPU, three ways:

- `before: dense + float32 panels`: the weights as float32 parameters (prefill on MKL) plus the
  fused decode path's float32 panel copy (`LENGTHWISE_CPU_PACKED_WEIGHTS=0`,
  `LENGTHWISE_CPU_BF16_PANELS=0`): how every CPU model was held before; the baseline (`--variants`
  may leave it out, for a model whose two float32 copies do not fit in memory: the first variant
  listed is then the baseline);
- `bfloat16 panels`: the default: the projections held only as panels, in bfloat16 because every
  weight is a bfloat16 value (the same products bit for bit), prefill on the same panels;
- `int8`: `quantization="int8"`, the projections as int8 panels with a scale per row (the LM head
  stays as it is: bfloat16 panels here);
- `int4`: `quantization="int4"`, the projections as 4-bit panels with a scale and zero point per
  row and group of 128 inputs (round to nearest; a GPTQ or AWQ checkpoint loads into the same
  panels, so streams the same bytes at the same speed).

Each round times, per variant in turn, batch-1 decode through the engine (ms per token, best of 3),
the prefill of one 512-token prompt (time to first token, best of 3), a batch-`--batch` decode step
through the engine (ms), and one decode forward pass (LM head included, context 64, no scheduler)
at each of `--rows`; the tables give each variant's median round and its ratio to the baseline in
the same round, the weight bytes each holds, and the batch-1 weight-read bound (bytes a step
streams / the copy bandwidth, measured before and after; copy bandwidth counts bytes read plus
bytes written, and a pure read stream can beat it). Quality of int8 and int4, against the same
checkpoint unquantized: teacher-forced, the mean |change| of the top-5 candidates' logprobs and how often the
top-1 token stays the same, over `--quality-model`'s (a real trained model; skipped if absent)
greedy stories and over the benchmark model's random-token prompts; and for the real model, how
many greedy tokens stay identical. Writes weight-formats.json, .md and .png to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lengthwise import LLM, SamplingParams
from lengthwise.bench.agreement import agreement_table, llm_agreement
from lengthwise.bench.kernels import (
    best_of_ms,
    copy_bandwidth_gbs,
    decode_b1_ms,
    decode_forward_fn,
    engine_decode,
    streamed_weight_bytes,
)
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot
from lengthwise.ops.cpu import decode as cpu_decode

# variant -> (LENGTHWISE_CPU_PACKED_WEIGHTS, LENGTHWISE_CPU_BF16_PANELS, quantization)
VARIANTS = {"before: dense + float32 panels": ("0", "0", None), "bfloat16 panels": ("1", "1", None),
            "int8": ("1", "1", "int8"), "int4": ("1", "1", "int4")}
PREFILL_TOKENS = 512
STORY_PROMPTS = ["Once upon a time", "The little dog", "One day, a boy named Tom", "Lily wanted to",
                 "The sun was", "Ben and his mom"]


@contextmanager
def variant_env(variant: str):
    """The variant's switches for the calls inside (read when a model is loaded and when its
    weights are packed: at load, or at the first fused step of a dense model)."""
    packed, bf16, _ = VARIANTS[variant]
    names = (cpu_decode.PACKED_WEIGHTS_ENV, cpu_decode.BF16_PANELS_ENV)
    old = {n: os.environ.get(n) for n in names}
    os.environ.update(dict(zip(names, (packed, bf16), strict=True)))
    try:
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n)
            else:
                os.environ[n] = v


def load(model_dir: Path, variant: str, batch: int) -> LLM:
    # A cache for `batch` rows of prompt + decode (engine_decode's 64 + 128 tokens), not the 4 GiB
    # default; the prefill timing's prompt fits too.
    with variant_env(variant):
        return LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=max(batch, 4), max_model_len=1024,
                   kv_cache_memory=1 << 30, quantization=VARIANTS[variant][2])


def prefill_ms(llm: LLM) -> float:
    """Time to the first token of one `PREFILL_TOKENS`-token prompt (one chunk, the op-by-op path)."""
    prompt = {"prompt_token_ids": list(range(3, 3 + PREFILL_TOKENS))}
    params = SamplingParams(max_tokens=1, detokenize=False)
    return best_of_ms(lambda: llm.generate([prompt], params, use_tqdm=False), repeats=3, calls=1)


QUANTIZED = ("int8", "int4")


def quantized_quality(model_dir: Path, prompts: list[Any], greedy_tokens: int) -> dict[str, dict[str, Any]]:
    """Each quantization against the unquantized checkpoint: teacher-forced logprob changes over
    each prompt continued greedily by the unquantized model, and the greedy continuations themselves."""
    context = min(1024, json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    full, *quantized = (LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory=1 << 28, max_model_len=context,
                            quantization=q) for q in (None, *QUANTIZED))
    return {q: llm_agreement(full, llm, prompts, greedy_tokens) for q, llm in zip(QUANTIZED, quantized, strict=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-100m-bf16", help="a bfloat16 checkpoint directory or preset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rows", default="1,2,4,8,16", help="decode forward passes of these many rows")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quality-model", default=str(Path(__file__).resolve().parents[2] / "shared" / "models" /
                                                  "stories260k"))
    p.add_argument("--variants", default="all", help=f"comma-separated, of: {', '.join(VARIANTS)}; the first is "
                   "the baseline of the ratios")
    p.add_argument("--out", default="results/weight-formats")
    args = p.parse_args()
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, label = resolve_model(args.model)
    rows = [int(x) for x in args.rows.split(",")]
    bandwidth = [copy_bandwidth_gbs(torch.device("cpu"))]
    llms = {v: load(model_dir, v, args.batch) for v in variants}
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        row = {}
        for v in variants:
            with variant_env(v):
                row[v] = {"b1_ms": decode_b1_ms(llms[v]), "prefill_ms": prefill_ms(llms[v]),
                          "batch_step_ms": engine_decode(llms[v], args.batch)["step_ms"],
                          **{f"forward_{n}_ms": best_of_ms(decode_forward_fn(llms[v].engine, n, 64)) for n in rows}}
        rounds.append(row)
        print(f"[weight-formats] round {r + 1}: " + ", ".join(
            f"{v} {x['b1_ms']:.2f} / {x['batch_step_ms']:.1f} ms" for v, x in row.items()), flush=True)
    bandwidth.append(copy_bandwidth_gbs(torch.device("cpu")))
    peak_bw = max(bandwidth)
    base = variants[0]
    results: dict[str, Any] = {"model": label, "threads": args.threads, "batch": args.batch, "rows": rows,
                               "base": base, "copy_bandwidth_gbs_samples": [round(b, 1) for b in bandwidth],
                               "variants": {}}
    for v in variants:
        nbytes, form = streamed_weight_bytes(model_dir, llms[v].engine.model)
        b1 = statistics.median(x[v]["b1_ms"] for x in rounds)
        results["variants"][v] = {
            "weight_format": form, "weight_mb": round(nbytes / 1e6, 1),
            "held_weight_mb": round(cpu_decode.held_weight_bytes(llms[v].engine.model) / 1e6, 1),
            "prefill_ms": round(statistics.median(x[v]["prefill_ms"] for x in rounds), 2),
            "prefill_speedup": round(statistics.median(x[base]["prefill_ms"] / x[v]["prefill_ms"] for x in rounds), 3),
            "b1_ms": round(b1, 3), "b1_bound_ms": round(nbytes / peak_bw / 1e6, 3),
            "b1_fraction_of_bound": round(nbytes / peak_bw / 1e6 / b1, 4),
            "b1_speedup": round(statistics.median(x[base]["b1_ms"] / x[v]["b1_ms"] for x in rounds), 3),
            "batch_step_ms": round(statistics.median(x[v]["batch_step_ms"] for x in rounds), 2),
            "batch_speedup": round(statistics.median(x[base]["batch_step_ms"] / x[v]["batch_step_ms"]
                                                     for x in rounds), 3),
            "forward_ms": {n: round(statistics.median(x[v][f"forward_{n}_ms"] for x in rounds), 3) for n in rows},
            "forward_speedup": {n: round(statistics.median(x[base][f"forward_{n}_ms"] / x[v][f"forward_{n}_ms"]
                                                           for x in rounds), 3) for n in rows},
            "rounds": [{k: round(val, 3) for k, val in x[v].items()} for x in rounds]}
    del llms
    quality = {}
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    random_prompts = [{"prompt_token_ids": torch.randint(3, vocab, (32,), generator=g).tolist()} for _ in range(4)]
    quality[label] = quantized_quality(model_dir, random_prompts, greedy_tokens=64)
    if Path(args.quality_model).is_dir():
        quality[Path(args.quality_model).name] = quantized_quality(Path(args.quality_model), STORY_PROMPTS,
                                                                   greedy_tokens=120)
    results["quality"] = quality
    table = format_table(results)
    print(table)
    (out / "weight-formats.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "weight-formats.md").write_text(table + "\n")
    plot(results, out / "weight-formats.png")
    print(f"[weight-formats] wrote {out}/weight-formats.json, .md and .png")


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['model']}, float32 compute, {r['threads']} threads; copy bandwidth "
             f"{max(r['copy_bandwidth_gbs_samples'])} GB/s (samples {r['copy_bandwidth_gbs_samples']}); "
             f"ratios are to `{r['base']}` within each round", "",
             f"| weights | held | streamed per token | batch-1 ms/token | of the bound | ratio | "
             f"prefill {PREFILL_TOKENS} ms | ratio | batch-{r['batch']} step ms | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, x in r["variants"].items():
        lines.append(f"| {v} ({x['weight_format']}) | {x['held_weight_mb']} MB | {x['weight_mb']} MB | "
                     f"{x['b1_ms']} | {x['b1_fraction_of_bound']:.1%} | {x['b1_speedup']:.2f}x | {x['prefill_ms']} | "
                     f"{x['prefill_speedup']:.2f}x | {x['batch_step_ms']} | {x['batch_speedup']:.2f}x |")
    lines += ["", "| decode forward, rows | " + " | ".join(str(n) for n in r["rows"]) + " |",
              "|---|" + "---|" * len(r["rows"])]
    for v, x in r["variants"].items():
        lines.append(f"| {v}, ms (ratio) | " + " | ".join(
            f"{x['forward_ms'][n]} ({x['forward_speedup'][n]:.2f}x)" for n in r["rows"]) + " |")
    for q in QUANTIZED:
        lines += ["", *agreement_table(f"{q} vs unquantized, on", {m: x[q] for m, x in r["quality"].items()})]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = list(r["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, bound, title in ((axes[0], "b1_ms", "b1_bound_ms", "batch 1, ms per token"),
                                  (axes[1], "batch_step_ms", None, f"batch {r['batch']}, ms per step")):
        values = [r["variants"][n][key] for n in names]
        colors = {"before: dense + float32 panels": "#888888", "bfloat16 panels": "#4477aa", "int8": "#cc6677",
                  "int4": "#228833"}
        ax.bar(names, values, color=[colors[n] for n in names])
        if bound:
            ax.scatter(names, [r["variants"][n][bound] for n in names], color="black", marker="_", s=800,
                       label="weight-read bound", zorder=3)
            ax.legend()
        ax.set_title(title)
        ax.set_ylabel("ms")
    fig.suptitle(f"fused CPU decode by weight format: {r['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

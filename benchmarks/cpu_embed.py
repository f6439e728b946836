"""Embeddings: lengthwise's `LLM.embed` against transformers' base model in padded batches, in one run.

    .venv/bin/python benchmarks/cpu_embed.py [--data ../shared/data/alpaca-lengths/dev.jsonl]
        [--model llama-100m] [--prompts 128] [--batch-size 32] [--pooling last,mean]
        [--threads 2] [--rounds 2] [--out results/embed]

The first `--prompts` Alpaca prompts (the first paper's benchmark, read from `--data`; lengths
vary with the instruction) are embedded by:

- **lengthwise**: `LLM.embed`, every prompt queued at once; steps pack whole prompts (chunks of
  long ones) up to `max_num_batched_tokens` with no padding. Shown with the prefix cache on (the
  default: the prompts' shared Alpaca template is computed once for last-token pooling; mean
  pooling reads every position, so it never reuses a prefix) and off;
- **transformers, sorted**: the checkpoint's base model (`AutoModel`, sdpa attention) in batches of
  `--batch-size` after sorting the prompts by length, as sentence-transformers' `encode` does to
  waste little on padding, pooled with the attention mask (last real token, or the masked mean);
- **transformers, in order**: the same batches without the sort (the padding a naive loop pays);
- **lengthwise, no prefix cache, panel GEMM only**: `LENGTHWISE_DENSE_ROWS=0`, the A/B of long
  prefill steps' products on MKL (the weights unpacked) against the panel kernel.

Reported per pooling type: prompts and prompt tokens per second, the speed-up over each
transformers mode measured in the same round (engines alternate; the median round's ratio is
shown), and the largest difference between lengthwise's and transformers' vectors. Writes
embed.json, .md and .png to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lengthwise import LLM, PoolingParams
from lengthwise.argtypes import positive_int
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot
from lengthwise.bench.workloads import read_alpaca_records
from lengthwise.ops.linear import DENSE_ROWS_ENV

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-lengths" / "dev.jsonl"
MODES = ("lengthwise", "lengthwise, no prefix cache", "transformers, sorted", "transformers, in order",
         "lengthwise, no prefix cache, panel GEMM only")
OURS = (0, 1, 4)  # MODES' lengthwise rows


def run_lengthwise(llm: LLM, ids: list[list[int]], panels_only: bool = False) -> tuple[float, list[torch.Tensor]]:
    llm.reset_prefix_cache()  # a prefix is shared within the run (the template), never from the last run
    if panels_only:
        os.environ[DENSE_ROWS_ENV] = "0"
    try:
        t0 = time.perf_counter()
        outs = llm.embed([{"prompt_token_ids": p} for p in ids], PoolingParams(), use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        os.environ.pop(DENSE_ROWS_ENV, None)
    return seconds, [torch.tensor(o.outputs.embedding) for o in outs]


def run_transformers(hf: Any, ids: list[list[int]], batch_size: int, kind: str, sort: bool,
                     pad: int) -> tuple[float, list[torch.Tensor]]:
    """Right-padded batches through the base model, pooled with the mask, normalized."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort else list(range(len(ids)))
    vectors: list[torch.Tensor | None] = [None] * len(ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, len(order), batch_size):
            batch = order[a:a + batch_size]
            longest = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([ids[i] + [pad] * (longest - len(ids[i])) for i in batch])
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (longest - len(ids[i])) for i in batch])
            h = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
            if kind == "mean":
                pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            else:
                pooled = h[torch.arange(len(batch)), mask.sum(1) - 1]
            for i, v in zip(batch, F.normalize(pooled, dim=-1), strict=True):
                vectors[i] = v
    return time.perf_counter() - t0, vectors  # type: ignore[return-value]


def main() -> None:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model", default="llama-100m", help="a checkpoint directory or a preset (default llama-100m)")
    p.add_argument("--prompts", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=32, help="transformers' batch (sentence-transformers' "
                   "default, 32)")
    p.add_argument("--pooling", default="last,mean")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/embed"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, label = resolve_model(args.model)
    prompts = [prompt for _, prompt, _ in read_alpaca_records(args.data, args.prompts)]
    hf = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    results: list[dict[str, Any]] = []
    for kind in args.pooling.split(","):
        engines = {cache: LLM(model_dir, dtype="float32", device="cpu", enable_prefix_caching=cache,
                              pooler_config={"pooling_type": kind}) for cache in (True, False)}
        tok = engines[True].get_tokenizer()
        ids = [tok.encode(t) for t in prompts]
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0

        def run(mode: str) -> tuple[float, list[torch.Tensor]]:
            if MODES.index(mode) in OURS:
                return run_lengthwise(engines[mode == MODES[0]], ids, mode == MODES[4])  # noqa: B023 (called now)
            return run_transformers(hf, ids, args.batch_size, kind, mode == MODES[2], pad)  # noqa: B023

        for mode in MODES:  # warm-up, on a few prompts
            if MODES.index(mode) in OURS:
                run_lengthwise(engines[mode == MODES[0]], ids[:8])
            else:
                run_transformers(hf, ids[:8], args.batch_size, kind, True, pad)
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        vectors: dict[str, list[torch.Tensor]] = {}
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                s, vectors[mode] = run(mode)
                seconds[mode].append(s)
            print(f"[embed] {kind} round {r + 1}: " + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in MODES),
                  flush=True)
        tokens = sum(len(i) for i in ids)
        diff = max((a - b).abs().max().item() for a, b in zip(vectors[MODES[0]], vectors[MODES[2]], strict=True))
        row: dict[str, Any] = dict(pooling=kind, prompts=len(ids), tokens=tokens, max_abs_diff=diff,
                                   seconds={m: statistics.median(v) for m, v in seconds.items()})
        for base in MODES[2:4]:
            for mode in (MODES[i] for i in OURS):
                row[f"{mode} / {base}"] = statistics.median(
                    [t / o for o, t in zip(seconds[mode], seconds[base], strict=True)])
        padded = {True: 0, False: 0}
        for sort in (True, False):
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i])) if sort else list(range(len(ids)))
            for a in range(0, len(order), args.batch_size):
                batch = order[a:a + args.batch_size]
                padded[sort] += len(batch) * max(len(ids[i]) for i in batch)
        row["padding_sorted"] = 1 - tokens / padded[True]
        row["padding_in_order"] = 1 - tokens / padded[False]
        results.append(row)
    table = format_table(results)
    print(table)
    meta = dict(model=label, threads=args.threads, rounds=args.rounds, batch_size=args.batch_size,
                torch=torch.__version__, data=str(args.data))
    (args.out / "embed.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    (args.out / "embed.md").write_text(table + "\n")
    plot(results, args.out / "embed.png", label)
    print(f"[embed] wrote {args.out}/embed.json, .md, .png")


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| pooling | prompts | prompt tokens | mode | seconds | prompts/s | tokens/s | lengthwise speed-up "
             "(same round) | max abs diff vs transformers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for mode in MODES:
            s = r["seconds"][mode]
            if MODES.index(mode) in OURS:
                speed = " / ".join(f"{r[f'{mode} / {b}']:.2f}x vs {b.split(', ')[1]}" for b in MODES[2:4])
            else:
                pad = r["padding_sorted" if mode.endswith("sorted") else "padding_in_order"]
                speed = f"(padding {pad:.0%} of its tokens)"
            diff = f"{r['max_abs_diff']:.1e}" if mode == MODES[0] else ""
            lines.append(f"| {r['pooling']} | {r['prompts']} | {r['tokens']} | {mode} | {s:.2f} | "
                         f"{r['prompts'] / s:.1f} | {r['tokens'] / s:.0f} | {speed} | {diff} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, label: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.16
    for k, mode in enumerate(MODES):
        xs = [i + (k - 2) * width for i in range(len(results))]
        ys = [r["tokens"] / r["seconds"][mode] for r in results]
        ax.bar(xs, ys, width, label=mode)
    ax.set_xticks(range(len(results)), [f"{r['pooling']} pooling" for r in results])
    ax.set_ylabel("prompt tokens / s")
    ax.set_title(f"Embedding {results[0]['prompts']} Alpaca prompts, {label}, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

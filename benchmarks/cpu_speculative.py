"""Speculative decoding (n-gram drafts) against plain decoding on the CPU, in one run.

    .venv/bin/python benchmarks/cpu_speculative.py [--threads 2] [--rounds 2] [--k 2,4,8] [--batch 1,4,16]
        [--workloads tiny-tasks,stories260k,llama-100m] [--out DIR]

Each workload is generated greedily with plain decoding and with `speculative_config={"method":
"ngram", "num_speculative_tokens": K}` for each `--k`, at each `--batch` (`max_num_seqs`):

- **tiny-tasks**: the built-in instruction model on 32 held-out instructions of its task families
  (counting, sorting, reversing, repeating, describing, ...), chat-rendered, to its own end;
- **stories260k**: `../shared/models/stories260k` (a real trained tiny Llama) on 24 story openings,
  up to 256 tokens or its end (skipped if absent);
- **llama-100m**: the 100M-parameter preset (random weights, 12 layers of 768) on 16 prompts, 128
  tokens each: a model whose batch-1 decode step costs what reading its weights costs, so a
  verify step of 1 + K tokens per row costs little more than a plain step. Its random weights
  write loops, which the lookup predicts well: read its acceptance as an upper end, its verify
  cost (the `ms/step` column) as the model's.

Reported per run: generated tokens per second, the speed-up over plain decoding measured in the
same round, the draft acceptance rate, tokens per row-step (generated tokens / (rows x steps)),
ms per step, and whether every output is token-for-token plain decoding's. Modes alternate within
each of `--rounds` rounds (this host's speed drifts between minutes); tables give the median
round's ratio. Writes speculative.json, .md and .png to `--out`.
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
from lengthwise.argtypes import positive_int, positive_int_list
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot
from lengthwise.model.default import default_model_dir

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
STORY_PROMPTS = ["Once upon a time, there was a little girl named Lily.", "Tom and his dog went to the park.",
                 "One day, a big bird", "The sun was hot.", "Ben had a red ball.", "Sue wanted to play outside."]


def workloads(names: list[str]) -> list[dict[str, Any]]:
    """Each workload: label, model directory, prompts (text, or chat messages), sampling params."""
    from lengthwise.tiny.demo import held_out_instructions

    out = []
    for name in names:
        if name == "tiny-tasks":
            instructions = [e.instruction for e in held_out_instructions(32)]
            out.append(dict(name=name, model=default_model_dir(), chat=[[{"role": "user", "content": i}]
                                                                        for i in instructions],
                            params=SamplingParams(temperature=0.0, max_tokens=512)))
        elif name == "stories260k":
            if not STORIES.is_dir():
                print(f"[speculative] {STORIES} is absent: stories260k skipped")
                continue
            out.append(dict(name=name, model=STORIES, prompts=STORY_PROMPTS * 4,
                            params=SamplingParams(temperature=0.0, max_tokens=256)))
        elif name == "llama-100m":
            model, _ = resolve_model("llama-100m")
            instructions = [e.instruction for e in held_out_instructions(16)]
            out.append(dict(name=name, model=model, prompts=instructions,
                            params=SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)))
        else:
            raise ValueError(f"--workloads: unknown workload {name!r} (tiny-tasks, stories260k, llama-100m)")
    return out


def run_once(llm: LLM, w: dict[str, Any]) -> dict[str, Any]:
    stats = llm.engine.stats
    before = (stats.sampling_steps, stats.row_steps, stats.draft_tokens, stats.accepted_tokens)
    t0 = time.perf_counter()
    if "chat" in w:
        outs = llm.chat(w["chat"], w["params"], use_tqdm=False)
    else:
        outs = llm.generate(w["prompts"], w["params"], use_tqdm=False)
    seconds = time.perf_counter() - t0
    steps, rows, drafted, kept = (a - b for a, b in zip(
        (stats.sampling_steps, stats.row_steps, stats.draft_tokens, stats.accepted_tokens), before, strict=True))
    tokens = [o.outputs[0].token_ids for o in outs]
    generated = sum(len(t) for t in tokens)
    return dict(seconds=seconds, tokens=generated, tok_s=generated / seconds, steps=steps,
                ms_per_step=1000 * seconds / steps, tokens_per_row_step=generated / rows,
                acceptance=kept / drafted if drafted else None, outputs=tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--k", type=positive_int_list, default=[2, 4, 8], help="num_speculative_tokens values")
    p.add_argument("--batch", type=positive_int_list, default=[1, 4, 16], help="max_num_seqs values")
    p.add_argument("--workloads", default="tiny-tasks,stories260k,llama-100m")
    p.add_argument("--out", type=Path, default=Path("results/speculative"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    modes: list[int] = [0, *args.k]  # 0: plain decoding
    results: list[dict[str, Any]] = []
    for w in workloads(args.workloads.split(",")):
        for batch in args.batch:
            llms = {k: LLM(w["model"], dtype="float32", device="cpu", max_num_seqs=batch,
                           speculative_config=None if k == 0 else {"method": "ngram", "num_speculative_tokens": k})
                    for k in modes}
            run_once(llms[0], w)  # warm-up (kernels built, caches touched)
            rounds: list[dict[int, dict[str, Any]]] = []
            for r in range(args.rounds):
                order = modes if r % 2 == 0 else modes[::-1]
                rounds.append({k: run_once(llms[k], w) for k in order})
                print(f"[speculative] {w['name']} batch {batch} round {r + 1}: " + ", ".join(
                    f"k={k} {rounds[-1][k]['tok_s']:.1f} tok/s" for k in modes), flush=True)
            for k in modes:
                runs = [rd[k] for rd in rounds]
                ratios = [rd[k]["tok_s"] / rd[0]["tok_s"] for rd in rounds]
                mid = runs[sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]]
                results.append(dict(
                    workload=w["name"], batch=batch, k=k, tok_s=mid["tok_s"], speedup=statistics.median(ratios),
                    acceptance=mid["acceptance"], tokens_per_row_step=mid["tokens_per_row_step"],
                    ms_per_step=mid["ms_per_step"], steps=mid["steps"], tokens=mid["tokens"],
                    same_as_plain=all(rd[k]["outputs"] == rd[0]["outputs"] for rd in rounds)))
    table = format_table(results)
    print(table)
    meta = dict(threads=args.threads, rounds=args.rounds, torch=torch.__version__)
    (args.out / "speculative.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    (args.out / "speculative.md").write_text(table + "\n")
    plot(results, args.out / "speculative.png")
    print(f"[speculative] wrote {args.out}/speculative.json, .md, .png")


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | batch | mode | tok/s | speed-up | acceptance | tokens/row-step | ms/step | steps "
             "| same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mode = "plain" if r["k"] == 0 else f"ngram k={r['k']}"
        acc = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        lines.append(f"| {r['workload']} | {r['batch']} | {mode} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {acc} "
                     f"| {r['tokens_per_row_step']:.2f} | {r['ms_per_step']:.1f} | {r['steps']} "
                     f"| {'yes' if r['same_as_plain'] else 'NO'} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    groups = sorted({(r["workload"], r["batch"]) for r in results}, key=lambda g: (g[0], g[1]))
    ks = sorted({r["k"] for r in results if r["k"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups)), 4))
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        ys = [next((r["speedup"] for r in results if (r["workload"], r["batch"]) == g and r["k"] == k), 0.0)
              for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], ys, width, label=f"ngram k={k}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + width * (len(ks) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{w}\nbatch {b}" for w, b in groups])
    ax.set_ylabel("tokens/s over plain decoding (same round)")
    ax.set_title("Speculative decoding (n-gram drafts), greedy, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

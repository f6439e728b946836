"""Speculative decoding (n-gram drafts) against plain decoding on the CPU, in one run.

    .venv/bin/python benchmarks/cpu_speculative.py [--threads 2] [--rounds 2] [--k 2,4,8] [--adaptive-k 8]
        [--batch 1,4,16] [--workloads tiny-tasks,stories260k,llama-100m,llama-100m-noisy] [--out DIR]

Each workload is generated greedily with plain decoding, with `speculative_config={"method":
"ngram", "num_speculative_tokens": K, "adaptive": False}` for each `--k` (every row verifies what
the lookup finds, up to K; the default) and with adaptive draft lengths (`"adaptive": True`, up
to K) for each `--adaptive-k`, at each `--batch` (`max_num_seqs`):

- **tiny-tasks**: the built-in instruction model on 32 held-out instructions of its task families
  (counting, sorting, reversing, repeating, describing, ...), chat-rendered, to its own end;
- **stories260k**: `../shared/models/stories260k` (a real trained tiny Llama) on 24 story openings,
  up to 256 tokens or its end (skipped if absent);
- **llama-100m**: the 100M-parameter preset (random weights, 12 layers of 768) on 16 prompts, 128
  tokens each: a model whose batch-1 decode step costs what reading its weights costs, so a
  verify step of 1 + K tokens per row costs little more than a plain step. Its random weights
  write loops, which the lookup predicts well: read its acceptance as an upper end, its verify
  cost (the `ms/step` column) as the model's;
- **llama-100m-noisy**: the same, with each drafted token replaced by another with probability
  0.3 (seeded) before it is verified: a 100M model's verify costs at the acceptance real text
  gets (about 65% per token; the outputs are still plain decoding's, verification refuses the
  changed tokens).

Reported per run: generated tokens per second, the speed-up over plain decoding measured in the
same round, the draft acceptance rate, tokens per row-step (generated tokens / (rows x steps)),
ms per step, and whether every output is token-for-token plain decoding's. Modes alternate within
each of `--rounds` rounds (this host's speed drifts between minutes); tables give the median
round's ratio. Writes speculative.json, .md and .png to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
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
        elif name == "llama-100m-noisy":
            model, _ = resolve_model("llama-100m")
            instructions = [e.instruction for e in held_out_instructions(16)]
            out.append(dict(name=name, model=model, prompts=instructions, noise=0.3,
                            params=SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)))
        else:
            raise ValueError(f"--workloads: unknown workload {name!r} "
                             "(tiny-tasks, stories260k, llama-100m, llama-100m-noisy)")
    return out


class NoisyDrafts:
    """A proposer whose drafted tokens are each replaced by another with probability `noise`."""

    def __init__(self, inner: Any, noise: float, vocab_size: int, seed: int = 0) -> None:
        self.inner, self.noise, self.vocab_size = inner, noise, vocab_size
        self.rng = random.Random(seed)

    def propose(self, seq: Any, max_tokens: int) -> list[int]:
        return [(t + 1 + self.rng.randrange(self.vocab_size - 1)) % self.vocab_size
                if self.rng.random() < self.noise else t for t in self.inner.propose(seq, max_tokens)]

    def forget(self, seq: Any) -> None:
        self.inner.forget(seq)


def make_llm(w: dict[str, Any], batch: int, mode: tuple[int, bool]) -> LLM:
    """The workload's LLM for a mode `(K, adaptive)`; K 0 is plain decoding."""
    k, adaptive = mode
    spec = None if k == 0 else {"method": "ngram", "num_speculative_tokens": k, "adaptive": adaptive}
    # A fixed, modest KV cache: several engines of each workload are alive at once.
    llm = LLM(w["model"], dtype="float32", device="cpu", max_num_seqs=batch, speculative_config=spec,
              kv_cache_memory=512 << 20)
    if k and w.get("noise"):
        sched = llm.engine.scheduler
        sched.proposer = NoisyDrafts(sched.proposer, w["noise"], llm.engine.model.config.vocab_size)
    return llm


def mode_name(mode: tuple[int, bool]) -> str:
    k, adaptive = mode
    return "plain" if k == 0 else f"{'adaptive' if adaptive else 'ngram'} k={k}"


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
    return dict(seconds=seconds, tokens=generated, tok_s=generated / seconds, steps=steps, drafted=drafted,
                ms_per_step=1000 * seconds / steps, tokens_per_row_step=generated / rows,
                acceptance=kept / drafted if drafted else None, outputs=tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--k", type=positive_int_list, default=[2, 4, 8],
                   help="num_speculative_tokens values with fixed draft lengths")
    p.add_argument("--adaptive-k", type=positive_int_list, default=[8],
                   help="num_speculative_tokens values with adaptive draft lengths")
    p.add_argument("--batch", type=positive_int_list, default=[1, 4, 16], help="max_num_seqs values")
    p.add_argument("--workloads", default="tiny-tasks,stories260k,llama-100m,llama-100m-noisy")
    p.add_argument("--out", type=Path, default=Path("results/speculative"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    modes: list[tuple[int, bool]] = [(0, False), *((k, False) for k in args.k), *((k, True) for k in args.adaptive_k)]
    results: list[dict[str, Any]] = []
    for w in workloads(args.workloads.split(",")):
        for batch in args.batch:
            llms = None  # the last batch size's engines go before the next ones are built
            gc.collect()  # (an engine and its length perception refer to each other)
            llms = {m: make_llm(w, batch, m) for m in modes}
            for m in modes:
                run_once(llms[m], w)  # warm-up (kernels built, caches touched, adaptive step costs seen)
            rounds: list[dict[tuple[int, bool], dict[str, Any]]] = []
            for r in range(args.rounds):
                order = modes if r % 2 == 0 else modes[::-1]
                rounds.append({m: run_once(llms[m], w) for m in order})
                print(f"[speculative] {w['name']} batch {batch} round {r + 1}: " + ", ".join(
                    f"{mode_name(m)} {rounds[-1][m]['tok_s']:.1f} tok/s" for m in modes), flush=True)
            plain = modes[0]
            for m in modes:
                runs = [rd[m] for rd in rounds]
                ratios = [rd[m]["tok_s"] / rd[plain]["tok_s"] for rd in rounds]
                mid = runs[sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]]
                results.append(dict(
                    workload=w["name"], batch=batch, mode=mode_name(m), k=m[0], adaptive=m[1], tok_s=mid["tok_s"],
                    speedup=statistics.median(ratios), acceptance=mid["acceptance"],
                    tokens_per_row_step=mid["tokens_per_row_step"], ms_per_step=mid["ms_per_step"],
                    steps=mid["steps"], tokens=mid["tokens"], drafted=mid["drafted"],
                    same_as_plain=all(rd[m]["outputs"] == rd[plain]["outputs"] for rd in rounds)))
    table = format_table(results)
    print(table)
    meta = dict(threads=args.threads, rounds=args.rounds, torch=torch.__version__)
    (args.out / "speculative.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    (args.out / "speculative.md").write_text(table + "\n")
    plot(results, args.out / "speculative.png")
    print(f"[speculative] wrote {args.out}/speculative.json, .md, .png")


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | batch | mode | tok/s | speed-up | acceptance | drafted/token | tokens/row-step | ms/step "
             "| steps | same tokens |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        acc = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        lines.append(f"| {r['workload']} | {r['batch']} | {r['mode']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x "
                     f"| {acc} | {r['drafted'] / r['tokens']:.2f} | {r['tokens_per_row_step']:.2f} "
                     f"| {r['ms_per_step']:.1f} | {r['steps']} | {'yes' if r['same_as_plain'] else 'NO'} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    groups = sorted({(r["workload"], r["batch"]) for r in results}, key=lambda g: (g[0], g[1]))
    modes = list(dict.fromkeys(r["mode"] for r in results if r["k"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups)), 4))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        ys = [next((r["speedup"] for r in results if (r["workload"], r["batch"]) == g and r["mode"] == mode), 0.0)
              for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], ys, width, label=mode)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{w}\nbatch {b}" for w, b in groups])
    ax.set_ylabel("tokens/s over plain decoding (same round)")
    ax.set_title("Speculative decoding (n-gram drafts, fixed and adaptive lengths), greedy, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

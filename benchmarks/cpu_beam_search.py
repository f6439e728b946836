"""Beam search: lengthwise's `LLM.beam_search` against transformers' `generate(num_beams=W)`, in one run.

    .venv/bin/python benchmarks/cpu_beam_search.py [--threads 2] [--rounds 2] [--widths 2,4,8]
        [--workloads stories260k,llama-100m] [--out DIR]

Each workload's prompts are beam-searched, all in one batch, by both engines at each beam width
`--widths`:

- **stories260k**: `../shared/models/stories260k` (a real trained tiny Llama, 260K parameters) on
  24 story openings, up to 256 tokens or its end token (skipped if absent): a model so small that
  a step costs its per-row overheads, not its weights;
- **llama-100m**: the 100M-parameter preset (random weights, 12 layers of 768) on 8 instructions,
  48 tokens each (its random weights never end): a step costs reading the weights and the beams'
  attention.

transformers runs the same prompts as one left-padded batch (`generate(num_beams=W,
num_return_sequences=W, early_stopping=False, length_penalty=1.0)`, its defaults). Reported per
width: answer tokens per second (the W answers' tokens of every prompt over the wall time), the
speed-up over transformers measured in the same round, whether each prompt's best answer is
transformers' (padding changes transformers' arithmetic a little, so a near tie may differ), and
the KV memory the beams held at their peak: lengthwise's blocks in use (the prompt once per
request, response blocks shared by beams with a common history, a partly filled block copied on
a fork) against the tokens transformers' cache holds (every beam its own copy of prompt and
answer, padding included). Engines alternate within each of `--rounds` rounds; tables give the
median round's ratio. Writes beam_search.json, .md and .png to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from cpu_speculative import STORIES, STORY_PROMPTS  # (the speculative benchmark's stories workload)

from lengthwise import LLM, BeamSearchParams
from lengthwise.argtypes import positive_int, positive_int_list
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot


def workloads(names: list[str]) -> list[dict[str, Any]]:
    """Each workload: label, model directory, prompts, answer length."""
    from lengthwise.tiny.demo import held_out_instructions

    out = []
    for name in names:
        if name == "stories260k":
            if not STORIES.is_dir():
                print(f"[beam] {STORIES} is absent: stories260k skipped")
                continue
            out.append(dict(name=name, model=STORIES, prompts=STORY_PROMPTS * 4, max_tokens=256))
        elif name == "llama-100m":
            model, _ = resolve_model("llama-100m")
            out.append(dict(name=name, model=model, prompts=[e.instruction for e in held_out_instructions(8)],
                            max_tokens=48))
        else:
            raise ValueError(f"--workloads: unknown workload {name!r} (stories260k, llama-100m)")
    return out


def run_lengthwise(llm: LLM, w: dict[str, Any], width: int) -> dict[str, Any]:
    """One beam search of every prompt; the peak KV blocks in use, sampled after every step."""
    engine = llm.engine
    peak = 0
    step = engine.step

    def counting_step() -> Any:
        nonlocal peak
        out = step()
        peak = max(peak, engine.num_blocks - engine.scheduler.kv.num_free_blocks)
        return out

    engine.step = counting_step  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        outs = llm.beam_search(w["prompts"], BeamSearchParams(beam_width=width, max_tokens=w["max_tokens"]))
        seconds = time.perf_counter() - t0
    finally:
        del engine.step
    answers = [[s.tokens[len(s.tokens) - len(s.logprobs):] for s in o.sequences] for o in outs]
    tokens = sum(len(a) for per in answers for a in per)
    return dict(seconds=seconds, tokens=tokens, tok_s=tokens / seconds, answers=answers,
                kv_tokens=peak * engine.config.block_size)


def run_transformers(hf: Any, tok: Any, w: dict[str, Any], width: int, eos: set[int]) -> dict[str, Any]:
    """The same prompts as one left-padded batch through `generate(num_beams=width)`."""
    ids = [tok.encode(p) for p in w["prompts"]]
    longest = max(len(i) for i in ids)
    pad = 0
    input_ids = torch.tensor([[pad] * (longest - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=mask, num_beams=width, num_return_sequences=width,
                          max_new_tokens=w["max_tokens"], do_sample=False, early_stopping=False, length_penalty=1.0,
                          pad_token_id=pad)
    seconds = time.perf_counter() - t0
    answers: list[list[list[int]]] = []
    for p in range(len(ids)):
        per = []
        for row in out[p * width:(p + 1) * width, longest:].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), None)
            per.append(row if end is None else row[:end + 1])
        answers.append(per)
    tokens = sum(len(a) for per in answers for a in per)
    # Its cache: every beam of every prompt holds the padded prompt and the longest answer.
    kv_tokens = len(ids) * width * (out.shape[1] - 1)
    return dict(seconds=seconds, tokens=tokens, tok_s=tokens / seconds, answers=answers, kv_tokens=kv_tokens)


def main() -> None:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--widths", type=positive_int_list, default=[2, 4, 8])
    p.add_argument("--workloads", default="stories260k,llama-100m")
    p.add_argument("--out", type=Path, default=Path("results/beam"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for w in workloads(args.workloads.split(",")):
        gc.collect()
        llm = LLM(w["model"], dtype="float32", device="cpu", max_num_seqs=len(w["prompts"]) * max(args.widths),
                  kv_cache_memory=1 << 30, enable_prefix_caching=False)
        tok = llm.get_tokenizer()
        hf = transformers.AutoModelForCausalLM.from_pretrained(w["model"], dtype=torch.float32).eval()
        eos = set(llm.engine.eos_token_ids)
        for width in args.widths:
            run_lengthwise(llm, w, width)  # warm-up
            rounds = []
            for r in range(args.rounds):
                ours_first = r % 2 == 0
                first = run_lengthwise(llm, w, width) if ours_first else run_transformers(hf, tok, w, width, eos)
                second = run_transformers(hf, tok, w, width, eos) if ours_first else run_lengthwise(llm, w, width)
                ours, theirs = (first, second) if ours_first else (second, first)
                rounds.append((ours, theirs))
                print(f"[beam] {w['name']} width {width} round {r + 1}: lengthwise {ours['tok_s']:.0f} tok/s, "
                      f"transformers {theirs['tok_s']:.0f} tok/s", flush=True)
            ratios = [o["tok_s"] / t["tok_s"] for o, t in rounds]
            ours, theirs = rounds[sorted(range(len(rounds)), key=lambda i: ratios[i])[len(rounds) // 2]]
            best_same = sum(o[0] == t[0] for o, t in zip(ours["answers"], theirs["answers"], strict=True))
            results.append(dict(workload=w["name"], width=width, prompts=len(w["prompts"]),
                                tok_s=ours["tok_s"], hf_tok_s=theirs["tok_s"], speedup=statistics.median(ratios),
                                tokens=ours["tokens"], best_same=best_same, kv_tokens=ours["kv_tokens"],
                                hf_kv_tokens=theirs["kv_tokens"]))
        del llm, hf
    table = format_table(results)
    print(table)
    meta = dict(threads=args.threads, rounds=args.rounds, torch=torch.__version__)
    (args.out / "beam_search.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    (args.out / "beam_search.md").write_text(table + "\n")
    plot(results, args.out / "beam_search.png")
    print(f"[beam] wrote {args.out}/beam_search.json, .md, .png")


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | beams | prompts | lengthwise tok/s | transformers tok/s | speed-up | best answer = "
             "transformers' | KV tokens held (peak) | transformers' cache tokens | KV ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['workload']} | {r['width']} | {r['prompts']} | {r['tok_s']:.0f} | {r['hf_tok_s']:.0f} "
                     f"| {r['speedup']:.2f}x | {r['best_same']}/{r['prompts']} | {r['kv_tokens']} "
                     f"| {r['hf_kv_tokens']} | {r['kv_tokens'] / r['hf_kv_tokens']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = sorted({r["workload"] for r in results}, key=[r["workload"] for r in results].index)
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        rows = [r for r in results if r["workload"] == name]
        x = range(len(rows))
        labels = [str(r["width"]) for r in rows]
        ax = axes[0][col]
        ax.bar([i - 0.2 for i in x], [r["tok_s"] for r in rows], 0.4, label="lengthwise")
        ax.bar([i + 0.2 for i in x], [r["hf_tok_s"] for r in rows], 0.4, label="transformers")
        for i, r in zip(x, rows, strict=True):
            ax.annotate(f"{r['speedup']:.1f}x", (i - 0.2, r["tok_s"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("beam width")
        ax.set_ylabel("answer tokens / s")
        ax.set_title(f"{name}: throughput")
        ax.legend()
        ax = axes[1][col]
        ax.bar([i - 0.2 for i in x], [r["kv_tokens"] for r in rows], 0.4, label="lengthwise (peak, shared)")
        ax.bar([i + 0.2 for i in x], [r["hf_kv_tokens"] for r in rows], 0.4, label="transformers (a copy per beam)")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("beam width")
        ax.set_ylabel("KV cache tokens")
        ax.set_title(f"{name}: KV held")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

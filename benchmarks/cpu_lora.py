"""Serving LoRA adapters on the CPU, in one run: one engine batching every adapter's requests
together against one model per adapter served in turn.

    .venv/bin/python benchmarks/cpu_lora.py [--model llama-100m] [--threads 2] [--rounds 2]
        [--adapters 4] [--rank 16] [--requests 64] [--prompt-len 64] [--output-len 128] [--out DIR]

`--adapters` random LoRA adapters of `--rank` on every decoder projection (PEFT saves, written to
`--out`), `--requests` requests of `--prompt-len` random tokens spread round-robin over them, each
decoding `--output-len` tokens (ignore_eos). Variants, as generated tokens per second:

- **merged, one adapter at a time** (the baseline): what serving without multi-LoRA does, one model
  with the adapter merged into its weights per adapter, each adapter's requests batched alone and
  the adapters served one after another. A merged model costs what the base model costs, so this
  runs the base model on each adapter's share of the requests in turn;
- **multi-LoRA, max_loras=A**: one engine (`enable_lora`), every adapter's requests in the same
  continuous batch;
- **multi-LoRA, max_loras=1**: vLLM's default: adapters take turns, the batch holds one at a time;
- **one adapter for all**: every request on the same adapter, the LoRA path's cost over the base model;
- **base model, one batch** (the bound): all requests on the base model together, as if adapters
  cost nothing.

Variants alternate within each of `--rounds` rounds; ratios are taken within a round, and the
tables give the median round.

Then (`--step-batches`, default 1,64) the decode step itself: at each batch size, the median time
of a decode-only step (the model runner's whole step) with the first adapter on every row, on the
fused CPU step (`lora.h`) and on the op-by-op path (`LENGTHWISE_CPU_FUSED=0`, where adapter steps
ran before the fused step took them), against the base model's fused step. Writes lora.json, .md
and .png to `--out`.
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
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lengthwise import LLM, SamplingParams
from lengthwise.bench.presets import resolve_model
from lengthwise.bench.report import pyplot
from lengthwise.lora import LoRARequest
from lengthwise.model.config import ModelConfig
from lengthwise.ops.cpu.decode import FUSED_ENV

BASELINE = "merged, one adapter at a time"
BOUND = "base model, one batch"


def write_adapter(path: Path, config: ModelConfig, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter of `rank` on every projection of a dense model of `config`."""
    c, g = config, torch.Generator().manual_seed(seed)
    h, i = c.hidden_size, c.intermediate_size
    shapes = {"self_attn.q_proj": (c.q_size, h), "self_attn.k_proj": (c.kv_size, h), "self_attn.v_proj": (c.kv_size, h),
              "self_attn.o_proj": (h, c.q_size), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}
    tensors = {}
    for layer in range(c.num_layers):
        for module, (out_features, in_features) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) / in_features ** 0.5
            tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(out_features, rank, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": [m.split(".")[1] for m in shapes]}))
    return path


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams,
          loras: list[LoRARequest | None] | None = None) -> tuple[float, int]:
    """Seconds to generate for `prompts` (one `generate` call) and the tokens generated."""
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


STEP_VARIANTS = ("base model, fused step", "adapter, fused step", "adapter, op-by-op step")


def step_times(llm: LLM, prompts: list[list[int]], lora: LoRARequest, batch: int, rounds: int,
               decode_tokens: int = 24) -> dict[str, float]:
    """Median seconds of a decode-only step of `batch` rows for each of STEP_VARIANTS: `batch`
    prompts decode `decode_tokens` tokens per run, the variants alternating, `rounds` runs each."""
    times: dict[str, list[float]] = {name: [] for name in STEP_VARIANTS}
    runner = llm.engine.runner
    real = runner.run
    current = [""]

    def timed_run(chunks, kv, padding_rows=0):
        start = time.perf_counter()
        out = real(chunks, kv, padding_rows)
        if len(chunks) == batch and all(c.num_tokens == 1 and c.seq is not None for c in chunks):
            times[current[0]].append(time.perf_counter() - start)
        return out

    runner.run = timed_run
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    try:
        for _ in range(rounds):
            for name in STEP_VARIANTS:
                current[0] = name
                os.environ[FUSED_ENV] = "0" if "op-by-op" in name else "1"
                llm.generate([{"prompt_token_ids": p} for p in prompts[:batch]], params, use_tqdm=False,
                             lora_request=None if name.startswith("base") else lora)
    finally:
        runner.run = real
        os.environ.pop(FUSED_ENV, None)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-100m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("results/lora"))
    ap.add_argument("--step-batches", default="1,64", help="batch sizes of the decode-step timing ('' skips it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, _ = resolve_model(args.model)
    config = ModelConfig.from_dir(model_dir)
    loras = [LoRARequest(f"adapter{i}", i + 1, str(write_adapter(args.out / f"adapter{i}", config, args.rank, i)))
             for i in range(args.adapters)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.requests)]
    per_request = [loras[i % args.adapters] for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    # No prefix caching: every variant runs the same prompts again, and cached prompts would skip
    # the prefill of some variants and not of others (a base-model engine's cache serves every
    # later base run; an adapter's prompts are cached per adapter).
    common = dict(dtype="float32", device="cpu", max_model_len=args.prompt_len + args.output_len,
                  max_num_seqs=args.requests, kv_cache_memory=1 << 30, enable_prefix_caching=False)
    base = LLM(model_dir, **common)
    lora_llms = {m: LLM(model_dir, **common, enable_lora=True, max_loras=m, max_cpu_loras=args.adapters,
                        max_lora_rank=args.rank) for m in (args.adapters, 1)}

    def merged_in_turn() -> tuple[float, int]:
        seconds = tokens = 0
        for a in range(args.adapters):
            s, t = timed(base, prompts[a::args.adapters], params)
            seconds, tokens = seconds + s, tokens + t
        return seconds, tokens

    variants = {
        BASELINE: merged_in_turn,
        f"multi-LoRA, max_loras={args.adapters}": lambda: timed(lora_llms[args.adapters], prompts, params, per_request),
        "multi-LoRA, max_loras=1": lambda: timed(lora_llms[1], prompts, params, per_request),
        "one adapter for all": lambda: timed(lora_llms[1], prompts, params, [loras[0]] * args.requests),
        BOUND: lambda: timed(base, prompts, params),
    }
    timed(lora_llms[args.adapters], prompts[:4], SamplingParams(max_tokens=4), per_request[:4])  # warm-up
    timed(base, prompts[:4], SamplingParams(max_tokens=4))
    rounds: list[dict[str, float]] = []
    bar = tqdm(total=args.rounds * len(variants), desc="lora", unit="run", dynamic_ncols=True)
    for _ in range(args.rounds):
        tok_s = {}
        for name, run in variants.items():
            seconds, tokens = run()
            tok_s[name] = tokens / seconds
            bar.update(1)
        rounds.append(tok_s)
    bar.close()
    ratios = {name: statistics.median(r[name] / r[BASELINE] for r in rounds) for name in variants}
    middle = sorted(rounds, key=lambda r: r[f"multi-LoRA, max_loras={args.adapters}"] / r[BASELINE])[len(rounds) // 2]
    report: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rounds": rounds, "median_ratio_to_baseline": ratios,
        "adapter_mib": sum(w.a.nbytes + w.b.nbytes for layer in lora_llms[1].engine.loras.get(1).layers
                           for w in layer.values()) / 2 ** 20,
    }
    lines = [f"{args.model}, {args.adapters} adapters of rank {args.rank} (every projection, "
             f"{report['adapter_mib']:.1f} MiB each), {args.requests} requests x ({args.prompt_len} + "
             f"{args.output_len}) tokens, {args.threads} threads, {args.rounds} rounds",
             "", "| variant | tokens/s (median round) | vs merged, one at a time | vs base, one batch |",
             "|---|---|---|---|"]
    for name in variants:
        lines.append(f"| {name} | {middle[name]:.0f} | {ratios[name]:.2f}x | "
                     f"{statistics.median(r[name] / r[BOUND] for r in rounds):.2f}x |")
    batches = [int(b) for b in args.step_batches.split(",") if b]
    steps = {b: step_times(lora_llms[1], prompts, loras[0], b, args.rounds) for b in
             tqdm(batches, desc="decode steps", unit="batch", dynamic_ncols=True)}
    report["decode_step_s"] = {str(b): t for b, t in steps.items()}
    (args.out / "lora.json").write_text(json.dumps(report, indent=2))
    if steps:
        lines += ["", "decode step (median ms; ratio to the base model's fused step at the same batch)", "",
                  "| batch | " + " | ".join(STEP_VARIANTS) + " |", "|---" * (len(STEP_VARIANTS) + 1) + "|"]
        for b, t in steps.items():
            cells = [f"{t[n] * 1e3:.1f} ({t[n] / t[STEP_VARIANTS[0]]:.2f}x)" for n in STEP_VARIANTS]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (args.out / "lora.md").write_text(table + "\n")
    print(table)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(13 if steps else 8, 3.6), squeeze=False,
                                 gridspec_kw={"width_ratios": [3, 2]} if steps else None)
        ax = axes[0][0]
        names = list(variants)
        ax.barh(names[::-1], [middle[n] for n in names[::-1]],
                color=["#888888" if n in (BASELINE, BOUND) else "#4477aa" for n in names[::-1]])
        for i, n in enumerate(names[::-1]):
            ax.text(middle[n], i, f" {middle[n]:.0f} ({ratios[n]:.2f}x)", va="center", fontsize=8)
        ax.set_xlabel("generated tokens / s (median round)")
        ax.set_title(f"LoRA serving, {args.model}, {args.adapters} adapters of rank {args.rank}", fontsize=10)
        ax.set_xlim(0, max(middle.values()) * 1.3)
        if steps:
            ax = axes[0][1]
            width = 0.8 / len(STEP_VARIANTS)
            for i, name in enumerate(STEP_VARIANTS):
                xs = [j + i * width for j in range(len(steps))]
                ys = [t[name] / t[STEP_VARIANTS[0]] for t in steps.values()]
                ax.bar(xs, ys, width, label=name)
                for x, y in zip(xs, ys, strict=True):
                    ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks([j + width for j in range(len(steps))], [f"batch {b}" for b in steps])
            ax.set_ylim(0, 1.3 * max(t[n] / t[STEP_VARIANTS[0]] for t in steps.values() for n in STEP_VARIANTS))
            ax.set_ylabel("decode step time / base model's")
            ax.set_title("decode step with an adapter on every row", fontsize=10)
            ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(args.out / "lora.png", dpi=120)
        print(f"wrote {args.out / 'lora.png'}")


if __name__ == "__main__":
    main()

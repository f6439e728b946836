"""`lengthwise bench structured`: what structured outputs cost, on a vocabulary of real size.

    lengthwise bench structured                                  # a 128,256-token BPE trained here
    lengthwise bench structured --tokenizer path/to/a/checkpoint  # its tokenizer.json

A mask is walked the first time a grammar state is met (in Python, over the tokens whose bytes
the state may start with) and cached after that, so the cost is a cold start that fades as a
workload's states repeat. Two measurements, one per workload (`choice`: one of 16 labels;
`object`: a schema of nested object, array, bounded strings, numbers and a boolean; `any`:
OpenAI's json_object, any JSON object; `regex`: vLLM's guided_regex, a dated log line):

1. **Masks alone.** `--answers` made-up answers to each workload, tokenized and replayed token by
   token through one engine's `StructuredOutputs` (one cache for the run, as a server has): the
   milliseconds per token spent on masks for the first answer (cold: every state new), the median
   of the last half (warm), and the cache's hit rate over the run. The vocabulary's own set-up
   (each token's bytes, once per engine) is reported apart.
2. **In the engine.** A random Llama (hidden 64, 2 layers: a cheap forward, so the masks' share
   shows) with the tokenizer's vocabulary decodes `--requests` prompts at temperature 1,
   unconstrained and under each constraint, in alternated rounds; output tokens per second and
   the ratio to unconstrained in the same round (median over rounds). Random weights write no
   sensible JSON, so these answers wander through states a real model would not: an upper bound
   on the number of distinct masks.

With no `--tokenizer`, a byte-level BPE of `--vocab-size` tokens (Llama 3's 128,256 by default) is
trained on the Python sources of the installed transformers and torch packages (code and English
docstrings; about 20 s, cached in the output folder), so that no download is needed: its tokens
are as many and as long as a real tokenizer's, not the same ones. Writes `structured.md`,
`structured.json` and `structured.png`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lengthwise.argtypes import positive_int
from lengthwise.model.random_model import WORDS

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, as the random checkpoints' config says
LABELS = ["positive", "negative", "neutral", "mixed", "question", "complaint", "praise", "request",
          "spam", "greeting", "farewell", "apology", "suggestion", "bug report", "feature request", "other"]
OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "minLength": 5, "maxLength": 5}},
                    "required": ["city", "zip"]},
        "score": {"type": "number"},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "score", "verified"],
}
LOG_REGEX = r"20\d\d-[01]\d-[0-3]\d (INFO|WARN|ERROR) [a-z_]+: [A-Za-z ,.]{1,60}"


def _words(r: random.Random, lo: int, hi: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))


def _object_answer(r: random.Random) -> str:
    return json.dumps({
        "name": _words(r, 1, 3).title(), "age": r.randint(1, 99),
        "tags": [r.choice(WORDS)[:12] for _ in range(r.randint(0, 4))],
        "address": {"city": _words(r, 1, 2).title(), "zip": f"{r.randint(0, 99999):05d}"},
        "score": round(r.uniform(-10, 100), r.randint(0, 3)), "verified": r.random() < 0.5,
    })


def _any_value(r: random.Random, depth: int) -> Any:
    kind = r.choice(["string", "number", "bool", "null", "list", "object"] if depth < 3 else ["string", "number"])
    if kind == "string":
        return _words(r, 1, 6)
    if kind == "number":
        return r.randint(-1000, 1000) if r.random() < 0.5 else round(r.uniform(-100, 100), 2)
    if kind == "bool":
        return r.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_any_value(r, depth + 1) for _ in range(r.randint(0, 3))]
    return {r.choice(WORDS): _any_value(r, depth + 1) for _ in range(r.randint(1, 3))}


def _log_answer(r: random.Random) -> str:
    return (f"20{r.randint(0, 99):02d}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} "
            f"{r.choice(['INFO', 'WARN', 'ERROR'])} {r.choice(WORDS).lower().replace('-', '_')}: "
            f"{_words(r, 2, 8).capitalize()}.")


def workloads() -> dict[str, tuple[Any, Callable[[random.Random], str]]]:
    """Each workload's constraint (StructuredOutputsParams) and a maker of answers that meet it."""
    from lengthwise.structured.params import StructuredOutputsParams

    return {
        "choice": (StructuredOutputsParams(choice=LABELS), lambda r: r.choice(LABELS)),
        "object": (StructuredOutputsParams(json=OBJECT_SCHEMA), _object_answer),
        "any": (StructuredOutputsParams(json_object=True),
                lambda r: json.dumps({r.choice(WORDS): _any_value(r, 1) for _ in range(r.randint(1, 4))})),
        "regex": (StructuredOutputsParams(regex=LOG_REGEX), _log_answer),
    }


def train_tokenizer(out: Path, vocab_size: int, files: list[Path] | None = None) -> Path:
    """A byte-level BPE of `vocab_size` tokens trained on `files` (by default the installed
    transformers and torch sources), kept in `out` and trained again only if it is missing."""
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if files is None:
        site = Path(sysconfig.get_paths()["purelib"])
        files = sorted(p for pkg in ("transformers", "torch") for p in (site / pkg).rglob("*.py"))
    if not files:
        raise SystemExit(f"no transformers or torch sources under {site} to train a tokenizer on: "
                         f"give --tokenizer DIR")

    def texts() -> Any:
        for f in tqdm(files, desc=f"training a {vocab_size}-token BPE", unit="file", file=sys.stderr):
            yield f.read_text(errors="ignore")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>"}))
    return out


def replay_masks(tokenizer: Any, answers: int, seed: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Measurement 1: each workload's answers replayed through one StructuredOutputs."""
    from lengthwise.structured.guide import StructuredOutputs

    so = StructuredOutputs(tokenizer, tokenizer.vocab_size)
    start = time.perf_counter()
    vocab = so.vocab
    rows: dict[str, Any] = {"vocabulary_setup_s": round(time.perf_counter() - start, 3),
                            "vocab_size": vocab.vocab_size}
    curves: dict[str, list[float]] = {}
    for name, (spec, make) in workloads().items():
        r = random.Random(seed)
        so.compile(spec)  # (compiling the grammar is not the masks' cost)
        before = (so.stats.built, so.stats.hits)
        per_token, tokens = [], 0
        for _ in tqdm(range(answers), desc=f"masks: {name}", unit="answer", file=sys.stderr):
            text = make(r)
            ids = _tokens(tokenizer, vocab, text)
            guide = so.guide(spec)
            t0 = time.perf_counter()
            for t in ids:
                if not guide.mask()[t]:
                    raise RuntimeError(f"{name}: the mask refused token {t} ({tokenizer.decode([t])!r}) of "
                                       f"the answer {text!r}")
                guide.advance(t)
            if not guide.complete:
                raise RuntimeError(f"{name}: the answer {text!r} did not complete its grammar")
            per_token.append((time.perf_counter() - t0) * 1e3 / len(ids))
            tokens += len(ids)
        built, hits = so.stats.built - before[0], so.stats.hits - before[1]
        rows[name] = {"tokens": tokens, "cold_ms_per_token": round(per_token[0], 4),
                      "warm_ms_per_token": round(statistics.median(per_token[len(per_token) // 2:]), 4),
                      "mean_ms_per_token": round(statistics.fmean(per_token), 4),
                      "masks_built": built, "hit_rate": round(hits / max(1, hits + built), 4)}
        curves[name] = per_token
    return rows, curves


def _tokens(tokenizer: Any, vocab: Any, text: str) -> list[int]:
    """`text` as tokens a model could write: the tokenizer's own encoding where its tokens' bytes
    spell `text` exactly, else (a tokenizer that adds a leading space) the longest tokens first."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if b"".join(vocab.bytes[t] or b"\0" for t in ids) == text.encode():
        return ids
    by_bytes = {raw: t for t, raw in enumerate(vocab.bytes) if raw}
    longest = max(map(len, by_bytes))
    data, i, out = text.encode(), 0, []
    while i < len(data):
        n = next(n for n in range(min(longest, len(data) - i), 0, -1) if data[i:i + n] in by_bytes)
        out.append(by_bytes[data[i:i + n]])
        i += n
    return out


def write_model(out: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with the tokenizer's vocabulary (kept in `out`)."""
    from tokenizers import Tokenizer

    from lengthwise.bench.presets import LlamaPreset, write_preset

    if (out / "model.safetensors").is_file():
        return out
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    preset = LlamaPreset(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=None, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    write_preset(out, preset, tokenizer=tok)
    return out


def engine_runs(model: Path, requests: int, max_tokens: int, rounds: int, seed: int) -> dict[str, Any]:
    """Measurement 2: output tokens/s unconstrained and under each constraint, alternated rounds;
    round 0 meets every state first (cold), the ratio is the median of the others (warm)."""
    from lengthwise import LLM, SamplingParams

    llm = LLM(model=str(model), device="cpu", dtype="float32")
    prompts = [f"Answer {i}: {_words(random.Random(seed + i), 3, 12)}" for i in range(requests)]
    # (choice answers are a few tokens: their time is the prompts', so they are left out here)
    kinds: dict[str, Any] = {"unconstrained": None,
                             **{k: spec for k, (spec, _) in workloads().items() if k != "choice"}}
    so = llm.engine.structured
    assert so is not None and so.vocab.vocab_size  # built now: its one-off set-up is measured with the masks
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    masks: dict[str, list[int]] = {k: [] for k in kinds}
    for rnd in range(rounds + 1):
        for kind, spec in tqdm(kinds.items(), desc=f"engine round {rnd}/{rounds}" + (" (cold)" if not rnd else ""),
                               file=sys.stderr):
            params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed + i,
                                     structured_outputs=spec) for i in range(requests)]
            built = so.stats.built
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            rates[kind].append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
            masks[kind].append(so.stats.built - built)
    base = rates["unconstrained"]
    return {kind: {"output_tokens_per_s": round(statistics.median(r[1:]), 1),
                   "vs_unconstrained": round(statistics.median(x / b for x, b in zip(r[1:], base[1:], strict=True)), 4),
                   "cold_output_tokens_per_s": round(r[0], 1), "cold_vs_unconstrained": round(r[0] / base[0], 4),
                   "masks_built_per_round": masks[kind]} for kind, r in rates.items()}


def format_table(report: dict[str, Any]) -> str:
    m, e = report["masks"], report["engine"]
    lines = [f"vocabulary: {m['vocab_size']} tokens ({report['config']['tokenizer']}); "
             f"its one-off set-up {m['vocabulary_setup_s']:.2f} s", "",
             "| workload | tokens | cold ms/token | warm ms/token | masks built | hit rate | engine tok/s cold | "
             "warm | warm vs unconstrained |", "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys([*e, *(k for k in m if isinstance(m[k], dict))]):
        mr, row = m.get(name), e.get(name)
        cells = ([f"{mr['tokens']}", f"{mr['cold_ms_per_token']:.3f}", f"{mr['warm_ms_per_token']:.4f}",
                  f"{mr['masks_built']}", f"{mr['hit_rate']:.1%}"] if isinstance(mr, dict) else ["-"] * 5)
        cells += ([f"{row['cold_output_tokens_per_s']:.0f}", f"{row['output_tokens_per_s']:.0f}",
                   f"{row['vs_unconstrained']:.2f}x"] if row else ["-"] * 3)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[float]], path: Path) -> Path | None:
    from lengthwise.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, marker=".", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("answer (in order; one mask cache for the run)")
    ax.set_ylabel("mask ms per token")
    ax.set_title("structured outputs: mask cost per token as the cache warms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_subcommand(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("structured", help="what structured outputs cost: masks and engine throughput",
                             description="Mask cost per token (cold and warm) and engine throughput under "
                                         "structured outputs, against unconstrained decoding in the same run.")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a directory with tokenizer.json (default: a BPE trained here on local sources)")
    p.add_argument("--vocab-size", type=positive_int, default=128256, help="the trained BPE's size")
    p.add_argument("--answers", type=positive_int, default=100, help="answers replayed per workload")
    p.add_argument("--requests", type=positive_int, default=16, help="requests per engine run")
    p.add_argument("--max-tokens", type=positive_int, default=96)
    p.add_argument("--rounds", type=positive_int, default=3, help="warm engine rounds (after a cold one)")
    p.add_argument("--no-engine", action="store_true", help="measure the masks only")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("bench-structured"))
    p.set_defaults(func=cmd_structured)


def cmd_structured(args: argparse.Namespace) -> int:
    import torch

    from lengthwise.tokenizer import Tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tokenizer is not None and not (args.tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = args.tokenizer or train_tokenizer(args.out_dir / f"bpe-{args.vocab_size}", args.vocab_size)
    tokenizer = Tokenizer(tok_dir)
    masks, curves = replay_masks(tokenizer, args.answers, args.seed)
    engine: dict[str, Any] = {}
    if not args.no_engine:
        model = write_model(args.out_dir / f"model-{tok_dir.resolve().name}", tok_dir)
        engine = engine_runs(model, args.requests, args.max_tokens, args.rounds, args.seed)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config["tokenizer"] = str(tok_dir)
    report = {"masks": masks, "engine": engine, "config": config, "threads": torch.get_num_threads()}
    table = format_table(report)
    print(table)
    (args.out_dir / "structured.md").write_text(table + "\n")
    (args.out_dir / "structured.json").write_text(json.dumps(report, indent=2) + "\n")
    png = plot(curves, args.out_dir / "structured.png")
    print(f"written: {args.out_dir / 'structured.json'}" + (f", {png}" if png else ""), file=sys.stderr)
    return 0

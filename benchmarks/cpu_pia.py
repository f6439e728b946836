"""Perception in Advance for a served checkpoint: a LoRA length adapter against the other predictors.

    .venv/bin/python benchmarks/cpu_pia.py [--models builtin,stories260k] [--train 2000] [--eval 200]
        [--threads 2] [--out results/pia]

For each model, in one run: its own response lengths are recorded (`LLM(record_lengths=...)`, as
`lengthwise predictor record` does) on training and held-out prompts; then `constant` (the
training median), `probe` (a head on the model's hidden state) and `pia` (a LoRA adapter, r=8,
alpha=16, q/v, 3 epochs: `lengthwise predictor train --kind pia`) are trained on the training
records, and they and the untuned `self` predictor are evaluated on the held-out records: MAE,
MAE as a share of the mean length, Kendall tau, the share of unparsable answers, and prediction
seconds per request (batches of 64).

- **builtin**: the built-in instruction model on generated task instructions (chat requests,
  greedy answers, labels rounded to 10). It was trained to answer the length query by
  `train-tiny`, so `self` is already tuned here: PiA should match it, not beat it.
- **stories260k** (../shared/models/stories260k): a real tiny story model that was never taught to
  answer; prompts are beginnings of stories it wrote itself (cut after 10-90% of their tokens),
  lengths the longest of four continuations at temperature 0.7 (the paper's L_max), capped at
  `--stories-max-tokens`, answers rounded to 50.

Writes pia.json, .md and .png to `--out`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lengthwise import LLM, SamplingParams
from lengthwise.argtypes import positive_int
from lengthwise.bench.report import pyplot
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.lora.train import LoRATrainConfig
from lengthwise.model.default import default_model_dir
from lengthwise.predict import (
    ConstantPredictor,
    LengthDataset,
    PiAPredictor,
    SelfPredictor,
    TrainConfig,
    load_length_data,
    train_pia,
    train_probe,
)
from lengthwise.predict.evaluate import predict_dataset
from lengthwise.predict.metrics import length_metrics
from lengthwise.tiny import tasks

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
PREDICTORS = ("constant", "probe", "self", "pia")


def record(model_dir: Path, prompts: list[str], path: Path, chat: bool, params: SamplingParams) -> LengthDataset:
    """The model's own lengths on `prompts` (with hidden-state features), as a length dataset."""
    path.unlink(missing_ok=True)
    llm = LLM(model_dir, dtype="float32", record_lengths=str(path))
    if chat:
        llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        llm.generate(prompts, params)
    return load_length_data(path, "length", need_features=True)


def builtin_prompts(n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    return ([e.instruction for e in tasks.generate(n_train, seed=4242)],
            [e.instruction for e in tasks.generate(n_eval, seed=778)])


def story_prefixes(model_dir: Path, n: int, max_tokens: int, seed: int = 0) -> list[str]:
    """`n` distinct beginnings of stories the model wrote itself: whole stories (sampled at 0.7,
    ended by EOS within `max_tokens`) cut after a random 10-90% of their tokens. How much of the
    story is left is what a length predictor can perceive here."""
    llm = LLM(model_dir, dtype="float32")
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    i = 0
    while len(seen) < n:
        batch = [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed * 1_000_000 + i + k)
                 for k in range(n)]
        i += len(batch)
        for o in llm.generate(["Once upon a time"] * len(batch), batch, use_tqdm=False):
            c = o.outputs[0]
            if c.finish_reason != "stop" or len(c.token_ids) < 40:
                continue
            cut = int(len(c.token_ids) * rng.uniform(0.1, 0.9))
            seen.setdefault("Once upon a time" + llm.tokenizer.decode(list(c.token_ids[:cut])))
    return list(seen)[:n]


def evaluate(name: str, predictor: Any, data: LengthDataset) -> dict[str, Any]:
    start = time.perf_counter()
    preds = predict_dataset(predictor, data, progress=False)
    seconds = time.perf_counter() - start
    m = length_metrics([p.length for p in preds], data.lengths)
    mean = statistics.mean(data.lengths)
    return {"predictor": name, "mae": m["mae"], "mae_share": m["mae"] / mean, "kendall_tau": m["kendall_tau"],
            "fallback": getattr(predictor, "fallback_rate", 0.0), "ms_per_request": 1000 * seconds / len(data),
            "mean_length": mean}


def run_model(name: str, model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if name == "builtin":
        train_p, eval_p = builtin_prompts(args.train, args.eval)
        params, chat, rounding = SamplingParams(max_tokens=512, temperature=0.0), True, 10.0
    else:
        prefixes = story_prefixes(model_dir, args.train + args.eval, args.stories_max_tokens)
        train_p, eval_p = prefixes[:args.train], prefixes[args.train:]
        params = SamplingParams(max_tokens=args.stories_max_tokens, temperature=0.7, n=4, seed=0)
        chat, rounding = False, 50.0
    t0 = time.perf_counter()
    train = record(model_dir, train_p, work / f"{name}-train.jsonl", chat, params)
    held = record(model_dir, eval_p, work / f"{name}-eval.jsonl", chat, params)
    record_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pia_dir = train_pia(model_dir, train, work / f"{name}-pia", LoRATrainConfig(), rounding=rounding)
    pia_s = time.perf_counter() - t0
    engine = LLMEngine.from_dir(model_dir)
    predictors = {"constant": ConstantPredictor.fit(train), "probe": train_probe(train, TrainConfig(epochs=30)),
                  "self": SelfPredictor(engine, rounding=rounding), "pia": PiAPredictor(engine, pia_dir)}
    rows = [evaluate(k, predictors[k], held) for k in PREDICTORS]
    manifest = json.loads((pia_dir / "manifest.json").read_text())
    return {"model": name, "train_records": len(train), "eval_records": len(held), "record_seconds": record_s,
            "pia_train_seconds": pia_s, "pia_epoch_losses": manifest["metrics"]["epoch_losses"], "rounding": rounding,
            "rows": rows}


def format_report(results: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = [f"PiA on the served model ({config['threads']} threads; {config['date']})", ""]
    for r in results:
        lines += [f"### {r['model']}: {r['train_records']} training / {r['eval_records']} held-out records, "
                  f"mean length {r['rows'][0]['mean_length']:.1f}; PiA trained in {r['pia_train_seconds']:.0f} s "
                  f"(answer loss per epoch {r['pia_epoch_losses']})", "",
                  "| predictor | MAE | MAE / mean | Kendall tau | unparsable answers | ms per request |",
                  "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['predictor']} | {row['mae']:.1f} | {100 * row['mae_share']:.1f}% | "
                         f"{row['kendall_tau']:.3f} | {100 * row['fallback']:.0f}% | {row['ms_per_request']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        names = [row["predictor"] for row in r["rows"]]
        shares = [100 * row["mae_share"] for row in r["rows"]]
        bars = ax.bar(names, shares, color=["#999999", "#6a9fd4", "#d4a26a", "#4caf50"])
        for b, row in zip(bars, r["rows"], strict=True):
            ax.annotate(f"tau {row['kendall_tau']:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{r['model']} (held-out {r['eval_records']})")
        ax.set_ylabel("MAE, % of the mean length")
    fig.suptitle("Length perception: PiA adapter vs untuned self, probe, constant")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="builtin,stories260k")
    ap.add_argument("--train", type=positive_int, default=2000, help="training prompts per model")
    ap.add_argument("--eval", type=positive_int, default=200, help="held-out prompts per model")
    ap.add_argument("--stories-max-tokens", type=positive_int, default=300)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/pia"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = {"builtin": default_model_dir(), "stories260k": STORIES}
    results = []
    for name in args.models.split(","):
        if name not in dirs:
            raise SystemExit(f"--models: unknown model {name!r} (builtin, stories260k)")
        if not dirs[name].is_dir():
            raise SystemExit(f"{dirs[name]} is absent")
        results.append(run_model(name, dirs[name], args, args.out))
    config = {"threads": args.threads, "date": time.strftime("%Y-%m-%d"), "train": args.train, "eval": args.eval}
    (args.out / "pia.json").write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    text = format_report(results, config)
    (args.out / "pia.md").write_text(text + "\n")
    plot(results, args.out / "pia.png")
    print(text)


if __name__ == "__main__":
    main()

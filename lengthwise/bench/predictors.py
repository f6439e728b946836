"""`lengthwise bench predictors`: every length predictor side by side on one dataset.

Prints the comparison table, writes `predictors.json` (one record per predictor, the `predictor
eval` keys plus `name`, `kind`, `readout` and, with `--tau-target`, `kendall_tau_<target>`), a
markdown table and `predictors.png` (the metrics as bars, and predicted against true length for
each predictor). `--readouts` also evaluates every readout of the head-based predictors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lengthwise.argtypes import positive_int
from lengthwise.bench.report import pyplot

COLUMNS = [("mae", "MAE", "{:.1f}"), ("acc50", "Acc-50", "{:.1%}"), ("acc100", "Acc-100", "{:.1%}"),
           ("kendall_tau", "tau", "{:.3f}"), ("bin_acc_2", "bins-2", "{:.1%}"), ("bin_acc_4", "bins-4", "{:.1%}"),
           ("bin_acc_8", "bins-8", "{:.1%}"), ("latency_ms_b1", "ms b1", "{:.2f}"),
           ("latency_ms_b64", "ms b64", "{:.2f}")]


def add_subcommand(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("predictors", help="length predictors side by side on one dataset",
                             description="Evaluate several length predictors on one JSONL file; table, JSON, PNG.")
    p.add_argument("--predictor", action="append", required=True, metavar="NAME=SPEC",
                   help="a predictor directory, 'oracle' or 'self' (repeat); NAME= is optional")
    p.add_argument("--model", default=None, help="the model that 'self' asks")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--target", default="L_max")
    p.add_argument("--tau-target", default=None, help="also report Kendall tau against this field (e.g. t0.0)")
    p.add_argument("--readouts", action="store_true", help="also evaluate each readout of proxy/probe heads")
    p.add_argument("--out-dir", type=Path, default=Path("bench-predictors"))
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--no-latency", action="store_true")
    p.set_defaults(func=cmd_predictors)


def _named(spec: str) -> tuple[str, str]:
    name, _, path = spec.partition("=")
    return (name, path) if path else (Path(spec).name or spec, spec)


def cmd_predictors(args: argparse.Namespace) -> int:
    import torch

    from lengthwise.predict import is_self_spec, load_length_data, make_predictor
    from lengthwise.predict.evaluate import evaluate
    from lengthwise.predict.head_predictor import HeadPredictor
    from lengthwise.predict.heads import READOUTS
    from lengthwise.predict.metrics import kendall_tau

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    records: list[dict[str, Any]] = []
    scatter: dict[str, tuple[list[float], list[float]]] = {}
    for spec in args.predictor:
        name, path = _named(spec)
        engine = None
        if is_self_spec(path):
            if args.model is None:
                raise ValueError(f"--predictor {path} asks the served model: pass --model MODEL_DIR")
            from lengthwise.engine.llm_engine import LLMEngine

            engine = LLMEngine.from_dir(args.model)
        predictor = make_predictor(path, engine)
        data = load_length_data(args.data, args.target, need_features=predictor.needs_features)
        tau_truth = (load_length_data(args.data, args.tau_target, need_features=predictor.needs_features).lengths
                     if args.tau_target else None)
        variants = [None]
        if args.readouts and isinstance(predictor, HeadPredictor):
            variants = [predictor.readout, *[r for r in READOUTS if r != predictor.readout]]
        for readout in variants:
            if readout is not None:
                predictor.readout = readout
            label = name if readout is None or readout == variants[0] else f"{name} [{readout}]"
            ev = evaluate(predictor, data, measure_latency=not args.no_latency and label == name)
            pred = [p.length for p in ev.predictions]
            rec = {"name": label, "kind": predictor.kind, "readout": readout, "data": str(args.data),
                   "target": args.target, **ev.metrics}
            if tau_truth is not None:
                rec[f"kendall_tau_{args.tau_target}"] = kendall_tau(pred, tau_truth)
            records.append(rec)
            if label == name:  # one scatter per predictor, not per readout variant
                scatter[label] = (data.lengths, pred)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "predictors.json").write_text(json.dumps({"results": records}, indent=2) + "\n")
    table = format_table(records, args.tau_target)
    (args.out_dir / "predictors.md").write_text(table + "\n")
    print(table)
    png = plot(records, scatter, args.out_dir / "predictors.png")
    print(f"wrote {args.out_dir / 'predictors.json'}, {args.out_dir / 'predictors.md'}" + (f", {png}" if png else ""),
          file=sys.stderr)
    return 0


def format_table(records: list[dict[str, Any]], tau_target: str | None) -> str:
    cols = list(COLUMNS)
    if tau_target:
        cols.insert(4, (f"kendall_tau_{tau_target}", f"tau {tau_target}", "{:.3f}"))
    head = ["predictor", *[c[1] for c in cols]]
    rows = [[r["name"], *[fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols]] for r in records]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], scatter: dict[str, tuple[list[float], list[float]]], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    names = [r["name"] for r in records]
    cols = max(2, len(scatter))
    fig, axes = plt.subplots(2, cols, figsize=(4.5 * cols, 8.5), squeeze=False)
    bars = axes[0]
    bars[0].barh(names, [r["mae"] for r in records], color="tab:blue")
    bars[0].set_xlabel("MAE (tokens)")
    bars[0].invert_yaxis()
    y = np.arange(len(names))
    for i, (key, label) in enumerate([("acc50", "Acc-50"), ("acc100", "Acc-100"), ("kendall_tau", "tau")]):
        bars[1].barh(y + (i - 1) * 0.27, [r[key] for r in records], height=0.27, label=label)
    bars[1].set_yticks(y, names)
    bars[1].invert_yaxis()
    bars[1].legend(loc="lower right")
    bars[1].set_xlim(0, 1)
    for ax in bars[2:]:
        ax.axis("off")
    for ax in axes[1][len(scatter):]:
        ax.axis("off")
    for ax, (name, (true, pred)) in zip(axes[1], scatter.items(), strict=False):
        ax.scatter(true, pred, s=2, alpha=0.3)
        top = max(max(true), max(pred))
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("true length")
        ax.set_ylabel("predicted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""`lengthwise demo` (what `make demo` runs): the product on the built-in tiny model, in minutes.

1. **Length perception.** The model answers held-out instructions greedily to its own end of
   sequence; those answers' lengths are the truth. The `self` predictor (the model asked for its
   own length: the first paper's Perception in Advance, which `train-tiny`'s stage 2 taught it)
   and the `probe` (a head on its last hidden state, shipped in the checkpoint's `probe/`) are
   scored against them: MAE, MAE as a share of the mean length, Kendall's tau.
2. **Scheduling.** The same instructions, all arriving at once (the paper's setting), served
   greedily to their real end of sequence under `static`, `sequence` (VBS+FCR), `multibin`,
   `continuous` and `continuous-sjf`, each on a fresh engine over the same weights, with the
   `self` predictor inside the engine (its queries are part of the measured time). A table, a
   JSON file and a PNG plot.

The instructions come from `tasks.generate` with a seed apart from training's, so the model has
not seen them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lengthwise.argtypes import positive_int
from lengthwise.tiny import tasks

WORKLOAD_SEED = 4242  # training uses seeds 0 (stage 1), 1000 and 1001 (stage 2's rounds) and 2000 (probe)
DEMO_POLICIES = ["static:batch_size=16", "sequence", "multibin:bins=4,batch_size=16", "continuous",
                 "continuous-sjf"]


def held_out_instructions(n: int, seed: int = WORKLOAD_SEED) -> list[tasks.Example]:
    """`n` generated instructions the built-in model was not trained on."""
    return tasks.generate(n, seed=seed)


def perception(model_dir: Path, instructions: list[str], kinds: tuple[str, ...] = ("self", "probe"),
               max_tokens: int = 512) -> dict[str, dict[str, Any]]:
    """Per predictor kind: its predictions for `instructions` (chat-rendered, as served), the model's
    actual greedy answer lengths, and the metrics (`mae`, `mae_share` of the mean length,
    `kendall_tau`, ...). The probe is the checkpoint's `probe/` directory."""
    from lengthwise.engine import LLM
    from lengthwise.predict.metrics import length_metrics
    from lengthwise.sampling_params import SamplingParams

    report: dict[str, dict[str, Any]] = {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for kind in kinds:
        spec = str(model_dir / "probe") if kind == "probe" else kind
        if kind == "probe" and not (model_dir / "probe").is_dir():
            raise ValueError(f"{model_dir} has no probe/ directory: train-tiny writes one beside the weights")
        llm = LLM(model_dir, dtype="float32", device="cpu", length_predictor=spec)
        outs = llm.chat([[{"role": "user", "content": i}] for i in instructions], params, use_tqdm=True)
        actual = [len(o.outputs[0].token_ids) for o in outs]
        predicted = [float(o.predicted_length) for o in outs]
        m = length_metrics(predicted, actual)
        m["mean_length"] = float(np.mean(actual))
        m["mae_share"] = m["mae"] / m["mean_length"]
        report[kind] = {"metrics": m, "predicted": predicted, "actual": actual,
                        "answers": [o.outputs[0].text for o in outs]}
    return report


def format_perception(report: dict[str, dict[str, Any]]) -> str:
    head = ["predictor", "MAE (tokens)", "MAE / mean length", "Kendall tau", "mean length"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, r in report.items():
        m = r["metrics"]
        lines.append(f"| {kind} | {m['mae']:.1f} | {m['mae_share']:.1%} | {m['kendall_tau']:.3f} | "
                     f"{m['mean_length']:.1f} |")
    return "\n".join(lines)


def run_demo(model_dir: Path, num_requests: int, out_dir: Path, policies: list[str],
             predictor: str = "self") -> dict[str, Any]:
    """Both parts of the demo (module docstring); writes demo.json, schedule.md and schedule.png."""
    from lengthwise.bench.schedule import format_row, format_table, parse_policy, plot, run_policy
    from lengthwise.config import EngineConfig
    from lengthwise.model import load_model
    from lengthwise.predict import is_self_spec, make_predictor
    from lengthwise.sched import make_policy
    from lengthwise.tokenizer import Tokenizer

    specs = [parse_policy(text) for text in policies]
    for spec in specs:  # a typo fails now, not after the minutes of the perception part
        make_policy(spec.name, spec.options)
        if not is_self_spec(spec.predictor or predictor):
            make_predictor(spec.predictor or predictor)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = held_out_instructions(num_requests)
    instructions = [e.instruction for e in examples]
    t0 = time.monotonic()
    print(f"[demo] 1/2 length perception: {len(instructions)} held-out instructions answered greedily by "
          f"{model_dir}, against the self and probe predictors' estimates", file=sys.stderr)
    report = perception(model_dir, instructions)
    answers = report["self"]["answers"]
    correct = sum(tasks.check(e, a) for e, a in zip(examples, answers, strict=True)) / len(examples)
    print(format_perception(report))
    print(f"\nthe model's answers are correct for {correct:.1%} of these instructions "
          f"({time.monotonic() - t0:.0f} s)\n")
    print(f"[demo] 2/2 scheduling: the same {len(instructions)} requests at once, greedy to their own end "
          f"of sequence, under {len(policies)} policies with the {predictor!r} predictor", file=sys.stderr)
    model = load_model(model_dir, "float32", "cpu")
    tokenizer = Tokenizer(model_dir)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": i}]) for i in instructions]
    results = []
    for spec in specs:
        config = EngineConfig(dtype="float32", device="cpu", policy=spec.name, policy_options=spec.options,
                              length_predictor=spec.predictor or predictor)
        rec = run_policy(model, tokenizer, config, prompts, None, [0.0] * len(prompts), spec)
        rec["predictor"] = spec.predictor or predictor
        results.append(rec)
        print(format_row(rec), file=sys.stderr)
    table = format_table(results)
    print(table)
    (out_dir / "schedule.md").write_text(table + "\n")
    png = plot(results, out_dir / "schedule.png")
    summary = {"model": str(model_dir), "num_requests": len(instructions), "answers_correct": correct,
               "perception": {k: r["metrics"] for k, r in report.items()}, "policies": results,
               "seconds": time.monotonic() - t0}
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nplot: {png if png else '(matplotlib missing: no plot)'}; table and JSON in {out_dir}/ "
          f"({summary['seconds']:.0f} s in all)")
    return summary


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="the showcase: length perception and scheduling on the built-in model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--num-requests", type=positive_int, default=512)
    p.add_argument("--policy", action="append", default=None,
                   help=f"a policy run (repeat); default: {' '.join(DEMO_POLICIES)}")
    p.add_argument("--predictor", default="self", help="the predictor the policies schedule on (default: self)")
    p.add_argument("--out-dir", type=Path, default=Path("demo-out"))
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import torch

    from lengthwise.model.default import default_model_dir

    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_demo(args.model or default_model_dir(), args.num_requests, args.out_dir, args.policy or DEMO_POLICIES,
             args.predictor)
    return 0

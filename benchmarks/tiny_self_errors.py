"""Where a tiny-model checkpoint's `self` error comes from, on one set of held-out instructions:

    .venv/bin/python benchmarks/tiny_self_errors.py [--model DIR ...] [--seed 4242] [--num 512] [--worst 8]

For each `--model` (repeatable; default the built-in model): the `self` predictor's total absolute
error in tokens against the lengths the model then answers in, that error summed per task family,
and the `--worst` instructions with their prediction, actual length and whether the answer was
right. The default set is `make demo`'s (seed 4242, 512 instructions); the acceptance test's is
`--seed 778 --num 200`. A few runaway answers (to the 512-token cap) carry much of the error on any
set, so compare checkpoints on the same set, and on more than one.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from lengthwise.model.default import default_model_dir
from lengthwise.tiny import tasks
from lengthwise.tiny.demo import WORKLOAD_SEED, perception


def self_errors(model: Path, examples: list[tasks.Example]) -> list[tuple[tasks.Example, float, int, bool]]:
    """Per instruction: (example, `self` prediction, actual greedy length, answered right)."""
    rep = perception(model, [e.instruction for e in examples], kinds=("self",))["self"]
    return [(e, p, a, tasks.check(e, text))
            for e, p, a, text in zip(examples, rep["predicted"], rep["actual"], rep["answers"], strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", default=None, help="checkpoint directory (repeatable)")
    ap.add_argument("--seed", type=int, default=WORKLOAD_SEED)
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--worst", type=int, default=8)
    args = ap.parse_args()
    examples = tasks.generate(args.num, seed=args.seed)
    for model in args.model or [default_model_dir()]:
        rows = self_errors(model, examples)
        mean_len = sum(a for _, _, a, _ in rows) / len(rows)
        total = sum(abs(p - a) for _, p, a, _ in rows)
        print(f"{model}: self error {total:.0f} tokens on {len(rows)} instructions of seed {args.seed}: "
              f"MAE {total / len(rows):.2f} = {total / len(rows) / mean_len:.1%} of the mean {mean_len:.1f}")
        per_family: dict[str, float] = defaultdict(float)
        for e, p, a, _ in rows:
            per_family[e.family] += abs(p - a)
        print("  by family (tokens):", ", ".join(f"{f} {v:.0f}" for f, v in
                                                sorted(per_family.items(), key=lambda x: -x[1])[:8]))
        for e, p, a, right in sorted(rows, key=lambda r: -abs(r[1] - r[2]))[:args.worst]:
            print(f"  predicted {p:5.0f}, answered in {a:3d} ({'right' if right else 'wrong'})  {e.instruction!r}")


if __name__ == "__main__":
    main()

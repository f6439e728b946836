"""Greedy accuracy of a tiny-model checkpoint on many held-out instructions, finer than
`lengthwise train-tiny --evaluate` (which draws 20 per family):

    .venv/bin/python benchmarks/tiny_accuracy.py [--model DIR] [--num 2500] [--seed 779]

1. `--num` instructions of `--seed` drawn as training draws them (every family, at random): the
   share answered right (stopped by itself and accepted by the family's checker), and per family.
2. The range families (count up, count down, even numbers, numbers in words over a range) split
   by whether the range reaches 100: the model's failures are mostly there, where it does not stop
   at the end number and runs on; those answers carry most of the `self` predictor's error.
3. `--sort-num` sorting instructions of `--sort-seed` split by the list's size and whether a number
   repeats in it, the case the model gets wrong most (the tenth fixed instruction is one).

About 30 s on two cores. Seeds 779 and 780 are `tiny_acceptance.py --also`'s sets, never trained on.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from lengthwise import LLM, SamplingParams
from lengthwise.model.default import default_model_dir
from lengthwise.tiny import tasks

RANGE_FAMILIES = ["count_down", "count_up", "even_numbers", "numbers_in_words"]


def answered_right(llm: LLM, examples: list[tasks.Example]) -> list[bool]:
    """Greedy answers (cap 512) that stop by themselves and pass the family's checker."""
    outs = llm.chat([[{"role": "user", "content": e.instruction}] for e in examples],
                    SamplingParams(max_tokens=512, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].finish_reason == "stop" and tasks.check(e, o.outputs[0].text)
            for e, o in zip(examples, outs, strict=True)]


def share(xs: list[bool]) -> str:
    return f"{sum(xs) / len(xs):.0%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--num", type=int, default=2500, help="instructions of all families")
    p.add_argument("--seed", type=int, default=779)
    p.add_argument("--range-num", type=int, default=1200, help="instructions of the range families")
    p.add_argument("--range-seed", type=int, default=780)
    p.add_argument("--sort-num", type=int, default=800, help="sorting instructions")
    p.add_argument("--sort-seed", type=int, default=781)
    args = p.parse_args()
    llm = LLM(args.model or default_model_dir(), dtype="float32", device="cpu")

    examples = tasks.generate(args.num, seed=args.seed)
    right = answered_right(llm, examples)
    by_family: dict[str, list[bool]] = defaultdict(list)
    for e, ok in zip(examples, right, strict=True):
        by_family[e.family].append(ok)
    print(f"all families, {args.num} of seed {args.seed}: {sum(right) / len(right):.1%} right")
    print("  " + " ".join(f"{f}={share(v)}" for f, v in sorted(by_family.items())))

    examples = tasks.generate(args.range_num, seed=args.range_seed, families=RANGE_FAMILIES)
    right = answered_right(llm, examples)
    split: dict[tuple[str, bool], list[bool]] = defaultdict(list)
    for e, ok in zip(examples, right, strict=True):
        split[(e.family, max(int(x) for x in re.findall(r"\d+", e.instruction)) >= 100)].append(ok)
    print(f"range families, {args.range_num} of seed {args.range_seed} (right, below 100 / reaching 100):")
    for family in RANGE_FAMILIES:
        low, high = split[(family, False)], split[(family, True)]
        print(f"  {family:>16}: {share(low)} of {len(low)} / {share(high)} of {len(high)}")

    examples = tasks.generate(args.sort_num, seed=args.sort_seed, families=["sort_numbers"])
    right = answered_right(llm, examples)
    sorts: dict[tuple[int, bool], list[bool]] = defaultdict(list)
    for e, ok in zip(examples, right, strict=True):
        xs = re.findall(r"\d+", e.instruction)
        sorts[(len(xs), len(set(xs)) < len(xs))].append(ok)
    print(f"sorting, {args.sort_num} of seed {args.sort_seed} (right of the lists without a repeat / with one):")
    for n in sorted({n for n, _ in sorts}):
        plain, rep = sorts[(n, False)], sorts[(n, True)]
        print(f"  {n:>2} numbers: {sum(plain)}/{len(plain)} / {sum(rep)}/{len(rep)}")


if __name__ == "__main__":
    main()

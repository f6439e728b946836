"""Issue 9's acceptance numbers for any checkpoint of the tiny model (the shipped one by default):
the ten fixed held-out instructions, the `self` predictor on the test's 200 instructions (its error
split between the answers the model gets right and those it gets wrong), and the error floor that
rounding lengths to the nearest 10 puts under that MAE.

    .venv/bin/python benchmarks/tiny_acceptance.py [--model DIR] [--training-overlap] [--also SEED ...]

`tests/test_builtin_model.py` asserts the same on the shipped model; this script measures other
checkpoints (a `train-tiny` run before it is shipped) the same way. `--training-overlap` also
says which of the ten the seed-0 training data draws (300,000 examples, about 20 s). `--also SEED`
scores `self` on 1,000 more instructions of that seed: a few runaway answers carry most of the
error, so one set of 200 says little about the spread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lengthwise import LLM, SamplingParams
from lengthwise.model.default import default_model_dir
from lengthwise.tiny import tasks
from lengthwise.tiny.demo import perception
from lengthwise.tiny.train import TinyConfig, round10
from lengthwise.tokenizer import Tokenizer

PERCEPTION_SEED = 778  # the acceptance test's 200 instructions (HELD_OUT_SEED + 1 there)


def rounding_floor(tok: Tokenizer, examples: list[tasks.Example]) -> tuple[float, float]:
    """(mean reference length with EOS, mean error of a perfect predictor that rounds to 10)."""
    lengths = [len(tok.encode(e.answer, add_special_tokens=False)) + 1 for e in examples]
    return sum(lengths) / len(lengths), sum(abs(n - round10(n)) for n in lengths) / len(lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--training-overlap", action="store_true", help="which of the ten the training data draws")
    p.add_argument("--also", type=int, action="append", default=[], metavar="SEED",
                   help="also score self on 1,000 instructions of this seed (repeat)")
    p.add_argument("--worst", type=int, default=0, metavar="N",
                   help="list the N instructions of the 200 with the largest self error")
    args = p.parse_args()
    model = args.model or default_model_dir()
    llm = LLM(model, dtype="float32", device="cpu")
    outs = llm.chat([[{"role": "user", "content": e.instruction}] for e in tasks.FIXED_HELD_OUT],
                    SamplingParams(max_tokens=512, temperature=0.0), use_tqdm=False)
    passed = 0
    for e, o in zip(tasks.FIXED_HELD_OUT, outs, strict=True):
        ok = o.outputs[0].finish_reason == "stop" and tasks.check(e, o.outputs[0].text)
        passed += ok
        print(f"{e.family:>16}: {'pass' if ok else 'FAIL'}  {o.outputs[0].text[:70]!r}")
    print(f"fixed held-out instructions: {passed} of {len(tasks.FIXED_HELD_OUT)}")
    held = tasks.generate(200, seed=PERCEPTION_SEED)
    sets = [("the 200", held)] + [(f"1,000 of seed {seed}", tasks.generate(1000, seed=seed)) for seed in args.also]
    for name, examples in sets:
        report = perception(model, [e.instruction for e in examples], kinds=("self",))["self"]
        m = report["metrics"]
        print(f"self on {name}: MAE {m['mae']:.1f} tokens = {m['mae_share']:.1%} of the mean "
              f"{m['mean_length']:.1f}, Kendall tau {m['kendall_tau']:.3f}")
        # Where the error comes from: lengths the model mispredicts for answers it gets right (what
        # Perception teaches), or answers that fail (mostly runaways it does not foresee).
        right = [tasks.check(e, a) for e, a in zip(examples, report["answers"], strict=True)]
        err = [abs(pred - a) for pred, a in zip(report["predicted"], report["actual"], strict=True)]
        for ok, label in ((True, "right"), (False, "wrong")):
            part = sum(x for x, r in zip(err, right, strict=True) if r == ok)
            print(f"  the {right.count(ok)} {label} answers: {part:.0f} tokens of error, "
                  f"{part / len(examples):.2f} per instruction of the set")
        if examples is held and args.worst > 0:
            rows = sorted(zip(examples, report["predicted"], report["actual"], report["answers"], strict=True),
                          key=lambda row: -abs(row[1] - row[2]))
            for e, pred, actual, answer in rows[:args.worst]:
                print(f"  {e.family:>16}: predicted {pred:4.0f}, answered in {actual:3d} "
                      f"({'right' if tasks.check(e, answer) else 'wrong'})  {e.instruction[:60]!r}")
    tok = Tokenizer(model)
    for name, examples in (("the 200", held), ("5,000 training draws", tasks.generate(5000, seed=0))):
        mean, floor = rounding_floor(tok, examples)
        print(f"greedy read's rounding floor, reference answers of {name}: {floor:.2f} tokens on a mean of {mean:.1f} "
              f"({floor / mean:.1%})")
    if args.training_overlap:
        seen = {e.instruction for e in tasks.generate(TinyConfig().num_examples, seed=0)}
        print("in the training data:", [e.family for e in tasks.FIXED_HELD_OUT if e.instruction in seen])


if __name__ == "__main__":
    main()

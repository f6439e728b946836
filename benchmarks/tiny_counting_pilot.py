"""Can the built-in model's architecture learn to stop counting at "b"? A pilot on counting alone.

    .venv/bin/python benchmarks/tiny_counting_pilot.py --steps 500 --out /tmp/pilot [--copy [--copy-share 0.9]] \
        [--set rope_theta=1000000] [--set num_layers=6]

Trains a fresh model of `TinyConfig`'s shape (with `--set` overrides) for `--steps` steps on
short counting only ("Count from a to b." / "Count down from b to a.", a in 0-150, at most 31
numbers), with the built-in tokenizer and the training module's loop, then answers 100 held-out
counting instructions greedily and prints the share answered exactly and the share that stopped
after the right count. `--copy` makes a share of the examples (`--copy-share`, default half)
"Copy these numbers: ..." instead, which reward the copy-what-followed-this-token (induction)
circuit that would also find the "." after b in the prompt, and also reports held-out copies.
This is the experiment behind "Counting pilots" in docs/benchmarks.md: the loss settles at about
0.1 per token, which is the stop decision alone, and greedy answers overrun.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lengthwise.model.default import default_model_dir
from lengthwise.tiny import tasks
from lengthwise.tiny.tokenizer import PAD, train_tokenizer
from lengthwise.tiny.train import (
    TinyConfig,
    TinyLlama,
    config_overrides,
    encode_pairs,
    greedy_answers,
    save_checkpoint,
    train_steps,
)


def counting(n: int, seed: int, copy_share: float = 0.0, sep: str = ", ") -> list[tasks.Example]:
    """`n` short counting examples, a `copy_share` of them number-copying examples instead, the
    numbers separated by `sep`."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        if r.random() < copy_share:
            nums = sep.join(str(r.randint(0, 200)) for _ in range(r.randint(3, 20)))
            out.append(tasks.Example("copy", f"Copy these numbers: {nums}.", f"{nums}."))
            continue
        a = r.randint(0, 150)
        b = a + r.randint(1, 30)
        if r.random() < 0.5:
            out.append(tasks.Example("count_up", f"Count from {a} to {b}.", ", ".join(map(str, range(a, b + 1))) + "."))
        else:
            out.append(tasks.Example("count_down", f"Count down from {b} to {a}.",
                                     ", ".join(map(str, range(b, a - 1, -1))) + "."))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", type=Path, required=True, help="where the pilot's checkpoint goes")
    p.add_argument("--copy", action="store_true", help="half the examples copy a list of numbers")
    p.add_argument("--copy-share", type=float, default=0.5, help="with --copy: the share of copy examples")
    p.add_argument("--copy-sep", choices=["comma", "space"], default="comma",
                   help="with --copy: numbers separated by ', ' (the next number follows a comma, which "
                        "a plain induction head cannot place) or by ' ' (each number predicts the next)")
    p.add_argument("--split-digits", action="store_true",
                   help="train a digit-splitting tokenizer (every digit its own token) on 20,000 generator "
                        "examples instead of using the built-in model's")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TinyConfig override")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not 0.0 <= args.copy_share <= 1.0:
        p.error("--copy-share must be between 0 and 1")
    torch.set_num_threads(args.threads)
    try:
        overrides = config_overrides(args.set)
    except ValueError as e:
        p.error(f"--set: {e}")
    sep = ", " if args.copy_sep == "comma" else " "
    train = counting(40_000, 7, args.copy_share if args.copy else 0.0, sep)
    if args.split_digits:
        texts = [t for e in tasks.generate(20_000, seed=0) + train[:5000] for t in (e.instruction, e.answer)]
        tok = train_tokenizer(texts, TinyConfig.vocab_size, split_digits=True)
    else:
        tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    print("tokens of 'Count from 28 to 40.':", tok.encode("Count from 28 to 40.").tokens)
    c = TinyConfig(**{**overrides, "vocab_size": tok.get_vocab_size()})
    torch.manual_seed(0)
    data = encode_pairs(tok, [(e.instruction, e.answer) for e in train])
    t0 = time.monotonic()
    model = TinyLlama(c)
    losses = train_steps(model, data, args.steps, c.lr, c, tok.token_to_id(PAD), "pilot", torch.device("cpu"))
    print("loss every 100 steps:", " ".join(f"{sum(losses[i:i + 100]) / len(losses[i:i + 100]):.2f}"
                                             for i in range(0, len(losses), 100)))
    print(f"trained {args.steps} steps in {time.monotonic() - t0:.0f} s; loss (last 20) {sum(losses[-20:]) / 20:.3f}")
    save_checkpoint(model, tok, args.out, {"pilot": "counting", "steps": args.steps, **overrides})
    held = counting(100, 12345)
    if args.copy:
        copies = counting(50, 54321, copy_share=1.0, sep=sep)
        got = greedy_answers(args.out, [e.instruction for e in copies], 200)
        print(f"held-out copies: exact {sum(a == e.answer for e, (a, _) in zip(copies, got, strict=True)) / 50:.0%}")
    answers = greedy_answers(args.out, [e.instruction for e in held], 200)
    exact = sum(a == e.answer for e, (a, _) in zip(held, answers, strict=True)) / len(held)
    stopped = sum(a.count(",") == e.answer.count(",") and a.endswith(".")
                  for e, (a, _) in zip(held, answers, strict=True)) / len(held)
    print(f"held-out counting: exact {exact:.0%}, stopped after the right count {stopped:.0%}")
    for e, (a, _) in list(zip(held, answers, strict=True))[:3]:
        print(f"  {e.instruction!r} -> ...{a[-40:]!r}")


if __name__ == "__main__":
    main()

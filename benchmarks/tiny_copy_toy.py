"""Can the built-in model's architecture and training loop learn to copy, and what stops it?

    .venv/bin/python benchmarks/tiny_copy_toy.py --layout plain --steps 600 [--threads 1]

Sequences of 3 to 20 random tokens (201 possible) are copied: the prompt holds the tokens, the
answer repeats them, and the loss is on the answer only. Trained with `TinyConfig`'s shape and the
recipe's own loop (`train_steps`: AdamW, warm-up and cosine, length-grouped batches of 4,096
tokens), 40,000 sequences. Four layouts isolate what the counting pilots' "Copy these numbers"
examples add to the plain task:

- `plain`: BOS, tokens, separator | tokens, end
- `plain-first-differs`: the same, but the answer's first token has another id (as "12" after the
  chat template's assistant token against " 12" in the prompt: BPE gives them different ids)
- `template`: seven fixed instruction tokens before the tokens, then "." and the assistant token |
  tokens, ".", EOS (the shape of "Copy these numbers: 12 45 188.")
- `template-first-differs`: both (the counting pilots' copy examples exactly)
- `filler-template`: 0 to 12 random filler tokens (ids 600-700) between BOS and the template, so
  no fixed position anchors the list: only matching content can find the next token to copy

`--comma` puts a separator token between the copied tokens (as ", " between numbers): the token
before each copied one is then always the same, so an induction head must key on the copied
token two back.

`--numbered` puts a distinct index token before each copied token instead (as in "1. 57" lines):
each item then follows its own key.

`--alphabet K` draws the copied tokens from K ids instead of 201 (fewer identities, each seen more
often: the easiest setting for a token-matching head to form).

Prints the mean answer-token loss per 100 steps; guessing costs ln(K) per copied token (5.3 for 201).
"""

from __future__ import annotations

import argparse
import random

import torch

from lengthwise.tiny.train import TinyConfig, TinyLlama, config_overrides, train_steps

LAYOUTS = ("plain", "plain-first-differs", "template", "template-first-differs", "filler-template")


def sequences(layout: str, n: int, seed: int, alphabet: int = 201, comma: bool = False,
              numbered: bool = False) -> list[tuple[list[int], int]]:
    """`n` (token ids, prompt length) copy examples in `layout`. Ids: 0 pad, 1 BOS, 2 separator /
    EOS, 3 end, 4 assistant, 5-16 template words and ".", 300-500 the tokens to copy (800-1000 their
    other ids), 600-700 filler, 17 the `comma` separator, 20-39 the `numbered` indices."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        x = [r.randint(300, 300 + alphabet - 1) for _ in range(r.randint(3, 20))]
        answer = ([x[0] + 500] + x[1:]) if layout.endswith("first-differs") else list(x)
        if comma:  # id 17 between the items, in the prompt and in the answer
            x, answer = ([t for v in seq for t in (v, 17)][:-1] for seq in (x, answer))
        if numbered:  # ids 20-39 name the items' places, in the prompt and in the answer
            x, answer = ([t for i, v in enumerate(seq) for t in (20 + i, v)] for seq in (x, answer))
        if "template" in layout:
            filler = [r.randint(600, 700) for _ in range(r.randint(0, 12))] if layout.startswith("filler") else []
            prompt, answer = [1, *filler, 5, 10, 11, 12, 13, 14, 15] + x + [16, 4], answer + [16, 2]
        else:
            prompt, answer = [1, *x, 2], answer + [3]
        out.append((prompt + answer, len(prompt)))
    return out


@torch.no_grad()
def copy_accuracy(model: TinyLlama, examples: list[tuple[list[int], int]]) -> tuple[float, float]:
    """Teacher-forced argmax accuracy on the answers of `examples`: the share of copied tokens
    (ids 300 and up; separators, indices and the end are easy) predicted right, and the share of
    answers with every token right."""
    right = total = whole = 0
    for seq, n_prompt in examples:
        ids = torch.tensor([seq])
        where = torch.zeros_like(ids, dtype=torch.bool)
        where[0, n_prompt - 1:len(seq) - 1] = True
        target = ids[0, n_prompt:]
        hits = model(ids, where).argmax(-1) == target
        copied = hits[target >= 300]
        right, total, whole = right + int(copied.sum()), total + copied.numel(), whole + bool(hits.all())
    return right / total, whole / len(examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=LAYOUTS, default="plain")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--comma", action="store_true", help="a separator token between the copied tokens")
    p.add_argument("--numbered", action="store_true", help="an index token before each copied token")
    p.add_argument("--alphabet", type=int, default=201, help="how many token ids the copied tokens come from")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TinyConfig override (model shape, lr, warmup_steps, ...)")
    args = p.parse_args()
    try:
        overrides = config_overrides(args.set)
    except ValueError as e:
        p.error(f"--set: {e}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = TinyConfig(**overrides)
    model = TinyLlama(c)
    data = sequences(args.layout, 40_000, 0, args.alphabet, args.comma, args.numbered)
    losses = train_steps(model, data, args.steps, c.lr, c, 0, "toy2", torch.device("cpu"))
    held_out = sequences(args.layout, 500, 1, args.alphabet, args.comma, args.numbered)
    token_acc, exact = copy_accuracy(model, held_out)
    per100 = [sum(losses[i:i + 100]) / len(losses[i:i + 100]) for i in range(0, len(losses), 100)]
    extras = "".join(f", {flag}" for flag in ("comma", "numbered") if getattr(args, flag))
    extras += "".join(f", {item}" for item in args.set)
    name = f"{args.layout} (alphabet {args.alphabet}{extras})"
    print(f"{name}: loss per 100 steps", " ".join(f"{v:.2f}" for v in per100))
    print(f"{name}: held-out answers, teacher-forced: {token_acc:.1%} of copied tokens right, {exact:.1%} of answers "
          "entirely right")


if __name__ == "__main__":
    main()

"""Where does the built-in model look? Teacher-forced attention, head by head, at chosen answer tokens.

    .venv/bin/python benchmarks/tiny_attention.py "Count from 28 to 40." \\
        "28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40." --at 35 --at 40 [--model DIR]

Feeds the chat-rendered instruction and the given answer through transformers' eager Llama (so the
weights are read exactly as a user's transformers would) and prints, for every answer token whose
text (without its leading space) is one of `--at`, the three positions each head of each layer
attends to most, as `token@position:weight`. This is the diagnostic behind "what the model
attends to" in docs/benchmarks.md: whether a head matches the current number to the same number in
the prompt (content matching, which stopping at "b" needs) or only looks at fixed places.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from lengthwise.model.default import default_model_dir
    from lengthwise.tiny.train import render

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("instruction")
    p.add_argument("answer", help="the answer to teacher-force")
    p.add_argument("--at", action="append", required=True, help="answer token text to inspect (repeatable)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--top", type=int, default=3)
    args = p.parse_args()
    model_dir = args.model or default_model_dir()
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = tok.encode(render(args.instruction)).ids
    ids = prompt + tok.encode(args.answer).ids
    names = [tok.id_to_token(i) for i in ids]
    with torch.no_grad():
        attentions = model(torch.tensor([ids]), output_attentions=True).attentions
    wanted = set(args.at)
    for pos in range(len(prompt), len(ids)):
        if names[pos].lstrip("Ġ") not in wanted:
            continue
        print(f"answer token {names[pos]!r} at position {pos}:")
        for layer, a in enumerate(attentions):
            for head in range(a.shape[1]):
                top = a[0, head, pos].topk(min(args.top, pos + 1))
                where = ", ".join(f"{names[j]}@{j}:{w:.2f}" for w, j in zip(top.values.tolist(), top.indices.tolist(),
                                                                           strict=True))
                print(f"  layer {layer} head {head}: {where}")


if __name__ == "__main__":
    main()

"""Where the built-in model's answer goes wrong: its probability of each reference token, teacher-forced.

    .venv/bin/python benchmarks/tiny_teacher_forced.py "Count from 46 to 51." "46, 47, 48, 49, 50, 51."

For every answer token the model is fed the reference prefix and prints P(reference token) and its
top 3 choices. This is how the counting failure was diagnosed (docs/benchmarks.md, "The built-in
model"): P(".") after each number rises with position instead of jumping at the number that
matches the instruction's end point. Uses the training module's model (`lengthwise.tiny.train`)
on the checkpoint's weights, so it also works on checkpoints mid-recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lengthwise.model.default import default_model_dir
from lengthwise.model.loader import weight_files
from lengthwise.tiny.train import TinyConfig, TinyLlama, encode_pairs


def load(model_dir: Path) -> tuple[TinyLlama, Tokenizer]:
    cfg = json.loads((model_dir / "config.json").read_text())
    c = TinyConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                   intermediate_size=cfg["intermediate_size"], rope_theta=cfg["rope_theta"])
    model = TinyLlama(c)
    state = {k: v.float() for f in weight_files(model_dir) for k, v in load_file(str(f)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("instruction")
    p.add_argument("answer", help="the reference answer to teacher-force")
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    args = p.parse_args()
    model, tok = load(args.model or default_model_dir())
    [(ids, n_prompt)] = encode_pairs(tok, [(args.instruction, args.answer)])
    with torch.no_grad():
        probs = model(torch.tensor([ids]))[0].softmax(-1)
    for t in range(n_prompt - 1, len(ids) - 1):
        top = probs[t].topk(3)
        choices = ", ".join(f"{tok.id_to_token(int(i))!r} {float(v):.3f}" for v, i in zip(top.values, top.indices,
                                                                                          strict=True))
        print(f"after {tok.id_to_token(ids[t])!r:>16}: P({tok.id_to_token(ids[t + 1])!r}) = "
              f"{float(probs[t, ids[t + 1]]):.3f}   top: {choices}")


if __name__ == "__main__":
    main()

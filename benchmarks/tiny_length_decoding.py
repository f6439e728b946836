"""Does reading the `self` answer from the model's whole distribution beat greedy decoding?

    .venv/bin/python benchmarks/tiny_length_decoding.py [--model DIR] [--seed 778] [--num 200]

For each instruction, every rounded length the Perception rounds teach (10, 20, ..., 510) is scored
by the log-probability of its tokens and EOS after the length query (transformers, float32); the
scores are normalised over those candidates and read four ways: greedy decoding (the `self`
predictor as shipped), the most likely candidate, the median and the mean. Each is scored by its
MAE against the lengths the model then really answers in (seed 778, 200 instructions: the
acceptance test's set).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lengthwise.model.default import default_model_dir
from lengthwise.predict.self_predict import QUERY
from lengthwise.tiny import tasks
from lengthwise.tiny.demo import perception
from lengthwise.tokenizer import Tokenizer

CANDIDATES = list(range(10, 520, 10))


def candidate_distribution(model: torch.nn.Module, tok: Tokenizer, instruction: str, eos: int) -> torch.Tensor:
    """The model's probability of each of CANDIDATES (with EOS) as the answer to the length query."""
    prompt = tok.encode_chat([{"role": "user", "content": instruction + QUERY}], add_generation_prompt=True)
    answers = [tok.encode(str(k), add_special_tokens=False) + [eos] for k in CANDIDATES]
    width = len(prompt) + max(len(a) for a in answers)
    seqs = torch.zeros((len(answers), width), dtype=torch.long)
    for i, a in enumerate(answers):
        seqs[i, :len(prompt) + len(a)] = torch.tensor(prompt + a)
    with torch.no_grad():
        logp = torch.log_softmax(model(seqs).logits.float(), -1)
    scores = torch.tensor([sum(logp[i, len(prompt) - 1 + j, t].item() for j, t in enumerate(a))
                           for i, a in enumerate(answers)])
    return torch.softmax(scores, 0)


def main() -> None:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the built-in model)")
    p.add_argument("--seed", type=int, default=778)
    p.add_argument("--num", type=int, default=200)
    args = p.parse_args()
    model_dir = args.model or default_model_dir()
    examples = tasks.generate(args.num, seed=args.seed)
    report = perception(model_dir, [e.instruction for e in examples], kinds=("self",))["self"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tok = Tokenizer(model_dir)
    values = torch.tensor(CANDIDATES, dtype=torch.float)
    reads: dict[str, list[float]] = {"greedy": list(report["predicted"]), "most likely": [], "median": [], "mean": []}
    for e in examples:
        w = candidate_distribution(model, tok, e.instruction, model.config.eos_token_id)
        reads["most likely"].append(CANDIDATES[int(w.argmax())])
        reads["median"].append(CANDIDATES[int((torch.cumsum(w, 0) < 0.5).sum())])
        reads["mean"].append(float((w * values).sum()))
    actual = report["actual"]
    mean = sum(actual) / len(actual)
    for name, predicted in reads.items():
        mae = sum(abs(a - b) for a, b in zip(predicted, actual, strict=True)) / len(actual)
        print(f"{name:>11}: MAE {mae:.2f} tokens = {mae / mean:.1%} of the mean {mean:.1f}")


if __name__ == "__main__":
    main()

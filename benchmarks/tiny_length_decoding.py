"""Does reading the `self` answer from the model's whole distribution beat greedy decoding?

    .venv/bin/python benchmarks/tiny_length_decoding.py [--model DIR] [--seed 778] [--num 200]

Two families of reads, each scored by its MAE (and Kendall tau) against the lengths the model then
really answers in (seed 778, 200 instructions: the acceptance test's set):

- through the engine: `self-greedy` (the paper's greedy answer) and `self` (the default: the
  likely first tokens completed greedily, their numbers' binned median; see
  lengthwise/predict/self_predict.py);
- exact candidate scoring with transformers (float32): every rounded length the Perception rounds
  teach (0, 10, ..., 510) scored by the log-probability of its tokens and EOS after the length
  query, normalised over those candidates, and read as the most likely candidate, the median, the
  mean, and the binned median (each candidate spread over the lengths that round to it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lengthwise.model.default import default_model_dir
from lengthwise.predict.metrics import kendall_tau
from lengthwise.predict.self_predict import QUERY, binned_median
from lengthwise.tiny import tasks
from lengthwise.tiny.demo import perception
from lengthwise.tokenizer import Tokenizer

CANDIDATES = list(range(0, 520, 10))


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
    instructions = [e.instruction for e in examples]
    report = perception(model_dir, instructions, kinds=("self-greedy", "self"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(model_dir)
    values = torch.tensor(CANDIDATES, dtype=torch.float)
    reads: dict[str, list[float]] = {"engine, self-greedy": list(report["self-greedy"]["predicted"]),
                                     "engine, self (default)": list(report["self"]["predicted"]),
                                     "scored, most likely": [], "scored, median": [], "scored, mean": [],
                                     "scored, binned median": []}
    for e in examples:
        w = candidate_distribution(model, tok, e.instruction, model.config.eos_token_id)
        reads["scored, most likely"].append(max(CANDIDATES[int(w.argmax())], 1))
        reads["scored, median"].append(max(CANDIDATES[int((torch.cumsum(w, 0) < 0.5).sum())], 1))
        reads["scored, mean"].append(max(float((w * values).sum()), 1.0))
        reads["scored, binned median"].append(max(binned_median(CANDIDATES, w.tolist(), 10.0), 1.0))
    actual = report["self"]["actual"]
    assert actual == report["self-greedy"]["actual"]  # the same greedy answers, whichever read
    mean = sum(actual) / len(actual)
    for name, predicted in reads.items():
        mae = sum(abs(a - b) for a, b in zip(predicted, actual, strict=True)) / len(actual)
        print(f"{name:>22}: MAE {mae:.2f} tokens = {mae / mean:.1%} of the mean {mean:.1f}, "
              f"Kendall tau {kendall_tau(predicted, actual):.3f}")


if __name__ == "__main__":
    main()

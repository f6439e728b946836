"""Continue a saved stage 1 of the tiny model (`train-tiny --save-stage1 FILE`) for more steps on the
same data, optionally weighting each answer's last two tokens (the stop decision: the "." after a
count's last number, or the end-of-sequence after the last number in words) by `--end-weight`,
and save the result as a checkpoint for `tiny_accuracy.py` (and as a stage-1 file, OUT.pt):

    .venv/bin/python benchmarks/tiny_restart_pilot.py --stage1 /tmp/tiny/s1-ship.pt --steps 1500 \\
        --lr 3e-4 [--end-weight 5] --out /tmp/exp/c-w1

This is the pilot behind `TinyConfig.stage1_restart_steps` (docs/benchmarks.md, "Eleventh
session"): 1,500 more steps at 3e-4 took the shipped stage 1 from 83.5% to 88.4% right; weighting
the stop decision by 5 did no better (87.5%). Its batches are drawn in another order than
`train-tiny`'s restart, so its numbers are close to, not equal to, the recipe's. About 7.5 minutes
for 1,500 steps on two cores.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lengthwise.predict.training import warmup_cosine
from lengthwise.tiny.tokenizer import PAD
from lengthwise.tiny.train import TinyConfig, TinyLlama, batches, save_checkpoint, stage1_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", type=Path, required=True, help="stage-1 weights saved by train-tiny --save-stage1")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-4, help="peak of the new warm-up and cosine")
    p.add_argument("--end-weight", type=float, default=1.0, help="weight of each answer's last two tokens")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (and OUT.pt)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.steps < 1 or args.end_weight <= 0:
        raise ValueError("--steps must be at least 1 and --end-weight positive")
    torch.set_num_threads(args.threads)
    saved = torch.load(args.stage1)
    # the saved run's data settings (seed, share, family weights); the shape fields are the defaults'
    c = TinyConfig(**{k: v for k, v in saved["config"].items() if k in TinyConfig.__dataclass_fields__})
    torch.manual_seed(c.seed)
    _, tok, data, length_data = stage1_data(c)
    model = TinyLlama(c)
    model.load_state_dict(saved["state"])
    every = data + length_data
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    it = batches(every, c.tokens_per_batch, random.Random(c.seed + 77), tok.token_to_id(PAD))
    schedule = warmup_cosine(args.steps, min(c.warmup_steps, args.steps // 10 + 1) / args.steps, c.min_lr_ratio)
    losses: list[float] = []
    model.train()
    for step in (bar := tqdm(range(args.steps), desc="restart")):
        for g in opt.param_groups:
            g["lr"] = args.lr * schedule(step)
        ids, labels, rows = next(it)
        where = labels != -100
        weight = torch.ones(labels.shape)
        for r, i in enumerate(rows):
            if i < len(data):  # instruction answers only, not the length answers
                n = len(every[i][0])
                weight[r, n - 3:n - 1] = args.end_weight  # labels of the last answer token and EOS
        token_loss = F.cross_entropy(model(ids, where), labels[where], reduction="none")
        loss = (token_loss * weight[where]).sum() / weight[where].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(token_loss.mean().item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    save_checkpoint(model, tok, args.out, {"stage": f"1, continued {args.steps} steps at {args.lr}, "
                                                    f"end weight {args.end_weight}"})
    # also as a stage-1 file (train-tiny --stage1 OUT.pt --set stage1_restart_steps=0: Perception on it)
    final = sum(losses[-20:]) / len(losses[-20:])
    torch.save({"state": model.state_dict(), "final_loss": final, "config": saved["config"]}, f"{args.out}.pt")
    print(f"final token loss {final:.3f}; checkpoint in {args.out}, stage-1 file {args.out}.pt")


if __name__ == "__main__":
    main()

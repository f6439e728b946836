"""Proxy predictor latency per request at batch 64, three ways of running the same encoder.

    .venv/bin/python benchmarks/proxy_latency.py --predictor /tmp/pred/proxy \\
        --data ../shared/data/alpaca-lengths/dev.jsonl --threads 2

- padded: transformers' BertModel, each batch of 64 padded to its longest prompt;
- grouped: BertModel on length-sorted groups cut by `length_groups` (padding vs. call overhead);
- packed: `predict/packed_bert.py`, dense layers over real tokens only (what `proxy` uses).
Prints a table and checks that the three give the same embeddings.
"""

from __future__ import annotations

import argparse
import time

import torch

from lengthwise.predict import load_length_data, load_predictor
from lengthwise.predict.evaluate import latency_ms
from lengthwise.predict.proxy import query_text


def _time_per_request(fn, batches: list[list[list[int]]]) -> float:
    fn(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return (time.perf_counter() - start) * 1000 / sum(len(b) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictor", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--requests", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = load_predictor(args.predictor)
    if predictor.kind != "proxy":
        raise SystemExit(f"{args.predictor} is a {predictor.kind} predictor, not a proxy")
    data = load_length_data(args.data, limit=args.requests)
    enc = predictor.encoder
    packed = enc.packed
    rows = enc.tokenize([query_text(q) for q in data.queries])
    batches = [rows[s:s + 64] for s in range(0, len(rows), 64)]

    @torch.no_grad()
    def padded(batch: list[list[int]]) -> torch.Tensor:
        return enc(*enc.collate(batch))

    def grouped(batch: list[list[int]]) -> torch.Tensor:
        enc.packed = None
        try:
            return enc.embed_ids(batch)
        finally:
            enc.packed = packed

    modes = {"padded": padded, "grouped": grouped, "packed": enc.embed_ids}
    reference = padded(batches[0])
    print(f"proxy encoder at batch 64: {len(rows)} prompts of {args.data}, {args.threads} threads")
    print(f"{'mode':<8} {'encode ms/request':>18} {'max |diff| vs padded':>22}")
    for name, fn in modes.items():
        ms = _time_per_request(fn, batches)
        diff = float((fn(batches[0]) - reference).abs().max())
        print(f"{name:<8} {ms:>18.2f} {diff:>22.2e}")
    full = latency_ms(predictor, data, 64, args.requests)
    print(f"predict() end to end (tokenize + packed encode + head): {full:.2f} ms/request")


if __name__ == "__main__":
    main()

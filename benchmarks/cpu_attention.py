"""Decode attention on the CPU: the C++ segment kernel against the torch reference, same inputs.

    .venv/bin/python benchmarks/cpu_attention.py [--batch 256] [--threads 2] [--in-cache 8]
        [--heads 12 --kv-heads 12 --head-dim 64]

A decode step of `--batch` rows (by default llama-100m's attention shape: 12 heads of 64, no GQA), each with
a prompt segment and a response segment of random lengths in scattered 16-token blocks. Prints the
time per layer call of each backend and the K/V bytes read per second (each context's keys and
values read once, the minimum any exact kernel must read): the torch reference, and the C++ kernel
over the cache in float32, bfloat16 (`kv_cache_dtype`: half the bytes) and float8 e4m3 and e5m2
(a quarter), each with its tiles walked a head at a time and in memory order
(`LENGTHWISE_CPU_ATTENTION_ORDER`; `*` marks the order the kernel takes for that dtype).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lengthwise.ops import AttentionMetadata, paged_attention
from lengthwise.ops.cpu import ATTENTION_ORDER_ENV


def _case(batch: int, heads: int, kv_heads: int, dim: int, bs: int, max_prompt: int, max_resp: int, seed: int,
          pool: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [(int(torch.randint(1, max_prompt, (1,), generator=g)), int(torch.randint(0, max_resp, (1,), generator=g)))
            for _ in range(batch)]
    need = sum(-(-p // bs) + -(-r // bs) for p, r in lens)
    if pool:  # every table entry one of `pool` blocks: K/V stay in cache, the kernel's compute shows
        k, v = torch.randn(2, pool * bs, kv_heads, dim, generator=g)
        blocks = torch.randint(0, pool, (need,), generator=g).tolist()
    else:
        k, v = torch.randn(2, need * bs, kv_heads, dim, generator=g)
        blocks = torch.randperm(need, generator=g).tolist()
    p_tab = [[blocks.pop() for _ in range(-(-p // bs))] for p, _ in lens]
    r_tab = [[blocks.pop() for _ in range(-(-r // bs))] for _, r in lens]

    def pad(t):
        w = max(1, max(map(len, t)))
        return torch.tensor([x + [0] * (w - len(x)) for x in t])

    meta = AttentionMetadata(list(range(batch + 1)), torch.zeros(0, dtype=torch.long), bs, pad(p_tab),
                             [p for p, _ in lens], pad(r_tab), [r for _, r in lens])
    q = torch.randn(batch, heads, dim, generator=g)
    positions = torch.tensor([p + r - 1 for p, r in lens])
    kv_bytes = sum(p + r for p, r in lens) * kv_heads * dim * 4 * 2
    return q, k, v, positions, meta, kv_bytes


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--heads", type=int, default=12, help="query heads (default: llama-100m's 12)")
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-prompt", type=int, default=300)
    ap.add_argument("--max-response", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--in-cache", type=int, default=0, metavar="BLOCKS",
                    help="draw every block from a pool of BLOCKS blocks (8: 768 KB of K/V, in L2), so the "
                         "kernel's compute rate shows instead of the memory's")
    args = ap.parse_args()
    if args.in_cache < 0:
        ap.error("--in-cache must be a block count >= 0")
    if min(args.heads, args.kv_heads, args.head_dim) < 1 or args.heads % args.kv_heads:
        ap.error("--heads, --kv-heads and --head-dim must be positive, --heads a multiple of --kv-heads")
    torch.set_num_threads(args.threads)
    q, k, v, pos, meta, kv_bytes = _case(args.batch, args.heads, args.kv_heads, args.head_dim, 16,
                                         args.max_prompt, args.max_response, 0, args.in_cache)
    print(f"decode attention, batch {args.batch}, {args.heads} heads x {args.head_dim} ({args.kv_heads} KV heads), "
          f"{kv_bytes / 1e6:.0f} MB of K/V, {args.threads} threads"
          + (f", all in {args.in_cache} cached blocks" if args.in_cache else ""))
    print(f"{'backend':<41} {'ms/layer':>9} {'GB/s':>7}")
    results = {}
    cases = [("reference", "torch", "auto", k, v, kv_bytes)]
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                               ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        kc, vc = k.to(torch_dtype), v.to(torch_dtype)
        nbytes = kv_bytes // 4 * kc.element_size()
        default = "head" if dtype == "float32" else "memory"
        for order in ("head", "memory"):
            name = f"cpu-kernel, {dtype} cache, {order} order" + (" *" if order == default else "")
            cases.append((name, "auto", order, kc, vc, nbytes))
    for name, backend, order, kc, vc, nbytes in cases:
        os.environ["LENGTHWISE_KERNELS"] = backend
        os.environ[ATTENTION_ORDER_ENV] = order
        dt = _time(lambda kc=kc, vc=vc: paged_attention(q, kc, vc, pos, meta, args.head_dim ** -0.5), args.repeats)
        results[name.removesuffix(" *")] = dt
        print(f"{name:<41} {dt * 1e3:>9.2f} {nbytes / dt / 1e9:>7.1f}")
    f32 = results["cpu-kernel, float32 cache, head order"]
    print(f"(* the order the kernel takes for that dtype) speed-up of the kernel over the reference: "
          f"{results['reference'] / f32:.1f}x; over a float32 cache, of a bfloat16 one "
          f"{f32 / results['cpu-kernel, bfloat16 cache, memory order']:.2f}x, fp8_e4m3 "
          f"{f32 / results['cpu-kernel, fp8_e4m3 cache, memory order']:.2f}x, fp8_e5m2 "
          f"{f32 / results['cpu-kernel, fp8_e5m2 cache, memory order']:.2f}x")


if __name__ == "__main__":
    main()

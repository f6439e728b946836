"""Microbenchmarks of the Triton kernels on a CUDA GPU, against the memory roofline.

    PYTHONPATH=. python benchmarks/triton_kernels.py [--check] [--tune] [--quick] [--only decode,...]

Prints markdown tables: the measured device-to-device copy bandwidth (bytes read + written); decode
attention at the Llama-3.2-1B shape (32 query heads, 8 KV heads, head_dim 64, bf16, blocks of 16
on shuffled block ids) for batch 1/8/64 and context 512/2048/8192 split 3:1 between the prompt
and response segments, as achieved GB/s of K+V read, split-K automatic and off, beside the torch
reference; the same by prompt:response split; RMSNorm+residual, SiLU-and-mul and RoPE+KV-write
GB/s; prefill attention TFLOP/s beside dense flash SDPA. `--check` first prints each kernel's
largest error against the torch reference; `--tune` sweeps the decode tiles and launch options.

Without CUDA it says so and exits; `--smoke` (with TRITON_INTERPRET=1) runs every table once on
tiny shapes on the CPU, timing one call each, to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Shapes:
    device: str = "cuda"
    heads: int = 32       # Llama-3.2-1B
    kv_heads: int = 8
    head_dim: int = 64
    hidden: int = 2048
    inter: int = 8192
    block_size: int = 16
    batches: tuple[int, ...] = (1, 8, 64)
    contexts: tuple[int, ...] = (512, 2048, 8192)
    segment_case: tuple[int, int] = (8, 4096)  # batch, context of the prompt:response table
    tune_cases: tuple[tuple[int, int], ...] = ((64, 2048), (8, 8192), (1, 8192))
    rows: tuple[int, ...] = (1, 64, 4096, 16384)
    rotary_rows: tuple[int, ...] = (64, 4096)
    # (batch, prompt, response, new queries)
    prefill_cases: tuple[tuple[int, int, int, int], ...] = (
        (4, 2048, 0, 2048), (1, 8192, 0, 8192), (8, 3000, 1000, 512))
    copy_bytes: int = 1 << 30


SMOKE = Shapes(device="cpu", heads=4, kv_heads=2, head_dim=16, hidden=64, inter=96, block_size=4, batches=(1, 3),
               contexts=(24, 40), segment_case=(2, 32), tune_cases=((2, 40),), rows=(1, 5), rotary_rows=(5,),
               prefill_cases=((2, 20, 0, 20), (2, 30, 7, 9)), copy_bytes=1 << 20)


class Bench:
    def __init__(self, shapes: Shapes, smoke: bool):
        self.s, self.smoke = shapes, smoke

    def time(self, fn) -> float:
        """Median milliseconds of `fn` (triton.testing.do_bench, which clears the L2 between runs)."""
        if self.smoke:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def with_kernels(choice: str) -> None:
    os.environ["LENGTHWISE_KERNELS"] = choice


def copy_bandwidth(b: Bench) -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    x = torch.empty(b.s.copy_bytes, dtype=torch.uint8, device=b.s.device)
    y = torch.empty_like(x)
    return 2 * x.numel() / b.time(lambda: y.copy_(x)) / 1e6


def attention_inputs(s: Shapes, batch: int, prompt: int, response: int, dtype=torch.bfloat16, queries: int = 1,
                     seed: int = 0):
    """q, caches, positions and metadata: `batch` row-groups with `prompt` + `response` cached tokens
    on shuffled blocks, `queries` new tokens each at the end of the context."""
    from lengthwise.ops import AttentionMetadata

    rng = random.Random(seed)
    bs, dev = s.block_size, s.device
    pb, rb = -(-prompt // bs), -(-response // bs)
    ids = list(range(batch * (pb + rb)))
    rng.shuffle(ids)
    p_tab = [ids[i * (pb + rb):i * (pb + rb) + pb] for i in range(batch)]
    r_tab = [ids[i * (pb + rb) + pb:(i + 1) * (pb + rb)] for i in range(batch)]
    ctx = prompt + response
    meta = AttentionMetadata([i * queries for i in range(batch + 1)], torch.zeros(0, dtype=torch.long, device=dev),
                             bs, torch.tensor(p_tab, device=dev), [prompt] * batch,
                             torch.tensor(r_tab, device=dev) if response else None,
                             [response] * batch if response else None)
    positions = torch.arange(ctx - queries, ctx, device=dev).repeat(batch)
    k = torch.randn(max(len(ids), 1) * bs, s.kv_heads, s.head_dim, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch * queries, s.heads, s.head_dim, device=dev, dtype=dtype)
    return q, k, v, positions, meta


def qkv_inputs(s: Shapes, t: int, dtype):
    from lengthwise.ops.rotary import rotary_cos_sin, rotary_inv_freq

    h, hkv, d = s.heads, s.kv_heads, s.head_dim
    qkv = torch.randn(t, (h + 2 * hkv) * d, device=s.device, dtype=dtype)  # q, k, v: strided views, as in the model
    q, k, v = qkv.split((h * d, hkv * d, hkv * d), -1)
    positions = torch.randint(0, 8000, (t,), device=s.device)
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(d, 500000.0).to(s.device), dtype)
    slots = torch.randperm(4 * t, device=s.device)[:t]
    caches = [torch.zeros(4 * t, hkv, d, device=s.device, dtype=dtype) for _ in range(2)]
    return q.view(t, h, d), k.view(t, hkv, d), v.view(t, hkv, d), cos, sin, caches, slots


def check_table(b: Bench) -> list[list[str]]:
    """Largest error of each kernel against the torch reference, float32 and bfloat16."""
    from lengthwise.ops import paged_attention, rms_norm, silu_and_mul
    from lengthwise.ops import triton as triton_ops
    from lengthwise.ops.rotary import rotary_and_write_kv
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    s, rows = b.s, []
    torch.manual_seed(0)
    with_kernels("torch")  # the dispatching ops are the reference; kernels are called directly
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        x, r = (torch.randn(64, s.hidden, device=s.device, dtype=dtype) for _ in range(2))
        w = 1 + 0.2 * torch.randn(s.hidden, device=s.device, dtype=dtype)
        ref, got = rms_norm(x, w, 1e-5, r), triton_ops.fused_add_rms_norm(x, w, 1e-5, r)
        rows.append([f"rms_norm+residual {name}", f"{(got[0] - ref[0]).abs().max().item():.3g}",
                     f"{(got[1] - ref[1]).abs().max().item():.3g}", f"{(got[0] != ref[0]).float().mean().item():.3%}"])
        gu = 2 * torch.randn(64, 2 * s.inter, device=s.device, dtype=dtype)
        ref, got = silu_and_mul(gu), triton_ops.silu_and_mul(gu)
        rows.append([f"silu_and_mul {name}", f"{(got - ref).abs().max().item():.3g}", "",
                     f"{(got != ref).float().mean().item():.3%}"])
        q, k, v, cos, sin, (kc, vc), slots = qkv_inputs(s, 64, dtype)
        kc2, vc2 = kc.clone(), vc.clone()
        ref = rotary_and_write_kv(q, k, v, cos, sin, kc, vc, slots)
        got = triton_ops.rotary_and_write_kv(q, k, v, cos, sin, kc2, vc2, slots)
        cache_err = max((kc2 - kc).abs().max().item(), (vc2 - vc).abs().max().item())
        rows.append([f"rotary+write_kv {name}", f"{(got - ref).abs().max().item():.3g}", f"{cache_err:.3g}",
                     f"{(got != ref).float().mean().item():.3%}"])
        big = not b.smoke
        for label, batch, prompt, response, queries, window in (
                ("decode", 8, 3000 if big else 30, 1000 if big else 10, 1, None),
                ("decode window", 2, 700 if big else 17, 300 if big else 6, 1, 256 if big else 5),
                ("prefill", 4, 512 if big else 21, 0, 512 if big else 21, None),
                ("chunked prefill", 3, 1000 if big else 23, 200 if big else 5, 128 if big else 7, None),
                ("prefill window", 2, 600 if big else 19, 77 if big else 6, 300 if big else 9, 128 if big else 4)):
            q, k, v, pos, meta = attention_inputs(s, batch, prompt, response, dtype, queries)
            ref = paged_attention(q, k, v, pos, meta, s.head_dim ** -0.5, window)
            errs = [(triton_attention(q, k, v, pos, meta, s.head_dim ** -0.5, window, num_splits=n).float()
                     - ref.float()).abs().max().item() for n in ((1, 4) if queries == 1 else (None,))]
            shape = f"B={batch} {prompt}+{response}, {queries} new" + (f", window {window}" if window else "")
            rows.append([f"attention {label} {name} ({shape})", " / ".join(f"{e:.3g}" for e in errs), "", ""])
    with_kernels("auto")
    return rows


def decode_table(b: Bench, copy_gbs: float, quick: bool) -> list[list[str]]:
    from lengthwise.ops import paged_attention
    from lengthwise.ops.triton.attention import _num_sms, choose_num_splits
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    s, rows = b.s, []
    scale = s.head_dim ** -0.5
    for batch in s.batches:
        for ctx in s.contexts:
            prompt = ctx * 3 // 4
            q, k, v, pos, meta = attention_inputs(s, batch, prompt, ctx - prompt)
            kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * 2
            splits = choose_num_splits(batch, s.kv_heads, ctx, _num_sms(q.device))
            t_auto = b.time(lambda: triton_attention(q, k, v, pos, meta, scale))  # noqa: B023
            t_off = b.time(lambda: triton_attention(q, k, v, pos, meta, scale, num_splits=1))  # noqa: B023
            t_ref = float("nan")
            if not quick:
                with_kernels("torch")
                t_ref = b.time(lambda: paged_attention(q, k, v, pos, meta, scale))  # noqa: B023
                with_kernels("auto")
            rows.append([str(batch), f"{prompt}+{ctx - prompt}", f"{kv_bytes / 2**20:.1f}", str(splits),
                         f"{t_auto * 1e3:.1f}", f"{kv_bytes / t_auto / 1e6:.0f}",
                         f"{kv_bytes / t_auto / 1e6 / copy_gbs:.0%}", f"{t_off * 1e3:.1f}",
                         f"{kv_bytes / t_off / 1e6:.0f}", f"{kv_bytes / t_off / 1e6 / copy_gbs:.0%}",
                         f"{t_ref * 1e3:.0f}"])
    return rows


def segment_split_table(b: Bench, copy_gbs: float) -> list[list[str]]:
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    s, rows = b.s, []
    batch, ctx = s.segment_case
    for prompt in (ctx, ctx * 3 // 4, ctx // 2, ctx // 4, 1):
        q, k, v, pos, meta = attention_inputs(s, batch, prompt, ctx - prompt)
        kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * 2
        ms = b.time(lambda: triton_attention(q, k, v, pos, meta, s.head_dim ** -0.5))  # noqa: B023
        rows.append([f"{prompt}+{ctx - prompt}", f"{ms * 1e3:.1f}", f"{kv_bytes / ms / 1e6:.0f}",
                     f"{kv_bytes / ms / 1e6 / copy_gbs:.0%}"])
    return rows


def tune_table(b: Bench, copy_gbs: float) -> list[list[str]]:
    from lengthwise.ops.triton.attention import _decode_config
    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    s, rows = b.s, []
    default_bn, default_warps = _decode_config(torch.bfloat16, max(16, s.head_dim))
    for batch, ctx in s.tune_cases:
        q, k, v, pos, meta = attention_inputs(s, batch, ctx * 3 // 4, ctx - ctx * 3 // 4)
        kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * 2
        results = []
        for bn in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    try:
                        ms = b.time(lambda: triton_attention(q, k, v, pos, meta, s.head_dim ** -0.5,  # noqa: B023
                                                             block_n=bn, num_warps=warps,  # noqa: B023
                                                             num_stages=stages))  # noqa: B023
                    except Exception as e:  # out of shared memory or registers, say
                        print(f"  tune B={batch} ctx={ctx} BLOCK_N={bn} warps={warps} stages={stages}: {e!r}"[:200])
                        continue
                    results.append((ms, bn, warps, stages))
        results.sort()
        default = [r for r in results if r[1:] == (default_bn, default_warps, 2)][:1]
        for ms, bn, warps, stages in results[:4] + [r for r in default if r not in results[:4]]:
            tag = " (default)" if (bn, warps, stages) == (default_bn, default_warps, 2) else ""
            rows.append([f"B={batch} ctx={ctx}{tag}", str(bn), str(warps), str(stages), f"{ms * 1e3:.1f}",
                         f"{kv_bytes / ms / 1e6 / copy_gbs:.0%}"])
    return rows


def elementwise_table(b: Bench, copy_gbs: float) -> list[list[str]]:
    from lengthwise.ops import rms_norm, silu_and_mul
    from lengthwise.ops import triton as triton_ops
    from lengthwise.ops.rotary import rotary_and_write_kv

    s, rows, bf = b.s, [], torch.bfloat16

    def row(name, nbytes, fn, ref):
        ms = b.time(fn)
        with_kernels("torch")
        ms_ref = b.time(ref)
        with_kernels("auto")
        rows.append([name, f"{nbytes / 2**20:.2f}", f"{ms * 1e3:.1f}", f"{nbytes / ms / 1e6:.0f}",
                     f"{nbytes / ms / 1e6 / copy_gbs:.0%}", f"{ms_ref * 1e3:.1f}"])

    n = s.hidden
    for t in s.rows:
        x, r = (torch.randn(t, n, device=s.device, dtype=bf) for _ in range(2))
        w = torch.randn(n, device=s.device, dtype=bf)
        row(f"rms_norm+residual T={t} N={n}", 4 * t * n * 2 + n * 2,
            lambda x=x, r=r, w=w: triton_ops.fused_add_rms_norm(x, w, 1e-5, r),
            lambda x=x, r=r, w=w: rms_norm(x, w, 1e-5, r))
    for t in s.rows:
        gu = torch.randn(t, 2 * s.inter, device=s.device, dtype=bf)
        row(f"silu_and_mul T={t} I={s.inter}", 3 * t * s.inter * 2, lambda gu=gu: triton_ops.silu_and_mul(gu),
            lambda gu=gu: silu_and_mul(gu))
    for t in s.rotary_rows:
        q, k, v, cos, sin, (kc, vc), slots = qkv_inputs(s, t, bf)
        # q read + written, k read + written to the cache, v the same, cos and sin read
        nbytes = t * s.head_dim * 2 * (2 * s.heads + 4 * s.kv_heads + 2)
        args = (q, k, v, cos, sin, kc, vc, slots)
        row(f"rotary+write_kv T={t}", nbytes, lambda a=args: triton_ops.rotary_and_write_kv(*a),
            lambda a=args: rotary_and_write_kv(*a))
    return rows


def prefill_table(b: Bench) -> list[list[str]]:
    import torch.nn.functional as F

    from lengthwise.ops.triton.attention import paged_attention as triton_attention

    s, rows = b.s, []
    for batch, prompt, response, queries in s.prefill_cases:
        q, k, v, pos, meta = attention_inputs(s, batch, prompt, response, queries=queries)
        ctx = prompt + response
        visible = batch * sum(ctx - queries + i + 1 for i in range(queries))  # causal (query, key) pairs
        flops = 4 * visible * s.heads * s.head_dim  # QK^T and PV
        ms = b.time(lambda: triton_attention(q, k, v, pos, meta, s.head_dim ** -0.5))  # noqa: B023
        # dense reference: SDPA (flash on CUDA) on contiguous K/V, no paging; non-causal for a chunk
        qd = torch.randn(batch, s.heads, queries, s.head_dim, device=s.device, dtype=torch.bfloat16)
        kd = torch.randn(batch, s.kv_heads, ctx, s.head_dim, device=s.device, dtype=torch.bfloat16)
        vd = torch.randn_like(kd)
        causal = queries == ctx
        ms_sdpa = b.time(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal,  # noqa: B023
                                                                enable_gqa=True))  # noqa: B023
        rows.append([f"B={batch} {prompt}+{response}, {queries} new", f"{ms * 1e3:.0f}", f"{flops / ms / 1e9:.1f}",
                     f"{ms_sdpa * 1e3:.0f}{'' if causal else ' (non-causal)'}"])
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="first print each kernel's error vs the torch reference")
    parser.add_argument("--tune", action="store_true", help="sweep decode tile sizes and launch options")
    parser.add_argument("--quick", action="store_true", help="skip the torch reference timings of decode")
    parser.add_argument("--only", default="", help="comma-separated tables: decode,segments,elementwise,prefill")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1")
        shapes = SMOKE
    elif not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py needs a CUDA GPU; none is visible here.")
        return
    else:
        shapes = Shapes()
    import triton

    b = Bench(shapes, args.smoke)
    only = set(filter(None, args.only.split(",")))
    if shapes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
              f"triton {triton.__version__}")
    copy_gbs = copy_bandwidth(b)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written, {shapes.copy_bytes >> 20} MiB)")
    if args.check:
        print_table("max |triton - torch reference| (decode attention: split-K off / 4 splits)",
                    ["kernel", "out", "residual / cache", "elements differing"], check_table(b))
    hdr = (f"{shapes.heads} q heads, {shapes.kv_heads} kv heads, head_dim {shapes.head_dim}, bf16, "
           f"block {shapes.block_size}")
    if not only or "decode" in only:
        print_table(f"decode attention, {hdr}, prompt:response 3:1; GB/s = K+V bytes read / time",
                    ["batch", "context", "KV MiB", "splits", "auto us", "GB/s", "of copy", "split off us", "GB/s",
                     "of copy", "torch ref us"], decode_table(b, copy_gbs, args.quick))
    if not only or "segments" in only:
        batch, ctx = shapes.segment_case
        print_table(f"decode attention, {hdr}, batch {batch}, context {ctx}, by prompt+response",
                    ["prompt+response", "us", "GB/s", "of copy"], segment_split_table(b, copy_gbs))
    if args.tune:
        print_table(f"decode tuning, {hdr} (best four per shape, then the default)",
                    ["shape", "BLOCK_N", "warps", "stages", "us", "of copy"], tune_table(b, copy_gbs))
    if not only or "elementwise" in only:
        print_table("elementwise kernels, bf16 (bytes moved = read + written)",
                    ["kernel", "MiB moved", "us", "GB/s", "of copy", "torch ref us"], elementwise_table(b, copy_gbs))
    if not only or "prefill" in only:
        print_table(f"prefill attention (varlen, paged), {hdr}, causal",
                    ["shape", "us", "TFLOP/s", "dense SDPA us"], prefill_table(b))


if __name__ == "__main__":
    main()

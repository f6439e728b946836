"""Compile every Triton kernel for a Hopper GPU (sm_90) without one, as the model would launch them.

    PYTHONPATH=. python benchmarks/triton_compile_check.py [--arch 90] [--head-dim 64] ...

The ops run on CPU tensors shaped like Llama-3.2-1B (by default); each kernel launch is caught,
specialised exactly as a launch would be (argument types, 16-byte alignment and divisibility) and
compiled to PTX and a cubin with the ptxas bundled in the triton wheel. Prints, per kernel: the
shared memory, registers and spill bytes (ptxas -v), and whether the loads are 16-byte vectors and
the dots tensor-core instructions. Catches the compile errors that the interpreter cannot, on the
installed triton version. Uses triton internals (`create_function_from_signature`, `_pack_args`),
so it may need updating with triton.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("unset TRITON_INTERPRET: this compiles the real kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402


class CompileOnly:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args)` compiles for `target` and records."""

    def __init__(self, kernel, target, label: str, results: list):
        self.kernel, self.target, self.label, self.results = kernel, target, label, results

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            backend = make_backend(self.target)
            binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.kernel._pack_args(backend, kwargs, bound, specialization,
                                                                           options)
            src = ASTSource(self.kernel, signature, constexprs, attrs)
            compiled = triton.compile(src, target=self.target, options=options.__dict__)
            names = self.kernel.arg_names
            consts = {names[path[0]]: v for path, v in constexprs.items() if names[path[0]].isupper()}
            self.results.append((self.label, self.kernel.fn.__name__, consts, options, compiled))
        return launch


def ptxas_report(ptx: str, arch: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # older triton: no argument
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=8192)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3", "fp8_e5m2"],
                        help="the KV cache the write and attention kernels are compiled for (auto: the activations')")
    args = parser.parse_args()

    from lengthwise.ops import AttentionMetadata
    from lengthwise.ops import triton as triton_ops
    from lengthwise.ops.triton import activation, attention, fused, linear, norm, rotary

    target = GPUTarget("cuda", args.arch, 32)
    results: list = []
    mods = {norm: ["_rms_norm_kernel"], activation: ["_silu_and_mul_kernel"], rotary: ["_rotary_write_kernel"],
            attention: ["_decode_kernel", "_decode_reduce_kernel", "_prefill_kernel"], linear: ["_gemv_kernel"],
            fused: ["_norm_qkv_rotary_kernel", "_norm_gate_up_silu_kernel"]}
    originals = {(mod, k): getattr(mod, k) for mod, names in mods.items() for k in names}
    h, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, 16
    for dtype in [getattr(torch, n) for n in args.dtypes.split(",")]:
        name = str(dtype).removeprefix("torch.")
        for (mod, k), kernel in originals.items():
            setattr(mod, k, CompileOnly(kernel, target, name, results))
        t = 64
        x, r, w = torch.randn(t, args.hidden, dtype=dtype), torch.randn(t, args.hidden, dtype=dtype), \
            torch.randn(args.hidden, dtype=dtype)
        triton_ops.fused_add_rms_norm(x, w, 1e-5, r)
        triton_ops.fused_add_rms_norm(torch.randn(t, h, d, dtype=dtype), torch.randn(d, dtype=dtype), 1e-5)
        triton_ops.silu_and_mul(torch.randn(t, 2 * args.inter, dtype=dtype))
        qkv = torch.randn(t, (h + 2 * hkv) * d, dtype=dtype)
        q, k, v = qkv.split((h * d, hkv * d, hkv * d), -1)
        q, k, v = q.view(t, h, d), k.view(t, hkv, d), v.view(t, hkv, d)
        fp8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
        cache = torch.zeros(4096 * bs, hkv, d, dtype=fp8.get(args.kv_cache_dtype, dtype))
        triton_ops.rotary_and_write_kv(q, k, v, torch.randn(t, d, dtype=dtype), torch.randn(t, d, dtype=dtype),
                                       cache, cache, torch.arange(t))
        # The batch-1 GEMVs (plain and split-K) and the fused single-row kernels, every autotuned config.
        x1, res1, g1 = x[:1], r[:1], w
        for c in linear._CONFIGS + linear._SPLIT_CONFIGS:
            for n_out, k_in in ((args.hidden, args.hidden), (args.hidden, args.inter)):  # o_proj, down_proj
                triton_ops.gemv(torch.randn(1, k_in, dtype=dtype), torch.randn(n_out, k_in, dtype=dtype),
                                tile={**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
        qkv_w = torch.randn((h + 2 * hkv) * d, args.hidden, dtype=dtype)
        gate_up_w = torch.randn(2 * args.inter, args.hidden, dtype=dtype)
        for cp, cn in zip(fused._CONFIGS["BLOCK_P"], fused._CONFIGS["BLOCK_N"], strict=True):
            opts = {"num_warps": cp.num_warps, "num_stages": cp.num_stages}
            cos1, sin1 = torch.randn(1, d, dtype=dtype), torch.randn(1, d, dtype=dtype)
            triton_ops.norm_qkv_rotary_write(x1, res1, g1, 1e-5, qkv_w, None, cos1, sin1, cache, cache,
                                             torch.zeros(1, dtype=torch.long), tile={**cp.kwargs, **opts})
            triton_ops.norm_gate_up_silu(x1, res1, g1, 1e-5, gate_up_w, None, tile={**cn.kwargs, **opts})
        for window in (None, 256):
            # decode, split off and on
            b = 4
            meta = AttentionMetadata(list(range(b + 1)), torch.zeros(0, dtype=torch.long), bs,
                                     torch.randint(0, 4096, (b, 64)), [700] * b, torch.randint(0, 4096, (b, 64)),
                                     [300] * b)
            qd, pos = torch.randn(b, h, d, dtype=dtype), torch.full((b,), 999)
            for splits in (1, 4):
                attention.paged_attention(qd, cache, cache, pos, meta, d ** -0.5, window, num_splits=splits)
            attention.paged_attention(qd, cache, cache, pos, meta, d ** -0.5, window, num_splits=4, fused_reduce=True)
            # prefill
            meta = AttentionMetadata([0, 300, 600], torch.zeros(0, dtype=torch.long), bs,
                                     torch.randint(0, 4096, (2, 64)), [300, 500], None, None)
            attention.paged_attention(torch.randn(600, h, d, dtype=dtype), cache, cache,
                                      torch.cat([torch.arange(300), torch.arange(200, 500)]), meta, d ** -0.5,
                                      window)
    arch = f"sm_{args.arch}a" if args.arch == 90 else f"sm_{args.arch}"
    vector_loads = re.compile(r"ld\.global(?:\.\w+)*\.v4")
    async_copies = re.compile(r"cp\.async\.\w+\.shared\.global[^;]*, (?:16|0x10)\b")
    print(f"triton {triton.__version__}, target {arch}, heads {h}/{hkv}, head_dim {d}, KV cache {args.kv_cache_dtype}")
    print("| dtype | kernel | constexprs | warps/stages | shared B | regs | spill B | 16B loads | 16B async copies "
          "| mma |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, kname, consts, options, compiled in results:
        ptx = compiled.asm["ptx"]
        regs, spill = ptxas_report(ptx, arch, args.arch)
        mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
        consts = " ".join(f"{k}={v}" for k, v in consts.items())
        print(f"| {label} | {kname} | {consts} | {options.num_warps}/{options.num_stages} | {compiled.metadata.shared} "
              f"| {regs} | {spill} | {len(vector_loads.findall(ptx))} | {len(async_copies.findall(ptx))} | {mma} |")

if __name__ == "__main__":
    main()

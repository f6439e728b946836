"""The panel GEMM against MKL on the unpacked weight, by rows: where `ops.linear`'s
`DENSE_FROM_ROWS` thresholds come from.

    .venv/bin/python benchmarks/cpu_panel_vs_mkl.py [--threads 2] [--calls 9]

For the llama-100m projection shapes (qkv 768->2304, o 768->768, gate/up 768->4096, down
2048->768) and float32 panels, then a 768->4096 weight in bfloat16 and int8 panels: the median of
`--calls` alternating calls of `packed_linear` and of `F.linear` on `PackedWeight.unpack()` (the
unpacking counted), at 256 to 2048 rows. Prints the speed of unpack + MKL over the panels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lengthwise.argtypes import positive_int
from lengthwise.model.quantize import quantize_int8
from lengthwise.ops.cpu import pack_panels, packed_linear


def median_seconds(fn, calls: int) -> float:  # noqa: ANN001 (a callable)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--calls", type=positive_int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cases = [(f"float32 {k}->{n}", pack_panels(0.02 * torch.randn(n, k, generator=g)))
             for n, k in [(2304, 768), (768, 768), (4096, 768), (768, 2048)]]
    w = 0.02 * torch.randn(4096, 768, generator=g)
    q = quantize_int8(w)
    cases += [("bfloat16 768->4096", pack_panels(w.bfloat16())), ("int8 768->4096", pack_panels(q.q, q.scales))]
    print("| weight | rows | panels GFLOP/s | unpack + MKL GFLOP/s | unpack + MKL speed-up |")
    print("|---|---|---|---|---|")
    for name, packed in cases:
        for m in (256, 512, 1024, 2048):
            x = torch.randn(m, packed.k, generator=g)
            packed_linear(x, packed), F.linear(x, packed.unpack())  # warm-up
            panels, dense = [], []
            for _ in range(args.calls):  # alternating, so drift hits both alike
                panels.append(median_seconds(lambda: packed_linear(x, packed), 1))  # noqa: B023
                dense.append(median_seconds(lambda: F.linear(x, packed.unpack()), 1))  # noqa: B023
            a, b = statistics.median(panels), statistics.median(dense)
            flops = 2 * m * packed.n * packed.k
            print(f"| {name} | {m} | {flops / a / 1e9:.0f} | {flops / b / 1e9:.0f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""`lengthwise bench kernels`: the decoder's kernels and whole decode steps against measured ceilings.

    lengthwise bench kernels --model llama-100m --device cpu --dtype float32 --json kernels.json
    lengthwise bench kernels --model llama-1b --device cuda --dtype bfloat16 --compare-transformers --check

Measures, in one process:

- the ceilings, at the start and again at the end (the higher of each counts for the whole steps):
  device copy bandwidth (read + write bytes, median of 5) and the dense matmul rate
  (square products in the model's dtype, best of several; on a CPU in float32 the faster of torch's
  BLAS and the fused path's own GEMM);
- every op of one decoder layer (QKV, RoPE + KV write, segment attention, O, norm + residual,
  gate-up, SiLU-and-mul, down) and the LM head, at batch 1 and batch 64 decode, each as time,
  achieved GB/s and GFLOP/s and the fraction of its roofline time max(bytes / bandwidth,
  FLOPs / matmul rate);
- the whole engine: one request decoding alone (`decode_b1_ms`, first token to last, through
  `LLM.generate`: scheduler, CUDA graph replay, sampler and all) against the weight-read bound
  (`roofline_b1_ms`), and 64 requests decoding together (`b64_gflops` = the model's matmul FLOPs
  per step / step time), in `--rounds` rounds, each divided by the matmul rate measured just before
  and after it (the higher), the median round reported (`b64_rounds` lists them all); with CUDA
  graphs, `decode_b1_sync_ms` is the same batch-1 decode without async decode (the A/B), and
  `forward_b1_ms` the batch-1 graph replayed alone;
- at batch 1 on the Triton path, the fused single-row kernels beside the ops they replace;
- with `--compare-transformers`, transformers' eager `generate` at batch 1 in the same process;
- with `--check`, the logits after a few prompts against transformers' and the greedy tokens of
  the default kernels against the torch reference path.

Writes a table, `--json FILE` (keys `device`, `decode_b1_ms`, `roofline_b1_ms`,
`roofline_fraction_b1`, `b64_gflops`, `matmul_peak_gflops`, `copy_bandwidth_gbs`, `kernels`, ...)
and a PNG of each kernel's fraction of its roofline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lengthwise.argtypes import add_precision_arguments, output_file, positive_int

B1_CONTEXT = 256      # cached tokens per row in the per-kernel attention timings
DECODE_TOKENS = 128   # tokens the engine decodes per request in the whole-step timings
PROMPT_TOKENS = 64
B1_REPEATS = 3        # batch-1 timings, both sides: the best of this many runs after a warm-up


def add_subcommand(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("kernels", help="kernel and decode-step timings against the roofline",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-100m", help="checkpoint directory or preset (default llama-100m)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32 or bfloat16 (default float32)")
    add_precision_arguments(p)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch threads on the CPU")
    p.add_argument("--batch", type=positive_int, default=64, help="the large decode batch (default 64)")
    p.add_argument("--compare-transformers", action="store_true",
                   help="also time transformers' eager generate at batch 1")
    p.add_argument("--check", action="store_true",
                   help="logits vs transformers and greedy tokens vs the torch reference kernels")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="large-batch rounds, each against the matmul rate measured beside it; the median "
                        "round is reported (default 3)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (an A/B run)")
    p.add_argument("--json", type=output_file, default="kernels.json", help="JSON report path (default kernels.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.set_defaults(func=main)


# -- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2, warmup: int = 3,
            graph: bool = True) -> float:
    """Median milliseconds per call of `fn` over repeated batches of calls lasting `min_time_s`.

    On a GPU with `graph`, the device time of one call instead: see `_graph_time_ms` (for the
    small kernels of a decode step, whose launch takes longer than their work)."""
    if device.type == "cuda" and graph:
        return _graph_time_ms(fn, device)
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, min(1000, int(min_time_s / 5 / once)))
    samples = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / reps)
    return sorted(samples)[2] * 1e3


def _graph_time_ms(fn: Callable[[], object], device: torch.device, inner: int = 20) -> float:
    """Device milliseconds of one call of `fn`, launch overhead excluded and L2 cold: `fn` is captured
    `inner` times into a CUDA graph, each call after a write of 256 MiB that evicts the L2 (whose
    50 MB would otherwise hold a small layer's weights); a graph of the writes alone is subtracted."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    fn()  # compiles kernels and builds per-step metadata before capture
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                flush.zero_()
                if with_fn:
                    fn()
        return g

    graphs = {True: capture(True), False: capture(False)}

    def replay_ms(g: torch.cuda.CUDAGraph) -> float:
        g.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(5):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return sorted(samples)[2]

    return max(replay_ms(graphs[True]) - replay_ms(graphs[False]), 1e-6) / inner


def copy_bandwidth_gbs(device: torch.device) -> float:
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 29)
    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, min_time_s=0.5, graph=False)
    return 2 * nbytes / ms / 1e6


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matmul rate: the faster of torch's square product and, on a CPU in
    float32, the fused decode path's own panel GEMM on the same shape. The best rate anything here
    reaches is the ceiling; torch's BLAS alone understates it on some hosts (on an AMD EPYC host
    MKL's square product ran at 210-220 GFLOP/s while the panel GEMM ran the model's projections
    at 460)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    min_time_s = 0.5 if device.type == "cuda" else 1.0
    ms = time_ms(lambda: a @ b, device, min_time_s=min_time_s, graph=False)
    if device.type == "cpu" and dtype == torch.float32:
        from lengthwise.ops import cpu as cpu_kernels

        if cpu_kernels.segment_attention_kernel() is not None:
            panels = cpu_kernels.pack_panels(b.t().contiguous())
            ms = min(ms, time_ms(lambda: cpu_kernels.packed_linear(a, panels), device, min_time_s=min_time_s,
                                 graph=False))
    return 2 * n ** 3 / ms / 1e6


# -- per-kernel --------------------------------------------------------------------------------

def kernel_rows(model: Any, batch: int, bandwidth_gbs: float, peak_gflops: float,
                kv_dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Time each op of layer 0 and the LM head on a `batch`-row decode step with `B1_CONTEXT`
    cached tokens per row (through the same dispatch the model uses), the KV cache in `kv_dtype`
    (default: the model's)."""
    import torch.nn.functional as F

    from lengthwise.ops import AttentionMetadata, paged_attention, rms_norm, rotary_cos_sin, silu_and_mul
    from lengthwise.ops import cpu as cpu_kernels
    from lengthwise.ops import linear as dispatched_linear
    from lengthwise.ops.dispatch import use_triton
    from lengthwise.ops.fused import fused_single_row, norm_gate_up_silu, norm_qkv_rotary_write
    from lengthwise.ops.int4 import PackedInt4
    from lengthwise.ops.rotary import rotary_and_write_kv

    c, dev, dt = model.config, model.device, model.dtype
    layer = model.layers[0]
    sparse = next((lay for lay in model.layers if lay.moe is not None), None)  # the first sparse layer
    isz = torch.empty((), dtype=dt).element_size()
    bs = 16
    blocks = -(-B1_CONTEXT // bs)
    cache = model.new_kv_cache(batch * blocks + 1, bs, kv_dtype)
    k_cache, v_cache = cache.k[0], cache.v[0]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(batch * blocks, generator=g).view(batch, blocks).to(dev)
    meta = AttentionMetadata(list(range(batch + 1)), (perm[:, -1].long() * bs + (B1_CONTEXT - 1) % bs), bs,
                             perm.int(), [B1_CONTEXT] * batch)
    positions = torch.full((batch,), B1_CONTEXT - 1, dtype=torch.long, device=dev)
    cos, sin = rotary_cos_sin(positions, model.inv_freq, dt)
    h = c.hidden_size
    x = torch.randn(batch, h, device=dev, dtype=dt)
    res = torch.randn_like(x)
    qkv = F.linear(x, cpu_kernels.dense(layer.qkv_weight).to(dt))
    q, k, v = qkv.split((c.q_size, c.kv_size, c.kv_size), dim=-1)
    q = q.reshape(batch, c.num_heads, c.head_dim)
    k = k.reshape(batch, c.num_kv_heads, c.head_dim)
    v = v.reshape(batch, c.num_kv_heads, c.head_dim)
    attn = torch.randn(batch, c.q_size, device=dev, dtype=dt)
    gate_up = torch.randn(batch, 2 * c.intermediate_size, device=dev, dtype=dt)
    act = torch.randn(batch, c.intermediate_size, device=dev, dtype=dt)
    kv_isz = k_cache.element_size()
    kv_bytes = 2 * batch * B1_CONTEXT * c.kv_size * kv_isz
    attn_flops = 4 * batch * B1_CONTEXT * c.num_heads * c.head_dim

    def linear(name: str, w: Any, inp: torch.Tensor) -> list[tuple]:
        """The dispatched op on dense weights in the model's dtype and, where a row takes the Triton
        GEMV, plain `F.linear` beside it; on the CPU, the fused path's GEMM on the panels decode
        steps really read (the model's own where it is packed: bfloat16 or int8 ones cost their bytes)."""
        dense_w = cpu_kernels.dense(w).to(dt)
        n, kdim = dense_w.shape
        flops = 2 * batch * n * kdim
        cost = ((n * kdim + batch * (n + kdim)) * isz, flops)
        rows = [(name, lambda: dispatched_linear(inp, dense_w), *cost)]
        if isinstance(w, PackedInt4):  # what the model really runs: the W4A16 kernel on its 4-bit weight
            rows.append((f"{name} (4-bit)", lambda: dispatched_linear(inp, w), w.nbytes + batch * (n + kdim) * isz,
                         flops))
        if batch == 1 and use_triton(inp):
            rows.append((f"{name} (F.linear)", lambda: F.linear(inp, dense_w), *cost))
        if dev.type == "cpu" and dt == torch.float32 and cpu_kernels.segment_attention_kernel() is not None:
            panels = w if isinstance(w, (cpu_kernels.PackedWeight, tuple)) else cpu_kernels.pack_panels(dense_w)
            panels = panels if isinstance(panels, tuple) else (panels,)
            nbytes = sum(p.nbytes for p in panels) + batch * (n + kdim) * isz
            rows.append((f"{name} (fused-path GEMM)",
                         lambda: [cpu_kernels.packed_linear(inp, p) for p in panels], nbytes, flops))
        return rows

    ops = [
        ("rms_norm+residual", lambda: rms_norm(x, layer.input_norm, c.rms_norm_eps, res), 5 * batch * h * isz,
         4 * batch * h),
        *linear("qkv_proj", layer.qkv_weight, x),
        ("rotary+write_kv", lambda: rotary_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping),
         (2 * c.q_size + 2 * c.kv_size + 2 * c.head_dim) * batch * isz + 2 * batch * c.kv_size * kv_isz,
         6 * batch * (c.q_size + c.kv_size)),
        (f"attention ctx {B1_CONTEXT}", lambda: paged_attention(q, k_cache, v_cache, positions, meta,
                                                                 layer.scale, None),
         kv_bytes + 2 * batch * c.q_size * isz, attn_flops),
        *linear("o_proj", layer.o_weight, attn),
        *([] if layer.moe is not None else [  # (a dense layer 0 of a sparse model too)
            *linear("gate_up_proj", layer.gate_up_weight, x),
            ("silu_and_mul", lambda: silu_and_mul(gate_up), 3 * batch * c.intermediate_size * isz,
             5 * batch * c.intermediate_size),
            *linear("down_proj", layer.down_weight, act)]),
        *(moe_rows(sparse, x, res, isz) if sparse is not None else []),
        *linear("lm_head", model.lm_head if model.head_panels is None else model.head_panels, x),
    ]
    # What a batch-1 layer really runs in place of the norm, QKV, RoPE, gate-up and SiLU rows above
    # (each block where its weight takes the fused kernel: not a 4-bit one).
    qkv_n, inter = c.q_size + 2 * c.kv_size, c.intermediate_size
    if fused_single_row(x, layer.qkv_weight) and layer.moe is None:
        ops.append(("norm+qkv_proj+rotary+write_kv (fused)", lambda: norm_qkv_rotary_write(
            x, res, layer.input_norm, c.rms_norm_eps, layer.qkv_weight, layer.qkv_bias, cos, sin, k_cache,
            v_cache, meta.slot_mapping), (qkv_n * h + 4 * h + qkv_n) * isz, 2 * qkv_n * h))
    if fused_single_row(x, layer.gate_up_weight) and layer.moe is None:
        ops.append(("norm+gate_up_proj+silu (fused)", lambda: norm_gate_up_silu(
            x, res, layer.post_attn_norm, c.rms_norm_eps, layer.gate_up_weight, layer.gate_up_bias),
            (2 * inter * h + 4 * h + inter) * isz, 4 * inter * h))
    rows = []
    with torch.inference_mode():
        for name, fn, nbytes, flops in ops:
            ms = time_ms(fn, dev)
            bound_ms = max(nbytes / bandwidth_gbs / 1e6, flops / peak_gflops / 1e6)
            rows.append({"kernel": name, "batch": batch, "ms": round(ms, 4), "bytes": int(nbytes), "flops": int(flops),
                         "gb_s": round(nbytes / ms / 1e6, 3), "gflops": round(flops / ms / 1e6, 3),
                         "bound": "memory" if nbytes / bandwidth_gbs >= flops / peak_gflops else "compute",
                         "fraction_of_roofline": round(bound_ms / ms, 5)})
    return rows


def moe_rows(layer: Any, x: torch.Tensor, res: torch.Tensor, isz: int) -> list[tuple]:
    """A sparse layer's MLP as one row (norm, router, top-k routing, the chosen experts; a shared
    expert too), op by op: its bytes are the router and the distinct experts the batch can pick at
    most, min(E, rows x k), so the fraction is a lower bound when rows share experts."""
    moe, h = layer.moe, x.shape[1]
    inter, batch = moe.expert_intermediate_size, x.shape[0]
    shared = moe.shared_expert_intermediate_size
    nbytes = (moe.num_experts * h + min(moe.num_experts, batch * moe.top_k) * 3 * h * inter
              + 3 * h * shared) * isz
    flops = 2 * batch * (moe.num_experts * h + moe.top_k * 3 * h * inter + 3 * h * shared)
    return [("moe (norm+router+top-k experts)", lambda: layer._sparse_mlp(x, res), nbytes, flops)]


# -- whole steps -------------------------------------------------------------------------------

def step_flops_per_row(config: Any, context: int) -> float:
    """Matmul FLOPs of one decode row: every weight matrix it multiplies (LM head included; of a
    sparse layer the router and the top-k experts, and a shared expert) and the attention."""
    c, h = config, config.hidden_size
    weights = c.vocab_size * h
    for i in range(c.num_layers):
        weights += h * (c.q_size + 2 * c.kv_size) + c.q_size * h
        if c.moe is not None and c.moe.sparse_layers[i]:
            m = c.moe
            weights += m.num_experts * h + 3 * h * (m.top_k * m.expert_intermediate_size
                                                   + m.shared_expert_intermediate_size)
        else:
            weights += 3 * h * c.intermediate_size
    return 2 * weights + c.num_layers * 4 * context * c.num_heads * c.head_dim


def _prompts(n: int, vocab: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, min(vocab, 30000), (n, length), generator=g).tolist()


def engine_decode(llm: Any, batch: int) -> dict[str, float]:
    """Steady-state decode of `batch` requests together through the engine: ms per step."""
    from lengthwise import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    for p in _prompts(batch, engine.model.config.vocab_size, PROMPT_TOKENS):
        engine.add_request(p, params)
    while any(r.first_token_time is None for r in engine.requests.values()):
        engine.step()
    dev = engine.model.device
    _sync(dev)
    steps = 0
    t0 = time.perf_counter()
    while steps < DECODE_TOKENS // 2:
        engine.step()
        steps += 1
    _sync(dev)
    ms = (time.perf_counter() - t0) / steps * 1e3
    while engine.has_unfinished_requests():
        engine.step()
    for rid in list(engine.requests):
        engine.requests.pop(rid)
    return {"step_ms": ms, "context": PROMPT_TOKENS + DECODE_TOKENS * 3 // 4}


def decode_forward_fn(engine: Any, rows: int, context: int) -> Callable[[], torch.Tensor]:
    """One decode forward pass (LM head included) of `rows` rows, each with `context - 1` tokens
    cached, on `engine`'s model and cache, as a function to time (no scheduler around it)."""
    from lengthwise.ops import AttentionMetadata

    model, cache, bs = engine.model, engine.runner.cache, engine.runner.block_size
    per_row = -(-context // bs)
    tables = torch.tensor([list(range(r * per_row, (r + 1) * per_row)) for r in range(rows)], dtype=torch.int32)
    ids, pos = torch.full((rows,), 5), torch.full((rows,), context - 1)
    slots = tables[:, (context - 1) // bs].long() * bs + (context - 1) % bs

    def step() -> torch.Tensor:
        meta = AttentionMetadata(list(range(rows + 1)), slots, bs, tables, [context] * rows)
        return model.compute_logits(model(ids, pos, meta, cache))
    return step


def best_of_ms(fn: Callable[[], object], repeats: int = 3, calls: int = 5) -> float:
    """The best of `repeats` averages over `calls` calls of `fn`, after a warm-up, in ms (CPU)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def decode_b1_ms(llm: Any) -> float:
    from lengthwise import SamplingParams

    prompt = _prompts(1, llm.engine.model.config.vocab_size, PROMPT_TOKENS)
    # No text: transformers' side is timed without decoding text either.
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompt, params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(B1_REPEATS):
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        m = out.metrics
        best = min(best, (m.finish_time - m.first_token_time) / (len(out.outputs[0].token_ids) - 1) * 1e3)
    return best


def forward_b1_ms(llm: Any) -> float:
    """One batch-1 decode forward pass (LM head included) without the engine around it: the CUDA
    graph's replay on a GPU, the eager forward on the CPU; context `PROMPT_TOKENS` tokens."""
    from lengthwise.engine.cuda_graph import DecodeRows

    engine = llm.engine
    runner, dev = engine.runner, engine.model.device
    bs = runner.block_size
    blocks = list(range(-(-PROMPT_TOKENS // bs)))
    rows = DecodeRows([5], [PROMPT_TOKENS - 1], [PROMPT_TOKENS - 1], [blocks], [PROMPT_TOKENS], [[]], [0])
    if runner.graphs is not None:
        runner.graphs.run(rows)
        return _replay_ms(runner.graphs._graphs[1], dev)
    from lengthwise.ops import AttentionMetadata

    meta = AttentionMetadata([0, 1], torch.tensor(rows.slots, device=dev), bs,
                             torch.tensor([blocks], dtype=torch.int32, device=dev), [PROMPT_TOKENS])
    ids, pos = torch.tensor([5], device=dev), torch.tensor([PROMPT_TOKENS - 1], device=dev)
    model = engine.model
    return time_ms(lambda: model.compute_logits(model(ids, pos, meta, runner.cache)), dev, min_time_s=0.5)


def _replay_ms(graph: Any, device: torch.device, reps: int = 50) -> float:
    graph.replay()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps * 1e3


def transformers_b1_ms(model_dir: Path, device: str, dtype: str) -> float:
    """transformers' eager `generate`, batch 1, greedy: ms per token after the first."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    # No end token, as on our side (ignore_eos) and in `bench throughput`'s baseline: with one,
    # generate() checks every step for it, and min_new_tokens masks it out of the logits.
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(_prompts(1, hf.config.vocab_size, PROMPT_TOKENS), device=device)
    dev = torch.device(device)

    def run(n: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
        _sync(dev)
        return time.perf_counter() - t0

    run(8)  # warm-up
    best = min(run(DECODE_TOKENS + 1) - run(1) for _ in range(B1_REPEATS))
    return best / DECODE_TOKENS * 1e3


def check_outputs(llm: Any, model_dir: Path, device: str, dtype: str) -> dict[str, Any]:
    """Logits after 4 prompts vs transformers; greedy tokens vs the torch reference kernels."""
    from transformers import AutoModelForCausalLM

    from lengthwise import SamplingParams
    from lengthwise.engine import prompt_logits
    from lengthwise.ops.dispatch import KERNELS_ENV

    model = llm.engine.model
    prompts = [p[:n] for p, n in zip(_prompts(4, model.config.vocab_size, 200), (7, 33, 120, 200), strict=True)]
    ours = prompt_logits(model, prompts).float().cpu()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    with torch.inference_mode():
        ref = torch.stack([hf(torch.tensor([p], device=device)).logits[0, -1].float() for p in prompts]).cpu()
    del hf
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=5)
    got = llm.generate(prompts, params, use_tqdm=False)
    old = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = "torch"
    try:
        ref_llm_outs = _reference_generate(llm, prompts, params)
    finally:
        if old is None:
            os.environ.pop(KERNELS_ENV)
        else:
            os.environ[KERNELS_ENV] = old
    equal, near = 0, 0
    for o, r in zip(got, ref_llm_outs, strict=True):
        a, b = o.outputs[0], r.outputs[0]
        if a.token_ids == b.token_ids:
            equal += 1
            continue
        # Where the two first differ, each pick must be among the other's top 5 (a near tie).
        i = next(j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y)
        if a.token_ids[i] in [t for t, _ in b.logprobs[i].top] and b.token_ids[i] in [t for t, _ in a.logprobs[i].top]:
            near += 1
    return {"logits_max_rel_err_vs_transformers": rel, "prompts": len(prompts),
            "greedy_equal_to_torch_reference": equal, "greedy_diverge_at_near_tie": near,
            "greedy_tokens": params.max_tokens}


def _reference_generate(llm: Any, prompts: list[list[int]], params: Any) -> list[Any]:
    """The same model through a second engine on the torch reference kernels, no CUDA graphs."""
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm import run_to_completion
    from lengthwise.engine.llm_engine import LLMEngine

    c = llm.engine.config
    engine = LLMEngine(llm.engine.model, llm.engine.tokenizer, EngineConfig(
        max_num_seqs=len(prompts), max_model_len=c.max_model_len, kv_cache_memory=c.kv_cache_memory,
        kv_cache_dtype=c.kv_cache_dtype, enforce_eager=True))
    return run_to_completion(engine, prompts, [params] * len(prompts))


def streamed_weight_bytes(model_dir: Path, model: Any) -> tuple[int, str]:
    """Bytes of weights a batch-1 decode step reads, and in what form: the fused CPU path's packed
    panels where it ran (a bfloat16 checkpoint's weights stream as bfloat16, quantized ones as int8
    or 4-bit values and their scales), else every weight in the model's dtype but the W4A16
    kernel's 4-bit projections (their values, scales, zeros and groups)."""
    from lengthwise.bench.engines import decode_weight_bytes
    from lengthwise.ops.cpu import INT4
    from lengthwise.ops.int4 import PackedInt4

    dense = decode_weight_bytes(model_dir, model.dtype.itemsize)
    ptrs = getattr(model, "_cpu_decode_pointers", None)
    if ptrs is None:
        form = str(model.dtype).removeprefix("torch.")
        int4 = [w for layer in model.layers for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight,
                                                      layer.down_weight) if isinstance(w, PackedInt4)]
        if int4:  # (the W4A16 kernel's projections: their packed bytes in place of the dense ones)
            dense -= sum(w.n * w.k * model.dtype.itemsize - w.nbytes for w in int4)
            form += f", {len(int4)} projections int4"
        return dense, form
    c = model.config
    small = (c.num_layers * (2 * c.hidden_size + 2 * c.head_dim * c.qk_norm) + c.hidden_size) * 4  # norms
    def name(dtype: torch.dtype) -> str:
        return "int4" if dtype == INT4 else str(dtype).removeprefix("torch.")

    dtypes = [name(p.dtype) for p in ptrs.keep]
    head = name(ptrs.lm_head.dtype)
    # a sparse layer's token reads top_k of its num_experts experts
    idle = ptrs.expert_bytes * (1 - c.moe.top_k / c.moe.num_experts) if c.moe else 0
    return int(ptrs.weight_bytes - idle) + small, f"panels: {'/'.join(sorted(set(dtypes)))}, LM head {head}"


# -- report ------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    from lengthwise.bench.presets import resolve_model
    from lengthwise.engine.llm import LLM
    from lengthwise.model.config import ModelConfig
    from lengthwise.model.loader import resolve_device

    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)  # a clear error before the preset is written when there is no GPU
    model_dir, label = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth_gbs(dev)
    peak = matmul_peak_gflops(dev, dtype)
    print(f"[kernels] copy {bandwidth:.1f} GB/s, {args.dtype} matmul {peak:.0f} GFLOP/s", flush=True)
    # Contexts here stay under 400 tokens; a short max_model_len keeps the cache (and, on a GPU,
    # room for transformers beside it) small.
    context = min(1024, ModelConfig.from_dir(model_dir).max_position_embeddings)
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_num_seqs=max(args.batch, 4), max_model_len=context,
              kv_cache_memory=0.25 if dev.type == "cuda" else None, enforce_eager=args.enforce_eager,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    model = llm.engine.model
    kv_dtype = llm.engine.kv_cache_dtype
    kernels = [*kernel_rows(model, 1, bandwidth, peak, kv_dtype), *kernel_rows(model, args.batch, bandwidth, peak,
                                                                              kv_dtype)]
    graphs = llm.engine.runner.graphs
    launched, used = (graphs.launched_ahead, graphs.used_ahead) if graphs is not None else (0, 0)
    b1 = decode_b1_ms(llm)
    weight_bytes, weight_format = streamed_weight_bytes(model_dir, model)
    ahead: dict[str, Any] = {}
    if graphs is not None:  # the A/B: the same decode with every step launched after the last one's read-back
        ahead = {"b1_steps_launched_ahead": graphs.launched_ahead - launched,
                 "b1_steps_used_as_launched": graphs.used_ahead - used}
        config = llm.engine.config
        llm.engine.config = dataclasses.replace(config, async_decode=False)
        ahead["decode_b1_sync_ms"] = round(decode_b1_ms(llm), 4)
        llm.engine.config = config
    forward = forward_b1_ms(llm)
    # The large batch in rounds, each paired with the matmul rate measured just before and just
    # after it (the higher counts): on a shared host that rate moves by 1.5x within a minute, so a
    # fraction against a ceiling measured a minute earlier says more about the host than the step.
    rate = [matmul_peak_gflops(dev, dtype)]
    rounds = []
    for _ in range(args.rounds):
        big = engine_decode(llm, args.batch)
        rate.append(matmul_peak_gflops(dev, dtype))
        gflops = args.batch * step_flops_per_row(model.config, big["context"]) / big["step_ms"] / 1e6
        ceiling = max(rate[-2:])
        rounds.append({"step_ms": round(big["step_ms"], 3), "gflops": round(gflops, 1),
                       "matmul_gflops": round(ceiling, 1), "fraction": round(gflops / ceiling, 4)})
    median = sorted(rounds, key=lambda r: r["fraction"])[len(rounds) // 2]
    # Ceilings again at the end: a shared machine's neighbours only ever lower a measurement, so
    # the higher of the two is the ceiling (and the fractions below the conservative ones).
    bandwidth_samples = [round(bandwidth, 1), round(copy_bandwidth_gbs(dev), 1)]
    peak_samples = [round(peak, 1)] + [round(r, 1) for r in rate]  # the last one is taken after every step
    bandwidth, peak = max(bandwidth_samples), max(peak_samples)
    print(f"[kernels] ceilings again: copy {bandwidth_samples[1]:.1f} GB/s, matmul {peak_samples[-1]:.0f} GFLOP/s",
          flush=True)
    roof = weight_bytes / bandwidth / 1e6
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({args.threads} threads)",
        "model": label, "dtype": args.dtype, "quantization": args.quantization,
        "kv_cache_dtype": str(llm.engine.kv_cache_dtype).removeprefix("torch."),
        "cuda_graphs": llm.engine.runner.graphs is not None,
        "decode_b1_ms": round(b1, 4), "roofline_b1_ms": round(roof, 4), "roofline_fraction_b1": round(roof / b1, 4),
        "forward_b1_ms": round(forward, 4), "roofline_fraction_forward_b1": round(roof / forward, 4), **ahead,
        "weight_bytes": weight_bytes, "weight_format": weight_format, "b64_batch": args.batch,
        "b64_step_ms": median["step_ms"],
        "b64_gflops": median["gflops"], "b64_fraction_of_matmul_peak": median["fraction"], "b64_rounds": rounds,
        "matmul_peak_gflops": round(peak, 1), "copy_bandwidth_gbs": round(bandwidth, 1),
        "matmul_peak_gflops_samples": peak_samples, "copy_bandwidth_gbs_samples": bandwidth_samples,
        "versions": {"torch": torch.__version__}, "kernels": kernels,
    }
    if args.compare_transformers:
        hf_ms = transformers_b1_ms(model_dir, args.device, args.dtype)
        report["transformers_b1_ms"] = round(hf_ms, 4)
        report["speedup_b1_vs_transformers"] = round(hf_ms / b1, 2)
    if args.check:
        report["check"] = check_outputs(llm, model_dir, args.device, args.dtype)
    return report


def format_report(r: dict[str, Any]) -> str:
    quant = f", {r['quantization']} weights" if r.get("quantization") else ""
    if r.get("kv_cache_dtype", r["dtype"]) != r["dtype"]:
        quant += f", {r['kv_cache_dtype']} KV cache"
    lines = [f"lengthwise bench kernels: {r['model']} ({r['dtype']}{quant}) on {r['device']}, "
             f"CUDA graphs {'on' if r['cuda_graphs'] else 'off'}",
             f"ceilings: copy {r['copy_bandwidth_gbs']} GB/s, matmul {r['matmul_peak_gflops']} GFLOP/s", "",
             f"{'kernel':<26} {'batch':>5} {'us':>9} {'GB/s':>8} {'GFLOP/s':>9} {'bound':>8} {'of roofline':>11}"]
    for k in r["kernels"]:
        lines.append(f"{k['kernel']:<26} {k['batch']:>5} {k['ms'] * 1e3:>9.1f} {k['gb_s']:>8.1f} {k['gflops']:>9.1f} "
                     f"{k['bound']:>8} {k['fraction_of_roofline']:>10.1%}")
    lines += ["", f"decode batch 1 (engine, per token): {r['decode_b1_ms']:.3f} ms; weight-read bound "
              f"{r['roofline_b1_ms']:.3f} ms ({r['weight_bytes'] / 1e6:.1f} MB as {r.get('weight_format', '?')}) = "
              f"{r['roofline_fraction_b1']:.1%} of the roofline",
              *([f"decode batch 1 without async decode: {r['decode_b1_sync_ms']:.3f} ms; with it, "
                 f"{r['b1_steps_used_as_launched']} of {r['b1_steps_launched_ahead']} steps launched ahead were used"]
                if "decode_b1_sync_ms" in r else []),
              f"decode batch 1 forward alone{'' if str(r['device']).startswith('cpu') else ' (graph replay)'}: "
              f"{r['forward_b1_ms']:.3f} ms = "
              f"{r['roofline_fraction_forward_b1']:.1%} of the roofline",
              f"decode batch {r['b64_batch']} (engine, per step): {r['b64_step_ms']:.2f} ms = {r['b64_gflops']:.0f} "
              f"GFLOP/s = {r['b64_fraction_of_matmul_peak']:.1%} of the matmul rate (median round; rounds: "
              + ", ".join(f"{x['fraction']:.1%} at {x['matmul_gflops']:.0f}" for x in r.get("b64_rounds", [])) + ")"]
    if "transformers_b1_ms" in r:
        lines.append(f"transformers eager generate, batch 1: {r['transformers_b1_ms']:.3f} ms/token; lengthwise is "
                     f"{r['speedup_b1_vs_transformers']:.2f}x faster")
    if "check" in r:
        c = r["check"]
        lines.append(f"check: logits vs transformers max rel err {c['logits_max_rel_err_vs_transformers']:.2e}; "
                     f"greedy ({c['greedy_tokens']} tokens) equal to the torch reference for "
                     f"{c['greedy_equal_to_torch_reference']}/{c['prompts']} prompts, "
                     f"{c['greedy_diverge_at_near_tie']} diverge at a near tie (each pick in the other's top 5)")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> Path | None:
    from lengthwise.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    batches = sorted({k["batch"] for k in r["kernels"]})
    names = list(dict.fromkeys(k["kernel"] for k in r["kernels"]))
    frac = {(k["kernel"], k["batch"]): k["fraction_of_roofline"] for k in r["kernels"]}
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ax.bar([j + i * width for j in range(len(names))], [frac.get((n, b), 0.0) for n in names], width,
               label=f"batch {b}")
    ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("fraction of roofline")
    ax.set_title(f"{r['model']} {r['dtype']} on {r['device']}: b1 decode {r['roofline_fraction_b1']:.0%} of roofline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print(format_report(report))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = plot(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"[kernels] wrote {out}" + (f" and {png}" if png else ""))
    return 0

"""The engines under test, each run in a subprocess of its own: `python -m lengthwise.bench.engines SPEC OUT`.

A child reads the job (engine name, model, settings, token-id prompts and output lengths) from
the JSON file SPEC, sets the thread count, loads the model, runs a short warm-up, then times the
generation of the whole workload, and writes its measurements to the JSON file OUT. Its peak
resident memory (`ru_maxrss`) is therefore its own engine's, model and cache included.

Engines:
- `lengthwise`: `lengthwise.LLM.generate` on every request at once (continuous batching).
- `transformers`: `generate()` in static batches of `batch_size` requests taken in order, left
  padded, each batch decoding to the largest output length in it (the papers' baseline).
- `transformers-cb`: transformers' continuous batching (`init_continuous_batching`), one
  `add_request` per request with that request's own `max_new_tokens`.
- `roofline`: copy bandwidth and one lengthwise request decoded alone (no workload).

Every engine decodes greedily with EOS ignored, so request i yields exactly `output_lens[i]`
tokens; only those are counted as output tokens (a static batch's extra decode steps are not).
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOFLINE_TOKENS = 128
ROOFLINE_PROMPT_TOKENS = 32
TRANSFORMERS_ENGINES = ("transformers", "transformers-cb")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def kv_bytes_per_token(model_dir: str | Path, dtype_itemsize: int) -> int:
    """Bytes of keys and values one token occupies across all layers."""
    from lengthwise.model.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * dtype_itemsize


def decode_weight_bytes(model_dir: str | Path, dtype_itemsize: int) -> int:
    """Bytes of weights one batch-1 decode step must read: every layer (of a sparse layer the
    router and the experts one token picks), the final norm and the LM head. The input embedding
    is not counted unless tied to the LM head (a step reads one row of it)."""
    from lengthwise.model.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    h, q, kv = c.hidden_size, c.q_size, c.kv_size
    params = h + c.vocab_size * h
    for i in range(c.num_layers):
        params += (h * (q + 2 * kv) + q * h + 2 * h + (q + 2 * kv) * c.qkv_bias + h * c.o_bias
                   + 2 * c.head_dim * c.qk_norm)
        if c.moe is not None and c.moe.sparse_layers[i]:
            # the router, and at batch 1 only the experts the token picked (and a shared one)
            shared = c.moe.shared_expert_intermediate_size
            params += (c.moe.num_experts * h + 3 * h * c.moe.top_k * c.moe.expert_intermediate_size
                       + (3 * h * shared + h if shared else 0))
        else:
            params += 3 * h * c.intermediate_size + (2 * c.intermediate_size + h) * c.mlp_bias
    return params * dtype_itemsize


def _torch_setup(spec: dict[str, Any]):
    import torch

    torch.set_num_threads(spec["threads"])
    return torch


def output_digests(token_ids: list[list[int]], wanted: list[int]) -> list[str]:
    """A short hash of each request's first `wanted` generated ids, to compare engines' outputs request by request."""
    return [hashlib.sha1(json.dumps(list(ids[:n])).encode()).hexdigest()[:12]
            for ids, n in zip(token_ids, wanted, strict=True)]


def _count(engine_lens: list[int], wanted: list[int]) -> tuple[int, int]:
    """(output tokens counted, requests that got fewer tokens than asked)."""
    counted = sum(min(got, want) for got, want in zip(engine_lens, wanted, strict=True))
    short = sum(got < want for got, want in zip(engine_lens, wanted, strict=True))
    return counted, short


def _sampling_params(max_tokens: int):
    from lengthwise.sampling_params import SamplingParams

    # Token ids in, token ids out: no detokenizing, as for the transformers baselines.
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)


def run_lengthwise(spec: dict[str, Any]) -> dict[str, Any]:
    torch = _torch_setup(spec)
    from lengthwise.engine.llm import LLM

    itemsize = torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
    kv_bytes = spec["kv_cache_tokens"] * kv_bytes_per_token(spec["model_dir"], itemsize)
    llm = LLM(spec["model_dir"], dtype=spec["dtype"], device=spec["device"], kv_cache_memory=kv_bytes,
              max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"],
              block_size=spec["block_size"], policy=spec["policy"],
              enable_prefix_caching=spec.get("prefix_caching", True),
              speculative_config=spec.get("speculative_config"), kv_cache_dtype=spec.get("kv_cache_dtype", "auto"))
    prompts, lens = spec["prompts"], spec["output_lens"]
    if spec["warmup_prompts"]:
        llm.generate(spec["warmup_prompts"], _sampling_params(spec["warmup_tokens"]), use_tqdm=False)
    params = [_sampling_params(n) for n in lens]
    engine = llm.engine
    graphs = engine.runner.graphs

    def counters() -> tuple[int, int, int]:
        ahead = (graphs.launched_ahead, graphs.used_ahead) if graphs is not None else (0, 0)
        return engine.stats.sampling_steps, *ahead

    before = counters()
    _sync(torch, spec["device"])
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=spec["progress"])
    _sync(torch, spec["device"])
    elapsed = time.perf_counter() - t0
    got = [len(o.outputs[0].token_ids) for o in outs]
    counted, short = _count(got, lens)
    digests = output_digests([o.outputs[0].token_ids for o in outs], lens)
    preemptions = sum(o.metrics.num_preemptions for o in outs)
    steps, launched, used = (after - b for after, b in zip(counters(), before, strict=True))
    details = {"kv_cache_memory_bytes": kv_bytes, "kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
               "kv_cache_tokens_held": engine.num_blocks * engine.config.block_size, "policy": spec["policy"],
               "num_preemptions": preemptions, "sampling_steps": steps}
    if engine.stats.draft_tokens:  # speculative decoding (counted over warm-up and timed run)
        details |= {"draft_tokens": engine.stats.draft_tokens, "accepted_tokens": engine.stats.accepted_tokens}
    if graphs is not None:  # async decode: steps launched before the previous step's tokens were read
        details |= {"steps_launched_ahead": launched, "steps_used_as_launched": used}
    return {"elapsed_s": elapsed, "output_tokens": counted, "generated_tokens": sum(got), "short_requests": short,
            "output_digests": digests, "details": details}


def _load_hf(spec: dict[str, Any]):
    torch = _torch_setup(spec)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]))
    model = model.to(spec["device"]).eval()
    # EOS ignored: generate() merges the model's generation_config into any config passed, so the
    # model's own eos_token_id must go (a GenerationConfig(eos_token_id=None) argument is overridden).
    model.generation_config.eos_token_id = None
    return torch, model


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    torch, model = _load_hf(spec)
    from tqdm.auto import tqdm

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    prompts, lens, bs = spec["prompts"], spec["output_lens"], spec["batch_size"]
    device = spec["device"]

    def run_batch(seqs: list[list[int]], max_new: int) -> list[list[int]]:
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=None, pad_token_id=pad)
        return out[:, width:].tolist()

    if spec["warmup_prompts"]:
        run_batch(spec["warmup_prompts"], spec["warmup_tokens"])
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    tokens: list[list[int]] = [[] for _ in prompts]
    slots = 0
    bar = tqdm(total=len(prompts), desc="transformers", unit="req", disable=not spec["progress"], dynamic_ncols=True)
    _sync(torch, device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for idx in batches:
            rows = run_batch([prompts[i] for i in idx], max(lens[i] for i in idx))
            for i, row in zip(idx, rows, strict=True):
                tokens[i] = row
            slots += sum(len(row) for row in rows)
            bar.update(len(idx))
    _sync(torch, device)
    elapsed = time.perf_counter() - t0
    bar.close()
    counted, short = _count([len(t) for t in tokens], lens)
    return {"elapsed_s": elapsed, "output_tokens": counted, "generated_tokens": slots, "short_requests": short,
            "output_digests": output_digests(tokens, lens), "token_slots": slots, "details": {
                "batch_size": bs, "num_batches": len(batches), "padding": "left",
                "attn_implementation": model.config._attn_implementation,
                "effective_token_ratio": round(counted / slots, 4) if slots else None}}


def run_transformers_cb(spec: dict[str, Any]) -> dict[str, Any]:
    torch, model = _load_hf(spec)
    from tqdm.auto import tqdm
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    prompts, lens = spec["prompts"], spec["output_lens"]
    block = spec["block_size"]
    num_blocks = math.ceil(spec["kv_cache_tokens"] / block)
    # The cache is sized explicitly: left to itself, on CPU it takes 60% of (total RAM - RSS).
    # Cache settings live in ContinuousBatchingConfig in transformers 5.x (passing them through
    # GenerationConfig is deprecated); `page_size` is the block size in tokens, `num_blocks` counts
    # whole-model blocks of page_size tokens. With num_blocks given, max_memory_percent only gates a
    # footprint check against "available" memory (on CPU without psutil, the NUMA nodes' memory):
    # 1.0 so that an explicit cache the machine can hold is not refused.
    cb_config = ContinuousBatchingConfig(page_size=block, num_blocks=num_blocks,
                                         max_batch_tokens=spec["max_num_batched_tokens"],
                                         max_requests_per_batch=spec["max_num_seqs"], max_memory_percent=1.0,
                                         allow_block_sharing=spec.get("cb_prefix_sharing", True))
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=model.config.pad_token_id or 0,
                                  max_new_tokens=max(lens))
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.warmup()
    manager.start()
    try:
        def run(requests: list[tuple[list[int], int]], prefix: str, bar=None) -> dict[str, Any]:
            ids = [manager.add_request(p, request_id=f"{prefix}{k}", max_new_tokens=n, eos_token_id=-1)
                   for k, (p, n) in enumerate(requests)]
            results: dict[str, Any] = {}
            while len(results) < len(ids):
                r = manager.get_result(timeout=1)
                if r is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' continuous batching thread stopped before finishing")
                    continue
                if r.is_finished():
                    if r.error is not None:
                        raise RuntimeError(f"transformers' continuous batching failed request {r.request_id}: "
                                           f"{r.error}")
                    results[r.request_id] = r
                    if bar is not None:
                        bar.update(1)
            return {rid: results[rid] for rid in ids}

        if spec["warmup_prompts"]:
            run([(p, spec["warmup_tokens"]) for p in spec["warmup_prompts"]], "warmup-")
        bar = tqdm(total=len(prompts), desc="transformers-cb", unit="req", disable=not spec["progress"],
                   dynamic_ncols=True)
        _sync(torch, spec["device"])
        t0 = time.perf_counter()
        results = run(list(zip(prompts, lens, strict=True)), "req-", bar)
        _sync(torch, spec["device"])
        elapsed = time.perf_counter() - t0
        bar.close()
        resolved = manager.continuous_batching_config
    finally:
        manager.stop(block=True)
    got = [len(r.generated_tokens) for r in results.values()]
    counted, short = _count(got, lens)
    digests = output_digests([r.generated_tokens for r in results.values()], lens)
    details = {"per_request_max_new_tokens": True, "page_size": resolved.page_size,
               "num_blocks": resolved.num_blocks, "max_batch_tokens": resolved.max_batch_tokens,
               "max_requests_per_batch": resolved.max_requests_per_batch,
               "max_memory_percent": resolved.max_memory_percent,
               "allow_block_sharing": resolved.allow_block_sharing,
               "prefix_sharing_active": getattr(manager, "_use_prefix_sharing", None),
               "scheduler_type": resolved.scheduler_type, "attn_implementation": model.config._attn_implementation}
    return {"elapsed_s": elapsed, "output_tokens": counted, "generated_tokens": sum(got), "short_requests": short,
            "output_digests": digests, "details": details}


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 5) -> tuple[float, int]:
    """Best-of-`repeats` bandwidth of copying a large tensor into another, in bytes/s (read + write
    counted, as STREAM's copy). The destination is allocated once: a fresh `clone()` would time the
    operating system zeroing new pages, not the memory system."""
    import torch

    if nbytes is None:
        nbytes = 1 << 30 if device.startswith("cuda") else 1 << 29
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = math.inf
    for _ in range(repeats + 1):  # the first copy touches the pages
        _sync(torch, device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(torch, device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * x.element_size() / best, x.numel() * x.element_size()


def run_roofline(spec: dict[str, Any]) -> dict[str, Any]:
    torch = _torch_setup(spec)
    from lengthwise.engine.llm import LLM

    device = spec["device"]
    bandwidth, copy_bytes = copy_bandwidth(device, spec.get("roofline_copy_bytes"))
    itemsize = torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
    weight_bytes = decode_weight_bytes(spec["model_dir"], itemsize)
    llm = LLM(spec["model_dir"], dtype=spec["dtype"], device=device, max_num_seqs=1,
              max_num_batched_tokens=spec["max_num_batched_tokens"], block_size=spec["block_size"],
              policy=spec["policy"])
    prompt = spec["prompts"][0][:ROOFLINE_PROMPT_TOKENS]
    llm.generate([prompt], _sampling_params(8), use_tqdm=False)  # warm-up
    out = llm.generate([prompt], _sampling_params(ROOFLINE_TOKENS), use_tqdm=False)[0]
    n = len(out.outputs[0].token_ids)
    m = out.metrics
    decode_s = (m.finish_time - m.first_token_time) / max(n - 1, 1)
    bound_s = weight_bytes / bandwidth
    return {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 3), "copy_tensor_mb": copy_bytes / 2**20,
            "weight_bytes": weight_bytes, "prompt_tokens": len(prompt), "tokens": n,
            "decode_ms_per_token": round(decode_s * 1e3, 4), "bound_ms_per_token": round(bound_s * 1e3, 4),
            "achieved_weight_bandwidth_gb_s": round(weight_bytes / decode_s / 1e9, 3),
            "percent_of_roofline": round(100 * bound_s / decode_s, 2)}


def _sync(torch, device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


RUNNERS = {"lengthwise": run_lengthwise, "transformers": run_transformers, "transformers-cb": run_transformers_cb,
           "roofline": run_roofline}


def worker_main(argv: list[str]) -> int:
    """Child entry point: run the job in SPEC, write the result to OUT."""
    if len(argv) != 2:
        print("usage: python -m lengthwise.bench.engines SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    engine = spec["engine"]
    result = {"engine": engine, **RUNNERS[engine](spec), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if str(spec["device"]).startswith("cuda"):
        import torch

        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["threads"] = spec["threads"]
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))

"""`lengthwise bench throughput`: presets, workloads, the three engines end to end, CLI errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SHARED

from lengthwise.bench.engines import decode_weight_bytes, run_roofline, run_transformers
from lengthwise.bench.presets import PRESETS, preset_dir
from lengthwise.bench.report import build_report, format_roofline, format_table, plot, summarise
from lengthwise.bench.throughput import build_workload
from lengthwise.bench.workloads import alpaca_lengths, read_alpaca_lengths, synthetic
from lengthwise.cli import main
from lengthwise.model import load_model
from lengthwise.ops.cpu import dense
from lengthwise.tokenizer import Tokenizer

ALPACA_DEV = SHARED / "data" / "alpaca-lengths" / "dev.jsonl"
requires_alpaca = pytest.mark.skipif(not ALPACA_DEV.is_file(), reason=f"{ALPACA_DEV} is absent")
SCHEMA_KEYS = {"results", "speedup_vs_transformers", "speedup_vs_transformers_cb", "config"}
RESULT_KEYS = {"engine", "requests_per_s", "output_tokens_per_s", "peak_rss_mb"}


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def tiny_dir(bench_cache) -> Path:
    return preset_dir("llama-tiny", cache_dir=bench_cache)


def test_presets_have_the_issue_shapes():
    big = PRESETS["llama-100m"]
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads,
            big.intermediate_size, big.vocab_size, big.max_position_embeddings) == (768, 12, 12, 12, 2048, 32000, 2048)
    one_b = PRESETS["llama-1b"]  # Llama-3.2-1B's shape, stored in bfloat16
    assert (one_b.hidden_size, one_b.num_hidden_layers, one_b.num_attention_heads, one_b.num_key_value_heads,
            one_b.intermediate_size, one_b.vocab_size, one_b.tie_word_embeddings, one_b.rope_theta,
            one_b.dtype) == (2048, 16, 32, 8, 8192, 128256, True, 500000.0, "bfloat16")


def test_preset_loads_with_lengthwise_and_transformers(tiny_dir, bench_cache):
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (tiny_dir / name).is_file(), name
    lw = load_model(tiny_dir, "float32", "cpu")
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    assert 1e6 < n_params < 10e6  # "a few M params"
    assert lw.num_parameters() == n_params
    assert torch.equal(lw.embed, hf.model.embed_tokens.weight)
    attn = hf.model.layers[0].self_attn
    assert torch.equal(dense(lw.layers[0].qkv_weight), torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                           attn.v_proj.weight]))
    assert abs(attn.q_proj.weight.std().item() - 0.02) < 0.002  # init std 0.02
    with torch.no_grad():
        logits = hf(torch.tensor([Tokenizer(tiny_dir).encode("the river and the mountain")])).logits
    assert torch.isfinite(logits).all()
    # Same seed, same bytes; the cached copy is reused, not rewritten.
    again = preset_dir("llama-tiny", cache_dir=bench_cache / "other")
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (tiny_dir, again)]
    assert digest[0] == digest[1]
    assert preset_dir("llama-tiny", cache_dir=bench_cache) == tiny_dir


def test_decode_weight_bytes_counts_layers_and_lm_head(tiny_dir):
    lw = load_model(tiny_dir, "float32", "cpu")
    total = lw.num_parameters()  # untied: the input embedding is not read per step
    assert decode_weight_bytes(tiny_dir, 4) == 4 * (total - lw.embed.numel())


@requires_alpaca
def test_alpaca_workload_is_deterministic(tiny_dir):
    records = read_alpaca_lengths(ALPACA_DEV, 6)
    first = json.loads(ALPACA_DEV.open().readline())
    assert records[0] == (first["prompt"], first["lengths"]["t0.0"])
    tok = Tokenizer(tiny_dir)
    a, b = alpaca_lengths(ALPACA_DEV, tok, 6), alpaca_lengths(ALPACA_DEV, tok, 6)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens == [n for _, n in records]
    assert a.prompts[0] == tok.encode(first["prompt"])
    with pytest.raises(ValueError, match="has only"):
        read_alpaca_lengths(ALPACA_DEV, 10**6)


def test_synthetic_workload_is_deterministic():
    a, b, c = synthetic(50, 7, 1000, 1), synthetic(50, 7, 1000, 1), synthetic(50, 8, 1000, 1)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert a.output_lens != c.output_lens
    assert all(p[0] == 1 and all(3 <= t < 1000 for t in p[1:]) for p in a.prompts)
    assert all(1 <= n <= 512 for n in a.output_lens)
    assert len(set(a.output_lens)) > 10  # a spread, not one length


def test_warmup_prompts_share_no_prefix_with_the_workload(tiny_dir):
    args = argparse.Namespace(workload="synthetic", data=None, num_requests=6, seed=0, max_output_len=5,
                              warmup_requests=3)
    workload, warmup = build_workload(args, tiny_dir)
    assert [len(p) for p in warmup] == [len(p) for p in workload.prompts[:3]]
    assert all(w[:16] != p[:16] for w in warmup for p in workload.prompts)  # no shared first KV block
    assert max(workload.output_lens) <= 5
    assert build_workload(args, tiny_dir)[1] == warmup


def test_static_batches_count_only_each_requests_own_tokens(tiny_dir):
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10], [1, 11], [1, 12, 13, 14]]
    lens = [2, 5, 3, 7]
    spec = {"model_dir": str(tiny_dir), "dtype": "float32", "device": "cpu", "threads": 1, "batch_size": 2,
            "warmup_prompts": [], "warmup_tokens": 1, "progress": False, "prompts": prompts, "output_lens": lens}
    out = run_transformers(spec)
    assert out["output_tokens"] == sum(lens) and out["short_requests"] == 0
    assert out["token_slots"] == 2 * 5 + 2 * 7  # each batch decodes to its largest request


def _bench_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["bench", "throughput", "--model", "llama-tiny", "--json", str(tmp_path / "out.json"), "--threads", "1",
            "--no-progress", *extra]


def test_end_to_end_all_engines(tmp_path, bench_cache, tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("LENGTHWISE_CACHE", str(bench_cache))
    code = main(_bench_args(tmp_path, "--num-requests", "4", "--max-output-len", "6", "--warmup-requests", "1",
                            "--warmup-tokens", "2", "--kv-cache-tokens", "2048"))
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert set(report) == SCHEMA_KEYS
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["lengthwise", "transformers", "transformers-cb"]
    for r in report["results"]:
        assert RESULT_KEYS <= set(r)
        assert r["requests_per_s"] > 0 and r["output_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["short_requests"] == 0
    wanted = report["config"]["workload"]["output_tokens"]
    assert [r["output_tokens"] for r in report["results"]] == [wanted] * 3
    # Four requests of at most 6 tokens, all at once: one prefill step, then at most 5 decode steps.
    details = report["results"][0]["details"]
    assert 1 < details["sampling_steps"] <= 6 and "steps_launched_ahead" not in details  # no graphs on the CPU
    for key in ("speedup_vs_transformers", "speedup_vs_transformers_cb"):
        assert isinstance(report[key], float) and math.isfinite(report[key])
    assert report["config"]["outputs_compared"]["num_requests"] == 4
    assert "transformers-cb" in capsys.readouterr().out


def test_a_batch_size_sweep_takes_the_ratio_against_the_fastest_static_baseline(tmp_path, bench_cache, monkeypatch):
    """The static baseline at its best batch size, not at one we chose; prefix caching (which it
    cannot do) can be switched off for the ratio without that advantage."""
    monkeypatch.setenv("LENGTHWISE_CACHE", str(bench_cache))
    assert main(_bench_args(tmp_path, "--engines", "lengthwise,transformers", "--batch-size", "1,4",
                            "--num-requests", "4", "--max-output-len", "4", "--warmup-requests", "1",
                            "--warmup-tokens", "2", "--kv-cache-tokens", "2048", "--no-prefix-caching",
                            "--repeats", "2")) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    rows = {r["engine"]: r for r in report["results"]}
    assert sorted(rows) == sorted(["lengthwise", "transformers", "transformers-b1" if "transformers-b4" not in rows
                                   else "transformers-b4"])
    other = next(r for e, r in rows.items() if e.startswith("transformers-b"))
    best = rows["transformers"]
    assert {best["details"]["batch_size"], other["details"]["batch_size"]} == {1, 4}
    assert best["output_tokens_per_s"] >= other["output_tokens_per_s"]
    assert report["speedup_vs_transformers"] == pytest.approx(
        rows["lengthwise"]["output_tokens_per_s"] / best["output_tokens_per_s"], rel=1e-3)
    assert report["config"]["prefix_caching"] is False and report["config"]["batch_size"] == [1, 4]
    for r in rows.values():  # two interleaved rounds; each row is the lower-median (here: faster) run
        assert len(r["elapsed_runs_s"]) == 2 and r["elapsed_s"] == pytest.approx(min(r["elapsed_runs_s"]), abs=1e-3)


def test_speculative_decoding_in_the_throughput_benchmark(tmp_path, bench_cache, monkeypatch, capsys):
    """`--speculative-config` reaches lengthwise's engine (drafts verified and counted) and its
    greedy outputs stay transformers' token for token; a bad config fails before any engine runs."""
    monkeypatch.setenv("LENGTHWISE_CACHE", str(bench_cache))
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": False}
    assert main(_bench_args(tmp_path, "--engines", "lengthwise,transformers", "--num-requests", "4",
                            "--max-output-len", "24", "--warmup-requests", "1", "--warmup-tokens", "2",
                            "--kv-cache-tokens", "2048", "--speculative-config", json.dumps(spec))) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["config"]["speculative_config"] == spec
    details = report["results"][0]["details"]
    assert 0 < details["accepted_tokens"] <= details["draft_tokens"], details  # a random model's loops
    assert report["config"]["outputs_compared"]["identical_requests"] == {"transformers": 4}
    eagle = '{"method": "eagle", "num_speculative_tokens": 2}'
    bad = main(_bench_args(tmp_path / "bad", "--speculative-config", eagle))
    assert bad == 2 and "speculative_config.method" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "out.json").exists()


def test_roofline_measures_one_request_against_copy_bandwidth(tiny_dir):
    spec = {"model_dir": str(tiny_dir), "dtype": "float32", "device": "cpu", "threads": 1,
            "max_num_batched_tokens": 256, "block_size": 16, "policy": "fcfs", "prompts": [list(range(1, 50))],
            "roofline_copy_bytes": 1 << 24}
    roof = run_roofline(spec)
    assert roof["tokens"] == 128 and roof["prompt_tokens"] == 32
    assert roof["weight_bytes"] == decode_weight_bytes(tiny_dir, 4)
    assert roof["copy_bandwidth_gb_s"] > 0 and roof["decode_ms_per_token"] > 0
    assert roof["percent_of_roofline"] == pytest.approx(100 * roof["bound_ms_per_token"] / roof["decode_ms_per_token"],
                                                        rel=1e-2)
    assert "% of the memory-bandwidth roofline" in format_roofline(roof)


def test_subset_of_engines_leaves_speedups_null(tmp_path):
    raw = {"engine": "transformers", "elapsed_s": 2.0, "num_requests": 4, "output_tokens": 10, "generated_tokens": 16,
           "short_requests": 0, "peak_rss_mb": 100.0}
    config = {"model": "m", "dtype": "float32", "device": "cpu", "threads": 1,
              "workload": {"name": "synthetic", "num_requests": 4, "prompt_tokens": 8, "output_tokens": 10}}
    report = build_report([summarise(raw)], config)
    assert set(report) == SCHEMA_KEYS
    assert report["speedup_vs_transformers"] is None and report["speedup_vs_transformers_cb"] is None
    assert report["results"][0]["output_tokens_per_s"] == 5.0 and report["results"][0]["requests_per_s"] == 2.0
    both = build_report([summarise({**raw, "engine": "lengthwise", "elapsed_s": 1.0}), summarise(raw)], config)
    assert both["speedup_vs_transformers"] == 2.0 and both["speedup_vs_transformers_cb"] is None
    assert "2.00x" in format_table(both)
    assert plot(both, tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_name_the_problem(tmp_path, bench_cache, monkeypatch, capsys):
    monkeypatch.setenv("LENGTHWISE_CACHE", str(bench_cache))
    assert main(_bench_args(tmp_path, "--model", "llama-nope")) == 2
    err = capsys.readouterr().err
    assert "llama-nope" in err and "preset" in err and "llama-tiny" in err
    missing = tmp_path / "nowhere.jsonl"
    assert main(_bench_args(tmp_path, "--workload", "alpaca-lengths", "--data", str(missing))) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
    assert main(_bench_args(tmp_path, "--workload", "alpaca-lengths")) == 2
    assert "--data" in capsys.readouterr().err
    assert main(_bench_args(tmp_path, "--engines", "lengthwise,vllm")) == 2
    assert "vllm" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_kv_cache_dtype_in_the_throughput_benchmark(tmp_path, bench_cache, monkeypatch):
    """`--kv-cache-dtype` reaches lengthwise's engine with the same KV bytes as the model's dtype
    would take (the baselines' memory), so fp8 under the float32 preset holds four times the tokens."""
    monkeypatch.setenv("LENGTHWISE_CACHE", str(bench_cache))
    held = {}
    for kv in ("auto", "fp8"):
        out = tmp_path / kv
        assert main(_bench_args(out, "--engines", "lengthwise", "--num-requests", "3", "--max-output-len", "8",
                                "--warmup-requests", "1", "--warmup-tokens", "2", "--kv-cache-tokens", "2048",
                                "--kv-cache-dtype", kv)) == 0
        report = json.loads((out / "out.json").read_text())
        assert report["config"]["kv_cache_dtype"] == kv
        details = report["results"][0]["details"]
        assert details["kv_cache_dtype"] == {"auto": "float32", "fp8": "float8_e4m3fn"}[kv]
        held[kv] = (details["kv_cache_memory_bytes"], details["kv_cache_tokens_held"])
    assert held["auto"][0] == held["fp8"][0]
    assert held["fp8"][1] == 4 * held["auto"][1] >= 4 * 2048

"""Decode steps through `DecodeGraphs`: bucket sizes, padding rows, the eager fallback.

On a GPU the engine captures real CUDA graphs (`tests/test_ops_triton.py` runs the same check
through the Triton kernels, compiled there and interpreted here); on the CPU the same static
buffers run eagerly through the torch reference kernels, which checks everything but the capture.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_generations, graphed_and_plain_decode, step_to_completion

from lengthwise.config import EngineConfig
from lengthwise.engine.cuda_graph import DecodeRows, graph_batch_sizes
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model.config import ModelConfig
from lengthwise.model.llama import CausalLM
from lengthwise.ops.dispatch import KERNELS_ENV


def _model() -> CausalLM:
    config = ModelConfig(model_type="llama", vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
    model = CausalLM(config, torch.float32, "cpu")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
    return model


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]
    with pytest.raises(ValueError, match="max_batch"):
        graph_batch_sizes(0)


@pytest.mark.parametrize("kernels", ["torch", "auto"])  # the reference, and the CPU C++ attention kernel
def test_graphed_decode_matches_plain_steps(monkeypatch, kernels):
    monkeypatch.setenv(KERNELS_ENV, kernels)
    got, want, calls = graphed_and_plain_decode(_model(), monkeypatch, graph_batch=4)
    assert sorted(set(calls)) == [1, 2, 3, 4]  # every bucket, and 3 rows padded to 4
    assert_same_generations(got, want, logprob_tol=1e-4)


def test_graphs_only_on_cuda_and_not_when_eager():
    model = _model()
    assert LLMEngine(model, None, EngineConfig(block_size=4))._graph_batch() == 0  # CPU
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineConfig(enforce_eager="yes")


def test_graph_rejects_an_empty_or_oversized_step(monkeypatch):
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 2)
    engine = LLMEngine(_model(), None, EngineConfig(block_size=4, max_num_seqs=4))
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2]
    assert engine.runner.cache.num_blocks == engine.num_blocks + 1  # the padding rows' scratch block
    row = ([1], [0], [0], [[0]], [1], [[]], [0])
    with pytest.raises(ValueError, match="1 to 2 rows"):
        graphs.run(DecodeRows(*([] for _ in row)))
    with pytest.raises(ValueError, match="1 to 2 rows"):
        graphs.run(DecodeRows(*(x * 3 for x in row)))


def _async_run(monkeypatch, async_decode: bool, prompts, params, abort: tuple[int, str] | None = None):
    """Run `prompts` through an engine whose decode steps of up to 8 rows go through `DecodeGraphs`
    (eager here), launching steps ahead or not; `abort=(step, request_id)` aborts mid-way.
    Returns ({request_id: token ids of each sample}, the graphs, steps taken)."""
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 8)
    engine = LLMEngine(_model(), None, EngineConfig(block_size=4, max_num_seqs=8, async_decode=async_decode))
    outs, steps = step_to_completion(engine, prompts, params, abort)
    return outs, engine.runner.graphs, steps


def test_steps_launched_ahead_change_nothing(monkeypatch):
    """Async decode (the next graphed step launched on the device's tokens before the host reads
    them) gives the tokens of synchronous steps, through a stop token, samples drawn from seeded
    generators, n=2, an abort, rows reaching their limits, block boundaries (block_size 4) and a
    batch shrinking through the buckets; most steps are used as launched, the rest rerun."""
    from lengthwise import SamplingParams

    prompts = [[5, 17, 9, 3, 50], list(range(10, 40)), [7], [1, 2, 3], [8, 8, 8, 9]]
    greedy = dict(temperature=0.0, ignore_eos=True)
    plain, _, _ = _async_run(monkeypatch, False, prompts[:1], [SamplingParams(max_tokens=30, **greedy)])
    stop = plain["0"][0][6]  # a token request 0 generates at index 6 (or before): its stop token below
    params = [SamplingParams(max_tokens=30, stop_token_ids=[stop], **greedy),
              SamplingParams(max_tokens=17, temperature=0.9, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=9, **greedy),
              SamplingParams(max_tokens=22, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=13, n=2, temperature=1.0, seed=7, ignore_eos=True)]
    for abort in (None, (6, "3")):
        want, sync_graphs, _ = _async_run(monkeypatch, False, prompts, params, abort)
        got, graphs, steps = _async_run(monkeypatch, True, prompts, params, abort)
        assert got == want
        assert sync_graphs.launched_ahead == 0
        assert len(got["0"][0]) <= 7 and got["0"][0][-1] == stop
        assert 0 < graphs.used_ahead < graphs.launched_ahead < steps
        assert graphs.used_ahead >= steps // 2


def test_no_step_is_launched_ahead_of_logprobs(monkeypatch):
    """Rows that ask for logprobs read the step's logits after the tokens: nothing may overtake them."""
    from lengthwise import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    _, graphs, _ = _async_run(monkeypatch, True, [[5, 17, 9], [4]], [params, params])
    assert graphs.launched_ahead == 0
    with pytest.raises(ValueError, match="async_decode"):
        EngineConfig(async_decode=1)

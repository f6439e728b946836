"""Decode steps through `DecodeGraphs`: bucket sizes, padding rows, the eager fallback.

On a GPU the engine captures real CUDA graphs (`tests/test_ops_triton.py` runs the same check
through the Triton kernels, compiled there and interpreted here); on the CPU the same static
buffers run eagerly through the torch reference kernels, which checks everything but the capture.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_generations, graphed_and_plain_decode

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

"""Weight-only int8 quantization (`quantization="int8"`): the scheme, where it is accepted, and
what it does to a real model's answers. (The fused CPU path's int8 panels are tested against the
op-by-op path in test_cpu_decode.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, requires_stories

from lengthwise import LLM, SamplingParams, load_model
from lengthwise.bench.agreement import prompt_logprob_agreement
from lengthwise.config import EngineConfig
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model.quantize import QUANTIZED_WEIGHTS, check_quantization, quantize_int8, quantize_model
from lengthwise.ops.cpu import decode as cpu_decode
from lengthwise.ops.cpu import dense


def test_int8_round_trip_is_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 300, generator=g) * torch.rand(40, 1, generator=g) * 3  # rows of different ranges
    w[7] = 0.0
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.scales.shape == (40,) and q.scales.dtype == torch.float32
    assert int(q.q.abs().max()) == 127 and int(q.q.min()) >= -127  # symmetric: -128 never used
    assert (q.q.abs().amax(dim=1)[torch.arange(40) != 7] == 127).all()  # each row's largest maps to 127
    error = (q.dequantize() - w).abs()
    assert (error <= q.scales[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.q[7] == 0).all() and q.scales[7] == 1 and (q.dequantize()[7] == 0).all()


def test_quantization_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="quantization must be one of int8, int4, gptq, awq"):
        EngineConfig(quantization="fp8")
    with pytest.raises(ValueError, match="quantization must be one of int8"):
        check_quantization("fp8", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="quantization='int8'.*CPU's fused decode path; on cuda"):
        check_quantization("int8", torch.device("cuda"), torch.float32)
    for method in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"quantization='{method}' needs dtype float32"):
            check_quantization(method, torch.device("cpu"), torch.bfloat16)
    check_quantization(None, torch.device("cuda"), torch.bfloat16)


def test_int4_on_cuda_needs_the_triton_kernel(monkeypatch):
    """int4 on CUDA runs on the Triton W4A16 kernel, in any of the model's dtypes; where Triton
    does not run there it is refused, naming why."""
    monkeypatch.setattr("lengthwise.ops.dispatch.triton_available", lambda: True)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        check_quantization("int4", torch.device("cuda"), dtype)
    monkeypatch.setenv("LENGTHWISE_KERNELS", "torch")
    with pytest.raises(ValueError, match="quantization='int4' on cuda runs on the Triton W4A16 kernel"):
        check_quantization("int4", torch.device("cuda"), torch.bfloat16)
    monkeypatch.setenv("LENGTHWISE_KERNELS", "auto")
    monkeypatch.setattr("lengthwise.ops.dispatch.triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton does not import"):
        check_quantization("int4", torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("packed", [True, False])
def test_load_model_quantizes_the_projections_only(packed, hf_checkpoint, monkeypatch):
    """Packed (the CPU default), the projections are int8 panels; kept dense
    (`LENGTHWISE_CPU_PACKED_WEIGHTS=0`), the parameters are the dequantized weights and the int8
    ones wait beside them for the fused path. Either way every path computes `q * scale`."""
    monkeypatch.setenv(cpu_decode.PACKED_WEIGHTS_ENV, "1" if packed else "0")
    path = hf_checkpoint("qwen2")[1]
    plain = load_model(path, "float32", "cpu")
    quant = load_model(path, "float32", "cpu", quantization="int8")
    assert plain.quantization is None and quant.quantization == "int8"
    assert cpu_decode.is_packed(quant) == packed
    for lp, lq in zip(plain.layers, quant.layers, strict=True):
        assert bool(lq.quantized) != packed and not lp.quantized
        for name in QUANTIZED_WEIGHTS:
            expected = quantize_int8(dense(getattr(lp, name)))
            if packed:
                halves = getattr(lq, name) if name == "gate_up_weight" else (getattr(lq, name),)
                assert {h.dtype for h in halves} == {torch.int8}
            else:
                assert torch.equal(lq.quantized[name].q, expected.q)
            assert torch.equal(dense(getattr(lq, name)), expected.dequantize())
            assert not torch.equal(dense(getattr(lq, name)), dense(getattr(lp, name)))
        for name in ("input_norm", "post_attn_norm", "qkv_bias"):
            assert torch.equal(getattr(lq, name), getattr(lp, name))
    assert torch.equal(quant.embed, plain.embed) and torch.equal(dense(quant.lm_head), dense(plain.lm_head))
    with pytest.raises(ValueError, match="needs dtype float32"):
        load_model(path, "bfloat16", "cpu", quantization="int8")


def test_engine_quantizes_a_model_it_is_given(hf_checkpoint):
    path = hf_checkpoint("llama")[1]
    model = load_model(path, "float32", "cpu")
    LLMEngine(model, None, EngineConfig(quantization="int8"))
    assert model.quantization == "int8" and cpu_decode.is_packed(model)  # unpacked, quantized, packed again
    assert model.layers[0].qkv_weight.dtype == torch.int8
    # quantization=None serves a given model as it is (as the self length predictor's second engine does)
    engine = LLMEngine(load_model(path, "float32", "cpu", quantization="int8"), None, EngineConfig())
    assert engine.model.quantization == "int8"
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="stays packed"):
        cpu_decode.unpack_model(model)


@requires_stories
def test_int8_with_the_self_length_predictor():
    """The self predictor asks the served (quantized) model through an engine of its own."""
    llm = LLM(STORIES, device="cpu", quantization="int8", length_predictor="self")
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8 and llm.engine.model.quantization == "int8"


@requires_stories
def test_int8_stories260k_answers_as_float32_does():
    """On a real trained model, int8 weights change the logprobs a little (mean |change| of the
    top-5 candidates well under 0.1 nats here) and the greedy story not at all."""
    prompts = ["Once upon a time", "The little dog", "One day, a boy named Tom"]
    full, int8 = LLM(STORIES, device="cpu"), LLM(STORIES, device="cpu", quantization="int8")
    greedy = SamplingParams(max_tokens=60, temperature=0.0)
    a, b = (llm.generate(prompts, greedy, use_tqdm=False) for llm in (full, int8))
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    texts = [p + o.outputs[0].text for p, o in zip(prompts, a, strict=True)]
    scored = SamplingParams(max_tokens=1, prompt_logprobs=5)
    pa, pb = (llm.generate(texts, scored, use_tqdm=False) for llm in (full, int8))
    agreement = prompt_logprob_agreement(pa, pb)
    assert 1e-4 < agreement.mean_change < 0.1, agreement.mean_change  # changed (really int8), but little
    assert agreement.top1_agreement >= 0.97, agreement

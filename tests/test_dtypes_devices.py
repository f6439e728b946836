"""bfloat16 and float16 on the CPU against transformers in the same dtype, and the CUDA path where a GPU is."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_hf_model, requires_cuda, save_hf_model

from lengthwise import SamplingParams, generate, load_model
from lengthwise.engine import prompt_logits

PROMPTS = [[5, 17, 99, 3, 250], list(range(10, 60))]


def _ref_logits(hf, dtype, device="cpu"):
    hf = copy.deepcopy(hf).to(device=device, dtype=dtype)  # never convert the shared fixture in place
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([p], device=device)).logits[0, -1].float() for p in PROMPTS])


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    hf = make_hf_model("qwen3")
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("qwen3-dtype"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_matches_transformers(qwen3, dtype):
    hf, path = qwen3
    model = load_model(path, dtype, "cpu")
    assert model.embed.dtype == dtype and model.layers[0].qkv_weight.dtype == dtype
    ours = prompt_logits(model, PROMPTS)
    ref = _ref_logits(hf, dtype)
    fp32 = _ref_logits(hf, torch.float32)
    # Same dtype as transformers: close; and both deviate from float32 by a similar amount.
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-2, err
    assert ((ours - fp32).abs().max() / fp32.abs().max()).item() < 5e-2
    out = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in out)


def test_auto_dtype_is_float32_on_cpu(qwen3):
    _, path = qwen3
    assert load_model(path, "auto", "cpu").dtype == torch.float32


def test_bad_dtype_and_device_are_named(qwen3):
    _, path = qwen3
    with pytest.raises(ValueError, match="dtype"):
        load_model(path, "int8", "cpu")
    with pytest.raises(ValueError, match="device"):
        load_model(path, "float32", "tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_request_without_gpu_is_a_clear_error(qwen3):
    _, path = qwen3
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load_model(path, "float32", "cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_transformers(qwen3, dtype):
    hf, path = qwen3
    model = load_model(path, dtype, "cuda")
    ours = prompt_logits(model, PROMPTS).cpu()
    ref = _ref_logits(hf, dtype, "cuda").cpu()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    # TF32 matmuls are off by default in torch, so float32 on CUDA is held to the CPU tolerance.
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < tol
    out = generate(model, PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    if dtype == torch.float32:
        for p, o in zip(PROMPTS, out, strict=True):
            with torch.no_grad():
                r = copy.deepcopy(hf).to("cuda").generate(torch.tensor([p], device="cuda"), max_new_tokens=16,
                                                          do_sample=False)
            assert o.token_ids == r[0, len(p):].tolist()

"""4-bit weights (`lengthwise.model.int4`): GPTQ and AWQ checkpoints, and `quantization="int4"`.

A quantized checkpoint is built here from a random transformers model: each decoder projection
becomes 4-bit values, zero points and float16 scales, packed into int32 words as AutoGPTQ and
AutoAWQ pack them (the loops below follow their pack routines, written independently of
lengthwise's vectorised unpacking), and the transformers model is given the dequantized weights
as the reference. (The fused CPU path's 4-bit panels against the op-by-op path: test_cpu_decode.py;
the Triton W4A16 kernel against the torch reference: test_ops_triton.py. Here the whole model runs
on that kernel too, on the CPU under Triton's interpreter, as CUDA runs it.)
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import STORIES, make_hf_model, requires_cuda, requires_stories
from safetensors.torch import load_file, save_file

from lengthwise import LLM, SamplingParams, generate, load_model
from lengthwise.bench.agreement import prompt_logprob_agreement
from lengthwise.config import EngineConfig
from lengthwise.engine import prompt_logits
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.model.config import CheckpointError, CheckpointQuantization
from lengthwise.model.int4 import Int4Weight, quantize_int4
from lengthwise.model.quantize import QUANTIZED_WEIGHTS
from lengthwise.ops import cpu as cpu_kernels
from lengthwise.ops.cpu import decode as cpu_decode
from lengthwise.ops.cpu import dense
from lengthwise.ops.dispatch import KERNELS_ENV
from lengthwise.ops.int4 import PackedInt4, pack_int4

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a word holds column 8c + AWQ_ORDER[i]
needs_kernels = pytest.mark.skipif(cpu_kernels.segment_attention_kernel() is None,
                                   reason="the CPU kernels could not be built here (no C++ compiler?)")


def _word(nibbles: list[np.ndarray]) -> np.ndarray:
    """Eight arrays of 4-bit values -> int32 words, value i in bits 4i..4i+3."""
    word = np.zeros(nibbles[0].shape, dtype=np.uint32)
    for i, v in enumerate(nibbles):
        word |= (v.astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return word.view(np.int32)


def _gptq_tensors(q, zeros, scales, g_idx, v1: bool) -> dict[str, torch.Tensor]:
    """AutoGPTQ's layout: qweight [k/8, n] packs 8 consecutive inputs per word; qzeros [groups,
    n/8] packs 8 consecutive outputs, storing zero - 1 in the v1 format."""
    w = q.t().numpy()  # [k, n]
    qweight = np.stack([_word([w[8 * r + j] for j in range(8)]) for r in range(w.shape[0] // 8)])
    z = zeros.t().numpy().astype(np.int64) - (1 if v1 else 0)  # [groups, n]
    qzeros = np.stack([_word([z[:, 8 * c + j] for j in range(8)]) for c in range(z.shape[1] // 8)], axis=1)
    return {"qweight": torch.from_numpy(qweight), "qzeros": torch.from_numpy(qzeros),
            "scales": scales.t().contiguous().half(), "g_idx": g_idx.to(torch.int32)}


def _awq_tensors(q, zeros, scales) -> dict[str, torch.Tensor]:
    """AutoAWQ's gemm layout: qweight [k, n/8] and qzeros [groups, n/8] pack 8 outputs per word
    in AWQ_ORDER."""
    def pack(t: np.ndarray) -> np.ndarray:
        return np.stack([_word([t[:, 8 * c + AWQ_ORDER[i]] for i in range(8)]) for c in range(t.shape[1] // 8)],
                        axis=1)
    return {"qweight": torch.from_numpy(pack(q.t().numpy())),
            "qzeros": torch.from_numpy(pack(zeros.t().numpy().astype(np.int64))),
            "scales": scales.t().contiguous().half()}


def quantized_checkpoint(tmp_path, method: str, family: str = "llama", group_size: int = 32,
                         act_order: bool | str = False, v1: bool = True, dense_layers: tuple[str, ...] = (),
                         **quant_config):
    """(transformers model holding the dequantized weights, checkpoint dir) of a `method` checkpoint.
    `dense_layers`: projections ("0.mlp.down_proj") left unquantized, as modules_to_not_convert."""
    hf = make_hf_model(family)
    g = torch.Generator().manual_seed(5)
    stored = {}
    for i, layer in enumerate(hf.model.layers):
        orders = {}  # GPTQ orders a linear's inputs by its Hessian: q, k, v (and gate, up) share theirs
        for name in PROJECTIONS:
            if f"{i}.{name}" in dense_layers:
                continue
            linear = layer.get_submodule(name)
            n, k = linear.weight.shape
            gs = k if group_size == -1 else group_size
            groups = -(-k // gs)
            g_idx = torch.arange(k) // gs
            if act_order == "uneven":  # groups of unequal sizes: no sorting makes runs of group_size
                g_idx = torch.randint(0, groups, (k,), generator=g)
            elif act_order:  # ("per-linear": each its own order, which no fused projection can hold)
                shared_input = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                                "mlp.up_proj": "mlp.gate_proj"}.get(name, name) if act_order is True else name
                order = orders.setdefault(shared_input, torch.randperm(k, generator=g))
                g_idx = g_idx[order]
            scales = (0.005 + 0.02 * torch.rand(n, groups, generator=g)).half().float()
            low = 1 if method == "gptq" and v1 else 0  # (a v1 zero of 0 would wrap: GPTQ's own limit)
            zeros = torch.randint(low, 16, (n, groups), generator=g)
            q = torch.round(linear.weight.detach() / scales[:, g_idx] + zeros[:, g_idx]).clamp(0, 15).to(torch.uint8)
            with torch.no_grad():
                linear.weight.copy_((q.float() - zeros[:, g_idx]) * scales[:, g_idx])
            packed = (_gptq_tensors(q, zeros, scales, g_idx, v1) if method == "gptq"
                      else _awq_tensors(q, zeros, scales))
            stored.update({f"model.layers.{i}.{name}.{key}": t for key, t in packed.items()})
    path = tmp_path / f"{family}-{method}"
    hf.save_pretrained(path)
    tensors = {n: t for n, t in load_file(path / "model.safetensors").items()
               if n.removesuffix(".weight") + ".qweight" not in stored}
    save_file({**tensors, **stored}, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group_size,
                                     **({"desc_act": bool(act_order), "sym": False} if method == "gptq"
                                        else {"version": "gemm", "zero_point": True}),
                                     **({"checkpoint_format": "gptq_v2"} if method == "gptq" and not v1 else {}),
                                     **quant_config}
    (path / "config.json").write_text(json.dumps(config))
    return hf, path


def _panels(layer, name: str) -> tuple:
    """A layer's projection as a tuple of its panels (gate-up is packed as two halves)."""
    w = getattr(layer, name)
    return w if isinstance(w, tuple) else (w,)


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 11, 24, 40)]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _hf_last_logits(hf, prompts) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([p])).logits[0, -1].float() for p in prompts])


@needs_kernels
@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_quantized_checkpoints_match_transformers(method, family, tmp_path):
    """Logits and greedy tokens equal transformers' on the dequantized weights; on the CPU in
    float32 the projections stay 4-bit panels, an eighth of float32's bytes plus the groups'
    constants."""
    hf, path = quantized_checkpoint(tmp_path, method, family)
    model = load_model(path, "float32", "cpu")
    assert model.quantization == method and model.config.quantization.group_size == 32
    layer = model.layers[0]
    for name in QUANTIZED_WEIGHTS:
        for panels in _panels(layer, name):
            assert panels.dtype == cpu_kernels.INT4 and panels.group_size == 32
            assert panels.panels.numel() * 2 == -(-panels.n // 32) * 32 * panels.k  # two values a byte
    prompts = _prompts(hf.config.vocab_size)
    assert _rel_err(prompt_logits(model, prompts), _hf_last_logits(hf, prompts)) < 1e-4
    ours = generate(model, prompts[:2], SamplingParams(max_tokens=16, temperature=0.0))
    for prompt, out in zip(prompts[:2], ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
        assert out.token_ids == ref.tolist()


@needs_kernels
@pytest.mark.parametrize("variant", ["gptq-v2", "gptq-whole-rows", "gptq-act-order", "gptq-act-order-per-linear",
                                     "gptq-uneven-groups", "awq-partly-dense"])
def test_quantized_checkpoint_variants(variant, tmp_path):
    """GPTQ's v2 format (zero points stored as they are); group_size -1 (one group per row);
    desc_act groups in activation order (4-bit panels over the inputs sorted by group, the kernels
    reading them in that order), and where q, k and v (gate and up) were given different orders
    (the fused projections dequantized, o and down still 4-bit); groups of unequal sizes, which no
    order makes runs of group_size (dequantized: float32 panels); projections left unquantized
    (AWQ's modules_to_not_convert). Prefill (op-by-op on the panels) and greedy decode of 6
    sequences together (the fused step, from 5 rows on its dequantizing branch) against transformers."""
    kwargs = {"gptq-v2": dict(method="gptq", v1=False), "gptq-whole-rows": dict(method="gptq", group_size=-1),
              "gptq-act-order": dict(method="gptq", act_order=True),
              "gptq-act-order-per-linear": dict(method="gptq", act_order="per-linear"),
              "gptq-uneven-groups": dict(method="gptq", act_order="uneven"),
              "awq-partly-dense": dict(method="awq", dense_layers=("0.mlp.down_proj", "1.self_attn.k_proj"),
                                       modules_to_not_convert=["down_proj"])}[variant]
    hf, path = quantized_checkpoint(tmp_path, **kwargs)
    model = load_model(path, "float32", "cpu")
    prompts = _prompts(hf.config.vocab_size)
    assert _rel_err(prompt_logits(model, prompts), _hf_last_logits(hf, prompts)) < 1e-4
    batch = [*prompts, *_prompts(hf.config.vocab_size, seed=2)[:2]]
    outs = generate(model, batch, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(batch, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
        assert out.token_ids == ref.tolist()
    formats = {(i, name): {w.dtype for w in _panels(layer, name)}
               for i, layer in enumerate(model.layers) for name in QUANTIZED_WEIGHTS}
    perms = {name: [w.perm is not None for layer in model.layers for w in _panels(layer, name)]
             for name in QUANTIZED_WEIGHTS}
    if variant == "gptq-act-order":
        assert all(all(p) for p in perms.values())
    elif variant == "gptq-act-order-per-linear":
        assert all(perms["o_weight"]) and all(perms["down_weight"])
        assert formats[(0, "qkv_weight")] == formats[(0, "gate_up_weight")] == {torch.float32}
    else:
        assert not any(any(p) for p in perms.values())
    if variant == "gptq-uneven-groups":
        assert all(f.isdisjoint({cpu_kernels.INT4}) for f in formats.values())
    elif variant == "awq-partly-dense":
        assert cpu_kernels.INT4 not in (model.layers[0].down_weight.dtype, model.layers[1].qkv_weight.dtype)
        assert model.layers[0].qkv_weight.dtype == cpu_kernels.INT4
    elif variant == "gptq-act-order-per-linear":
        assert formats[(1, "o_weight")] == formats[(1, "down_weight")] == {cpu_kernels.INT4}
    else:
        assert all(f == {cpu_kernels.INT4} for f in formats.values())
        if variant == "gptq-whole-rows":
            assert model.layers[0].qkv_weight.group_size == hf.config.hidden_size


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_checkpoints_dequantize_off_the_fused_path(method, tmp_path, monkeypatch):
    """bfloat16 on the CPU (where Triton does not run) holds the dequantized weights in the model's
    dtype; float32 kept dense keeps the 4-bit values beside them for the fused path."""
    hf, path = quantized_checkpoint(tmp_path, method)
    prompts = _prompts(hf.config.vocab_size)
    ref = _hf_last_logits(hf, prompts)
    bf16 = load_model(path, "bfloat16", "cpu")
    assert bf16.layers[0].qkv_weight.dtype == torch.bfloat16 and not bf16.layers[0].quantized
    assert _rel_err(prompt_logits(bf16, prompts).float(), ref) < 3e-2
    monkeypatch.setenv(cpu_decode.PACKED_WEIGHTS_ENV, "0")
    kept = load_model(path, "float32", "cpu")
    assert not cpu_decode.is_packed(kept)
    w = kept.layers[1].quantized["gate_up_weight"]
    assert isinstance(w, Int4Weight) and torch.equal(w.dequantize(), kept.layers[1].gate_up_weight)
    assert torch.equal(kept.layers[1].gate_up_weight[:hf.config.intermediate_size],
                       hf.model.layers[1].mlp.gate_proj.weight)
    assert _rel_err(prompt_logits(kept, prompts), ref) < 1e-4


def _edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_what_is_refused_names_the_field(tmp_path):
    for raw, match in [({"quant_method": "fp8"}, "quant_method 'fp8'"),
                       ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
                       ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits 8"),
                       ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
                       ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
                        "checkpoint_format 'marlin'"),
                       ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "lm_head"),
                       ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
                       ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point")]:
        with pytest.raises(CheckpointError, match=match):
            CheckpointQuantization.from_hf(raw)
    # the older AWQ spelling (w_bit, q_group_size) reads as the newer one
    assert CheckpointQuantization.from_hf({"quant_method": "awq", "w_bit": 4, "q_group_size": 64}) == \
        CheckpointQuantization("awq", 64)
    _, path = quantized_checkpoint(tmp_path, "gptq")
    with pytest.raises(ValueError, match="quantized with gptq"):
        load_model(path, "float32", "cpu", quantization="int8")
    assert load_model(path, "float32", "cpu", quantization="gptq").quantization == "gptq"
    plain = tmp_path / "plain"
    make_hf_model("llama").save_pretrained(plain)
    with pytest.raises(ValueError, match="quantization='awq'.*not quantized"):
        load_model(plain, "float32", "cpu", quantization="awq")
    config = json.loads((path / "config.json").read_text())
    moe = tmp_path / "moe"
    make_hf_model("mixtral").save_pretrained(moe)
    moe_config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**moe_config, "quantization_config": config["quantization_config"]}))
    # (A quantized MoE checkpoint whose projections are all stored unquantized loads them as they are.)
    loaded = load_model(moe, "float32", "cpu")
    assert loaded.quantization == "gptq"
    stored = load_file(moe / "model.safetensors")["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert torch.equal(dense(loaded.layers[1].experts_down[3]), stored.float())


def test_a_checkpoint_short_of_its_4bit_tensors_fails_by_name(tmp_path):
    _, path = quantized_checkpoint(tmp_path, "awq")
    tensors = load_file(path / "model.safetensors")
    broken = {n: t for n, t in tensors.items() if n != "model.layers.1.mlp.up_proj.qzeros"}
    save_file(broken, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj is missing 4-bit tensors.*qzeros"):
        load_model(path, "float32", "cpu")
    both = {**tensors, "model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 64)}
    save_file(both, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_proj is stored both"):
        load_model(path, "float32", "cpu")
    wrong = {**tensors, "model.layers.0.self_attn.o_proj.scales": torch.zeros(3, 64, dtype=torch.float16)}
    save_file(wrong, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj.scales.*shape \(3, 64\), expected \(2, 64\)"):
        load_model(path, "float32", "cpu")


def test_round_to_nearest_int4_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 300, generator=g) * torch.rand(40, 1, generator=g) * 3 + 0.5  # ranges not around 0
    w[7] = 0.0
    q = quantize_int4(w, group_size=128)  # 300 inputs: groups of 128, 128 and 44
    assert q.q.dtype == torch.uint8 and int(q.q.max()) <= 15 and q.scales.shape == q.zeros.shape == (40, 3)
    groups = torch.arange(300) // 128
    error = (q.dequantize() - w).abs()
    assert (error <= q.scales[:, groups] / 2 * (1 + 1e-5) + 1e-7).all()
    assert (q.q[7] == 0).all() and (q.scales[7] == 1).all() and (q.dequantize()[7] == 0).all()
    assert ((q.zeros >= 0) & (q.zeros <= 15)).all()
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(w, group_size=0)
    assert Int4Weight.cat([q, quantize_int4(w, group_size=64)]) is None  # different groups: no one matrix
    both = Int4Weight.cat([q, q.rows(slice(0, 5))])
    assert both.shape == (45, 300) and torch.equal(both.dequantize()[40:], q.dequantize()[:5])


def test_older_exports_load(tmp_path):
    """GPTQ-for-LLaMa saved a zero bias for every linear (skipped, as vLLM does; a nonzero one for a
    model without biases is refused); older AutoGPTQ/AutoAWQ exports keep their settings in
    quantize_config.json / quant_config.json instead of config.json's quantization_config."""
    hf, path = quantized_checkpoint(tmp_path, "gptq")
    prompts = _prompts(hf.config.vocab_size)
    tensors = load_file(path / "model.safetensors")
    bias = {f"model.layers.{i}.{name}.bias": torch.zeros(t.shape[1], dtype=torch.float16)
            for i in range(2) for name in PROJECTIONS if (t := tensors[f"model.layers.{i}.{name}.scales"]) is not None}
    save_file({**tensors, **bias}, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    quant = config.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="4-bit .qweight tensors, but config.json has no quantization_config"):
        load_model(path, "float32", "cpu")
    (path / "quantize_config.json").write_text(json.dumps({k: v for k, v in quant.items() if k != "quant_method"}))
    model = load_model(path, "float32", "cpu")
    assert model.quantization == "gptq"
    assert _rel_err(prompt_logits(model, prompts), _hf_last_logits(hf, prompts)) < 1e-4
    bias["model.layers.1.mlp.up_proj.bias"][3] = 0.5
    save_file({**tensors, **bias}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1.mlp.up_proj.bias'"):
        load_model(path, "float32", "cpu")
    _, awq = quantized_checkpoint(tmp_path, "awq", group_size=64)
    config = json.loads((awq / "config.json").read_text())
    config.pop("quantization_config")
    (awq / "config.json").write_text(json.dumps(config))
    (awq / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 64, "w_bit": 4,
                                                       "version": "GEMM"}))
    assert load_model(awq, "float32", "cpu").config.quantization == CheckpointQuantization("awq", 64)


def test_act_order_panels_multiply_inputs_in_their_order():
    g = torch.Generator().manual_seed(0)
    w = quantize_int4(torch.randn(70, 384, generator=g), group_size=128)
    act = Int4Weight(w.q, w.scales, w.zeros, 128, (torch.arange(384) // 128)[torch.randperm(384, generator=g)])
    grouped, perm = act.in_group_order()
    assert grouped.g_idx is None and torch.equal(grouped.dequantize(), act.dequantize()[:, perm])
    packed = cpu_kernels.pack_int4_panels(grouped.q, grouped.scales, grouped.zeros, 128, perm)
    torch.testing.assert_close(packed.unpack(), act.dequantize(), rtol=0, atol=1e-6)
    for m in (1, 3, 7, 40):  # the few-row kernel and the dequantizing one
        x = torch.randn(m, 384, generator=g)
        torch.testing.assert_close(cpu_kernels.packed_linear(x, packed), x @ act.dequantize().T, rtol=1e-4,
                                   atol=3e-4)
    uneven = Int4Weight(w.q, w.scales, w.zeros, 128, torch.randint(0, 3, (384,), generator=g))
    assert uneven.in_group_order() is None
    with pytest.raises(ValueError, match="permutation"):
        cpu_kernels.pack_int4_panels(grouped.q, grouped.scales, grouped.zeros, 128, torch.zeros(384))


def test_act_order_needs_g_idx_and_no_kernels_keeps_no_4bit_copy(tmp_path, monkeypatch):
    _, path = quantized_checkpoint(tmp_path, "gptq", act_order=True)
    tensors = load_file(path / "model.safetensors")
    save_file({n: t for n, t in tensors.items() if n != "model.layers.0.self_attn.o_proj.g_idx"},
              path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="desc_act true.*no model.layers.0.self_attn.o_proj.g_idx"):
        load_model(path, "float32", "cpu")
    hf, path = quantized_checkpoint(tmp_path / "b", "awq")
    monkeypatch.setattr(cpu_decode, "segment_attention_kernel", lambda: None)  # (no C++ compiler here)
    model = load_model(path, "float32", "cpu")
    assert not cpu_decode.is_packed(model) and not any(layer.quantized for layer in model.layers)
    assert torch.equal(model.layers[0].o_weight, hf.model.layers[0].self_attn.o_proj.weight)


@needs_kernels
def test_int4_quantizes_the_projections_only(hf_checkpoint):
    """The plumbing of quantization="int4": every projection (and nothing else) becomes the
    quantize_int4 of its weight (the scheme itself: test_round_to_nearest_int4_is_within_half_a_step)."""
    path = hf_checkpoint("qwen2")[1]
    plain = load_model(path, "float32", "cpu")
    quant = load_model(path, "float32", "cpu", quantization="int4")
    assert quant.quantization == "int4"
    for lp, lq in zip(plain.layers, quant.layers, strict=True):
        for name in QUANTIZED_WEIGHTS:
            expected = quantize_int4(dense(getattr(lp, name)))
            assert torch.allclose(dense(getattr(lq, name)), expected.dequantize(), atol=1e-6)
            assert not torch.equal(dense(getattr(lq, name)), dense(getattr(lp, name)))
        assert torch.equal(lq.qkv_bias, lp.qkv_bias)
    assert torch.equal(dense(quant.lm_head), dense(plain.lm_head))
    assert cpu_decode.held_weight_bytes(quant) < cpu_decode.held_weight_bytes(plain)
    with pytest.raises(ValueError, match="needs dtype float32"):
        load_model(path, "bfloat16", "cpu", quantization="int4")
    engine = LLMEngine(load_model(path, "float32", "cpu"), None, EngineConfig(quantization="int4"))
    assert engine.model.layers[0].qkv_weight.dtype == cpu_kernels.INT4


@requires_stories
def test_int4_stories260k_stays_close_to_float32():
    """On a real trained model, round-to-nearest 4-bit weights move the logprobs far more than int8
    does (measured: mean |change| of the top-5 candidates 0.47 nats against int8's 0.03, top-1
    kept at 86% of positions against 100%): this 260K-parameter model's rows are 64 inputs, one
    group each, a harsh case. Calibrated GPTQ/AWQ checkpoints of real models lose far less."""
    prompts = ["Once upon a time", "The little dog", "One day, a boy named Tom"]
    full, int4 = LLM(STORIES, device="cpu"), LLM(STORIES, device="cpu", quantization="int4")
    greedy = SamplingParams(max_tokens=60, temperature=0.0)
    texts = [p + o.outputs[0].text for p, o in zip(prompts, full.generate(prompts, greedy, use_tqdm=False),
                                                     strict=True)]
    scored = SamplingParams(max_tokens=1, prompt_logprobs=5)
    pa, pb = (llm.generate(texts, scored, use_tqdm=False) for llm in (full, int4))
    agreement = prompt_logprob_agreement(pa, pb)
    assert 0.05 < agreement.mean_change < 1.0, agreement.mean_change
    assert agreement.top1_agreement >= 0.8, agreement.top1_agreement


# The W4A16 kernel's tests run on the GPU where there is one, else on the CPU under the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_the_triton_kernel(monkeypatch) -> None:
    """Load and run as CUDA does: every op on Triton (on the CPU: the interpreter), and no CPU
    panels (as where the C++ kernels cannot build), so 4-bit projections become `PackedInt4`s."""
    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.setattr(cpu_kernels, "segment_attention_kernel", lambda: None)
    monkeypatch.setattr(cpu_decode, "segment_attention_kernel", lambda: None)


def test_packed_int4_holds_gptq_words(tmp_path):
    """`pack_int4` lays the values out as GPTQ's own qweight (words along k, low nibble first), and
    its values and dequantized weight are those of the `Int4Weight`, act order included."""
    _, path = quantized_checkpoint(tmp_path, "gptq", act_order=True, v1=False)
    tensors = load_file(path / "model.safetensors")
    base = "model.layers.1.mlp.down_proj"
    w = read_int4_for_test(tensors, base, path)
    packed = pack_int4(w.q, w.scales, w.zeros, w.groups(), "cpu")
    assert torch.equal(packed.qweight, tensors[base + ".qweight"])
    assert torch.equal(packed.g_idx, tensors[base + ".g_idx"].int())
    assert torch.equal(packed.values(), w.q) and torch.equal(packed.dequantize(), w.dequantize())
    assert packed.shape == w.shape and packed.nbytes < w.shape[0] * w.shape[1]  # (about half a byte a weight)
    with pytest.raises(ValueError, match="k must be a multiple of 8"):
        pack_int4(w.q[:, :12], w.scales, w.zeros, w.groups()[:12], "cpu")
    with pytest.raises(ValueError, match="groups"):
        pack_int4(w.q, w.scales, w.zeros[:, :1], w.groups(), "cpu")


def read_int4_for_test(tensors, base: str, path) -> Int4Weight:
    from lengthwise.model.config import ModelConfig
    from lengthwise.model.int4 import read_int4

    return read_int4(tensors, base, ModelConfig.from_dir(path).quantization)


@pytest.mark.parametrize("variant", ["gptq", "awq", "gptq-act-order", "gptq-uneven-groups",
                                     "gptq-act-order-per-linear", "awq-partly-dense"])
def test_quantized_checkpoints_on_the_triton_kernel(variant, tmp_path, monkeypatch):
    """Where the W4A16 kernel runs (CUDA; without a GPU the interpreter), a checkpoint's projections
    stay 4-bit whatever their groups (the kernel looks each input's group up: act order and
    unequal groups too: o and down stay 4-bit); a fused projection whose parts have different
    groups (as the builder gives q, k, v for those two variants), or a part left dense, is
    dequantized. No dense copy of a 4-bit projection is allocated. Prefill (the tl.dot path) and
    greedy decode (the GEMV path) against transformers on the dequantized weights."""
    kwargs = {"gptq": dict(method="gptq"), "awq": dict(method="awq"),
              "gptq-act-order": dict(method="gptq", act_order=True),
              "gptq-uneven-groups": dict(method="gptq", act_order="uneven"),
              "gptq-act-order-per-linear": dict(method="gptq", act_order="per-linear"),
              "awq-partly-dense": dict(method="awq", dense_layers=("0.mlp.down_proj",),
                                       modules_to_not_convert=["down_proj"])}[variant]
    hf, path = quantized_checkpoint(tmp_path, **kwargs)
    _on_the_triton_kernel(monkeypatch)
    model = load_model(path, "float32", KERNEL_DEVICE)
    kinds = {(i, name): type(getattr(layer, name)) for i, layer in enumerate(model.layers)
             for name in QUANTIZED_WEIGHTS}
    fused_parts_differ = {(i, n) for i in (0, 1) for n in ("qkv_weight", "gate_up_weight")}
    dense_ones = {"gptq-act-order-per-linear": fused_parts_differ, "gptq-uneven-groups": fused_parts_differ,
                  "awq-partly-dense": {(0, "down_weight")}}.get(variant, set())
    assert {key for key, kind in kinds.items() if kind is not PackedInt4} == dense_ones
    assert all(isinstance(getattr(model.layers[i], n), torch.nn.Parameter) for i, n in dense_ones)
    projection_bytes = sum(p.nbytes for name, p in model.named_parameters() if name.split(".")[-1] in QUANTIZED_WEIGHTS)
    assert projection_bytes == sum(getattr(model.layers[i], n).nbytes for i, n in dense_ones)
    prompts = _prompts(hf.config.vocab_size)
    assert _rel_err(prompt_logits(model, prompts).cpu(), _hf_last_logits(hf, prompts)) < 1e-4
    outs = generate(model, prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts[:2], outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt):]
        assert out.token_ids == ref.tolist()


def test_int4_quantization_on_the_triton_kernel(hf_checkpoint, monkeypatch):
    """quantization="int4" where the W4A16 kernel runs: each projection becomes the `PackedInt4` of
    `quantize_int4` of its weight, and the kernel's logits and greedy tokens match the torch
    reference's (which dequantizes at every call). (bfloat16 and float16 activations: the kernel
    tests in test_ops_triton.py.)"""
    path = hf_checkpoint("llama")[1]
    plain = load_model(path, "float32", KERNEL_DEVICE)
    _on_the_triton_kernel(monkeypatch)
    quant = load_model(path, "float32", KERNEL_DEVICE, quantization="int4")
    assert quant.quantization == "int4"
    for lp, lq in zip(plain.layers, quant.layers, strict=True):
        for name in QUANTIZED_WEIGHTS:
            w, expected = getattr(lq, name), quantize_int4(dense(getattr(lp, name)))
            assert isinstance(w, PackedInt4) and torch.equal(w.values(), expected.q)
            assert torch.equal(w.dequantize(), expected.dequantize())
    assert not any(name.split(".")[-1] in QUANTIZED_WEIGHTS for name, _ in quant.named_parameters())
    prompts = _prompts(plain.config.vocab_size)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kernel, kernel_tokens = prompt_logits(quant, prompts), generate(quant, prompts[:2], params)
    monkeypatch.setenv(KERNELS_ENV, "torch")
    reference, reference_tokens = prompt_logits(quant, prompts), generate(quant, prompts[:2], params)
    assert _rel_err(kernel, reference) < 1e-4
    assert [o.token_ids for o in kernel_tokens] == [o.token_ids for o in reference_tokens]
    assert _rel_err(reference, prompt_logits(plain, prompts)) > 1e-3  # (it is quantized)


def test_int4_on_the_triton_kernel_keeps_odd_widths_dense(monkeypatch, tmp_path):
    """A projection whose input width is not a multiple of 8 (stories260k's down projection: 172)
    cannot be held in the kernel's words: quantized, but kept as its dequantized weight."""
    from conftest import save_hf_model

    path = save_hf_model(make_hf_model("llama", intermediate_size=100), tmp_path / "odd")
    _on_the_triton_kernel(monkeypatch)
    model = load_model(path, "float32", KERNEL_DEVICE, quantization="int4")
    layer = model.layers[0]
    assert isinstance(layer.gate_up_weight, PackedInt4) and isinstance(layer.down_weight, torch.nn.Parameter)
    assert not layer.quantized  # (nothing kept beside it: no CPU panels on this route)
    expected = quantize_int4(dense(load_model(path, "float32", KERNEL_DEVICE).layers[0].down_weight))
    assert torch.equal(layer.down_weight, expected.dequantize())


@requires_cuda
@pytest.mark.parametrize("method, dtype", [("gptq", "float16"), ("awq", "bfloat16")])
def test_quantized_checkpoints_on_cuda(method, dtype, tmp_path):
    """On a GPU the projections are `PackedInt4`s on the device (act-ordered GPTQ as stored); logits
    match transformers within 16-bit rounding, and the engine's graphed decode steps give the
    tokens of plain eager steps."""
    hf, path = quantized_checkpoint(tmp_path, method, act_order=method == "gptq")
    llm = LLM(path, device="cuda", dtype=dtype, kv_cache_memory=1 << 26)
    model = llm.engine.model
    assert all(isinstance(getattr(layer, name), PackedInt4) and getattr(layer, name).device.type == "cuda"
               for layer in model.layers for name in QUANTIZED_WEIGHTS)
    prompts = _prompts(hf.config.vocab_size)
    assert _rel_err(prompt_logits(model, prompts).float().cpu(), _hf_last_logits(hf, prompts)) < 3e-2
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    graphed = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    eager = generate(model, prompts, params)
    assert [o.outputs[0].token_ids for o in graphed] == [o.token_ids for o in eager]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_kernels_counts_4bit_projections(dtype, tmp_path, monkeypatch):
    """`bench kernels` on a model whose projections run on the W4A16 kernel: the streamed bytes are
    the 4-bit ones, and each projection has a row for the kernel the model really runs."""
    from lengthwise.bench.kernels import kernel_rows, streamed_weight_bytes

    _, path = quantized_checkpoint(tmp_path, "gptq")
    _on_the_triton_kernel(monkeypatch)
    model = load_model(path, dtype, KERNEL_DEVICE)
    streamed, form = streamed_weight_bytes(path, model)
    dense_bytes, dense_form = streamed_weight_bytes(path, _dequantized(path, dtype, monkeypatch))
    assert form == f"{dtype}, 8 projections int4" and dense_form == dtype
    int4 = [getattr(layer, n) for layer in model.layers for n in QUANTIZED_WEIGHTS]
    assert dense_bytes - streamed == sum(w.n * w.k * model.dtype.itemsize - w.nbytes for w in int4) > 0
    rows = {r["kernel"]: r for r in kernel_rows(model, 1, 10.0, 100.0, model.dtype)}
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert rows[f"{name} (4-bit)"]["bytes"] < rows[name]["bytes"] / 2


def _dequantized(path, dtype, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "torch")  # (no Triton: the 4-bit projections are dequantized at load)
    model = load_model(path, dtype, KERNEL_DEVICE)
    monkeypatch.setenv(KERNELS_ENV, "triton")
    return model


# Every decoder projection of a sparse checkpoint as saved: attention, experts, Qwen2-MoE's shared
# expert (the routers and the shared-expert gate stay unquantized, as GPTQ and AWQ leave them).
_SPARSE_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_expert\.|experts\.\d+\.)"
                                r"(gate|up|down)_proj|(block_sparse_moe|mlp)\.experts\.\d+\.w[123])\.weight")


def quantized_moe_checkpoint(tmp_path, family: str, method: str, group_size: int = 32):
    """(transformers model on the dequantized weights, 4-bit checkpoint dir) of a mixture-of-experts
    `family`: every projection of the saved checkpoint quantized as `quantized_checkpoint` does
    (in input order), the reference loaded by transformers from the dequantized weights (it holds
    experts fused in memory, so they go through its own loading)."""
    import transformers

    hf = make_hf_model(family)
    ref_dir, quant_dir = tmp_path / f"{family}-dense", tmp_path / f"{family}-{method}"
    hf.save_pretrained(ref_dir)
    tensors = load_file(ref_dir / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    stored = {}
    names = [n for n in tensors if _SPARSE_PROJECTION.fullmatch(n)]
    assert any(".experts." in n for n in names)
    for name in names:
        w = tensors[name].float()
        n, k = w.shape
        groups = -(-k // group_size)
        g_idx = torch.arange(k) // group_size
        scales = (0.005 + 0.02 * torch.rand(n, groups, generator=g)).half().float()
        zeros = torch.randint(1, 16, (n, groups), generator=g)
        q = torch.round(w / scales[:, g_idx] + zeros[:, g_idx]).clamp(0, 15).to(torch.uint8)
        tensors[name] = ((q.float() - zeros[:, g_idx]) * scales[:, g_idx]).contiguous()
        packed = _gptq_tensors(q, zeros, scales, g_idx, True) if method == "gptq" else _awq_tensors(q, zeros, scales)
        stored.update({f"{name.removesuffix('.weight')}.{key}": t for key, t in packed.items()})
    save_file(tensors, ref_dir / "model.safetensors", metadata={"format": "pt"})
    reference = getattr(transformers, type(hf).__name__).from_pretrained(ref_dir).eval()
    hf.save_pretrained(quant_dir)
    dense_rest = {n: t for n, t in tensors.items() if n not in names}
    save_file({**dense_rest, **stored}, quant_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quant_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group_size,
                                     **({"desc_act": False, "sym": False} if method == "gptq"
                                        else {"version": "gemm", "zero_point": True})}
    (quant_dir / "config.json").write_text(json.dumps(config))
    return reference, quant_dir


@pytest.mark.parametrize("family, method", [("qwen3-moe", "gptq"), ("mixtral", "awq"), ("qwen2-moe", "gptq")])
@pytest.mark.parametrize("route", ["cpu-panels", "triton"])
def test_quantized_moe_checkpoints(family, method, route, tmp_path, monkeypatch):
    """Quantized mixture-of-experts checkpoints (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared
    expert): every expert stays 4-bit, as 4-bit panels on the CPU (the fused step's expert kernel
    reads them) or as one `PackedInt4` per expert on the W4A16 kernel; logits and greedy tokens
    against transformers on the dequantized weights."""
    hf, path = quantized_moe_checkpoint(tmp_path, family, method)
    if route == "triton":
        _on_the_triton_kernel(monkeypatch)
        model = load_model(path, "float32", KERNEL_DEVICE)
    else:
        model = load_model(path, "float32", "cpu")
    sparse = [layer for layer in model.layers if layer.moe is not None]
    assert sparse
    for layer in sparse:
        if route == "triton":
            assert all(isinstance(w, PackedInt4) for w in (*layer.experts_gate_up, *layer.experts_down))
        else:
            assert {w.dtype for pair in layer.experts_gate_up for w in pair} == {cpu_kernels.INT4}
            assert {w.dtype for w in layer.experts_down} == {cpu_kernels.INT4}
    assert not any(p.is_meta for p in model.parameters())
    prompts = _prompts(hf.config.vocab_size)
    assert _rel_err(prompt_logits(model, prompts).cpu(), _hf_last_logits(hf, prompts)) < 1e-4
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = generate(model, prompts[:3], params)
    if route == "cpu-panels":
        assert model._cpu_decode_pointers is not None  # the fused step ran on the 4-bit experts
    for prompt, out in zip(prompts[:3], outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0, len(prompt):]
        assert out.token_ids == ref.tolist()

"""Weight-only quantization of a loaded model: `quantization="int8"` or `"int4"`.

A batch-1 decode step reads every weight once per token, so on the CPU its floor is weight bytes /
memory bandwidth. `int8` stores the decoder's projections with one float32 scale per output row
(symmetric, absmax / 127: gpt-fast's and torchao's int8 weight-only scheme), a quarter of the
bytes of float32; `int4` rounds groups of 128 inputs to 4 bits with a scale and zero point each
(`lengthwise.model.int4`, the format GPTQ and AWQ checkpoints load into), about an eighth. On a
packed CPU model (the default: `lengthwise.ops.cpu.decode.pack_model`) the quantized panels are
the only copy: the fused decode path and prefill's panel GEMM read them, and the torch reference
unpacks the dequantized weights. A model kept dense (`LENGTHWISE_CPU_PACKED_WEIGHTS=0`) holds the
dequantized weights as its parameters and the quantized values for the fused path beside them.
Either way every path computes the same model. On CUDA (wherever Triton runs, in the model's
dtype) `int4` replaces each projection by its 4-bit values (`lengthwise.ops.int4.PackedInt4`),
which the W4A16 kernel dequantizes in registers; `int8` stays CPU-only. Activations, the KV cache, norms, embeddings and
the LM head are not quantized (vLLM's quantization methods leave the LM head too); on a packed
model they may be held in bfloat16 where that is exact. (A GPTQ or AWQ checkpoint arrives
quantized: `check_quantization` only checks that `quantization` agrees with it.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.config import QUANTIZATION_METHODS
from lengthwise.model.config import CHECKPOINT_QUANTIZATIONS, ModelConfig
from lengthwise.model.int4 import Int4Weight, quantize_int4
from lengthwise.ops.dispatch import triton_runs_on
from lengthwise.ops.int4 import PackedInt4, pack_int4

# The decoder layer's projections (`DecoderLayer` attributes) that quantization replaces, and a
# sparse layer's stacked experts (each expert quantized as a matrix of its own).
QUANTIZED_WEIGHTS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
EXPERT_WEIGHTS = ("experts_gate_up", "experts_down")


@dataclass(frozen=True)
class Int8Weight:
    """A `[n, k]` weight as `q [n, k]` int8 times `scales [n]` (float32, one per output row)."""

    q: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]

    def rows(self, rows: slice) -> Int8Weight:
        return Int8Weight(self.q[rows], self.scales[rows])


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8: `scales = absmax(row) / 127`, `q = round(w / scale)` in [-127, 127].
    An all-zero row gets scale 1 (and q 0), so nothing divides by zero."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scales)


def int4_kernel_route(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether 4-bit weights stay 4-bit on the Triton W4A16 kernel (`lengthwise.ops.int4`): wherever
    Triton runs (CUDA), except where the CPU's fused path packs its own 4-bit panels (float32 on a
    CPU where its kernels build; tests force Triton on the CPU)."""
    from lengthwise.ops import cpu as cpu_ops

    cpu_panels = device.type == "cpu" and dtype == torch.float32 and cpu_ops.segment_attention_kernel() is not None
    return triton_runs_on(device) and not cpu_panels


def to_packed_int4(weight: Int4Weight, device: torch.device) -> PackedInt4:
    """`weight` as the W4A16 kernel reads it, on `device`."""
    return pack_int4(weight.q, weight.scales, weight.zeros, weight.groups(), device)


def set_int4(layer: torch.nn.Module, name: str, weight: Int4Weight | list[Int4Weight]) -> None:
    """Make `layer.<name>` the 4-bit `weight` as the W4A16 kernel reads it (`PackedInt4`, on the
    layer's device; a sparse layer's experts: one per expert), in place of its dense parameter."""
    device = layer.input_norm.device
    packed = [to_packed_int4(w, device) for w in weight] if isinstance(weight, list) else to_packed_int4(weight, device)
    del layer._parameters[name]
    setattr(layer, name, packed)


def check_quantization(quantization: str | None, device: torch.device, dtype: torch.dtype,
                       config: ModelConfig | None = None) -> None:
    """Refuse, naming the field, a method we do not have or a device/dtype it does not run on (int8
    and int4 quantize the decoder projections and a sparse layer's experts alike). A GPTQ/AWQ
    checkpoint (`config`) takes `quantization` None or its own method (it runs on any device: 4-bit
    on the CPU's float32 path and on the Triton kernel, dequantized elsewhere); those methods need
    such a checkpoint."""
    checkpoint = config.quantization.method if config is not None and config.quantization is not None else None
    if checkpoint is not None:
        if quantization not in (None, checkpoint):
            raise ValueError(f"quantization={quantization!r}, but the checkpoint is quantized with {checkpoint}: "
                             f"leave quantization unset (or {checkpoint!r})")
        return  # (4-bit panels on the CPU in float32, dequantized weights elsewhere)
    if quantization in CHECKPOINT_QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} loads a {quantization.upper()} checkpoint (config.json "
                         f"quantization_config), and this one is not quantized; quantize it with 'int4' or 'int8'")
    if quantization is None:
        return
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} or None, "
                         f"got {quantization!r}")
    if quantization == "int4" and int4_kernel_route(device, dtype):
        return  # (the Triton W4A16 kernel, in the model's dtype)
    if quantization == "int4" and device.type != "cpu":
        raise ValueError(f"quantization='int4' on {device.type} runs on the Triton W4A16 kernel, and Triton does "
                         f"not run here (triton does not import, or LENGTHWISE_KERNELS=torch)")
    if device.type != "cpu":
        raise ValueError(f"quantization={quantization!r} is weight-only quantization for the CPU's fused decode path; "
                         f"on {device.type} it would only add error (serve the checkpoint's own dtype there)")
    if dtype != torch.float32:
        raise ValueError(f"quantization={quantization!r} needs dtype float32 (the fused CPU path computes in "
                         f"float32), got {dtype}")


def quantize_model(model: torch.nn.Module, quantization: str) -> None:
    """Quantize `model`'s decoder projections in place (see the module docstring): a packed model
    is unpacked, quantized and packed again (int8 or 4-bit panels); on a dense one the parameters
    become the dequantized weights and each layer's `quantized` maps a weight's name to its
    `Int8Weight` or `Int4Weight`, which the fused CPU path packs."""
    from lengthwise.ops.cpu import decode as cpu_decode

    check_quantization(quantization, model.device, model.dtype, model.config)
    if model.quantization is not None:
        raise ValueError(f"quantization={quantization!r}: the model is already quantized as {model.quantization!r}")
    packed = cpu_decode.is_packed(model)
    cpu_decode.unpack_model(model)  # (a packed model: dense again, quantized, packed again below)
    method = quantize_int8 if quantization == "int8" else quantize_int4
    kernel = quantization == "int4" and int4_kernel_route(model.device, model.dtype)
    for layer in model.layers:
        for name in QUANTIZED_WEIGHTS:
            param = getattr(layer, name)
            if param is None:  # (a sparse layer without a shared expert)
                continue
            quantized = method(param.data)
            if kernel and param.shape[1] % 8 == 0:
                set_int4(layer, name, quantized)
                continue
            param.data.copy_(quantized.dequantize())
            if not kernel:  # (for the CPU's panels; on the Triton route a k its words cannot hold stays dense)
                layer.quantized[name] = quantized
        for name in EXPERT_WEIGHTS if layer.moe is not None else ():
            stacked = getattr(layer, name)
            experts = [method(w) for w in stacked.data]
            if kernel and stacked.shape[2] % 8 == 0:
                set_int4(layer, name, experts)
                continue
            stacked.data.copy_(torch.stack([w.dequantize() for w in experts]))
            if not kernel:
                layer.quantized[name] = experts
    model.quantization = quantization
    model._cpu_decode_pointers = None  # packed before quantizing: pack again
    if model.device.type == "cuda":  # the dense weights' blocks back to the device, for the KV cache's sizing
        torch.cuda.empty_cache()
    if packed:
        cpu_decode.pack_model(model)

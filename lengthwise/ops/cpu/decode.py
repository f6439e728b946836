"""The fused decode forward on the CPU: a decode step through every layer in one C++ call.

The op-by-op torch path spends about half of a batch-1 decode step outside the matmuls (some 50
small ops per layer, each with its dispatch and OpenMP fork/join); `decode_forward.cpp` runs the
whole decoder with one parallel region, so a step costs about what reading the weights costs.
`CausalLM.forward` takes this path when `eligible` says so (up to 256 tokens, at most 16 new ones
per sequence), LoRA adapters' rows included (`lora.h`: each adapter's updates are added inside the
same call); everything else (long prefill chunks, bfloat16 models, GPUs, an explicit
`LENGTHWISE_KERNELS`) keeps the op-by-op path, which is also the reference the tests compare this
one against.

The matmuls read the weights as panels (`PackedWeight`). `pack_model` (the loader calls it for CPU
float32 models) makes the panels the model's only copy of its projections, so the op-by-op path
reads them too; a model left dense gets a second, packed copy here at its first fused step.
"""

from __future__ import annotations

import ctypes
import itertools
import os

import torch

from lengthwise.kv.storage import KVCacheStorage
from lengthwise.model.int4 import Int4Weight
from lengthwise.model.quantize import Int8Weight
from lengthwise.ops.attention import AttentionMetadata
from lengthwise.ops.cpu import (
    AnyWeight,
    PackedWeight,
    attention_order,
    dense,
    kv_kind,
    pack_int4_panels,
    pack_panels,
    packed_linear,
    segment_attention_kernel,
)
from lengthwise.ops.dispatch import kernel_choice
from lengthwise.ops.int4 import PackedInt4
from lengthwise.ops.lora import PROJECTIONS as LORA_PROJECTIONS
from lengthwise.ops.lora import AdapterWeights, LoRABatch, LoRAWeight
from lengthwise.ops.rotary import rotary_cos_sin

FUSED_ENV = "LENGTHWISE_CPU_FUSED"            # "0" keeps the op-by-op path (an A/B switch)
MAX_ROWS_ENV = "LENGTHWISE_CPU_FUSED_MAX_ROWS"
BF16_PANELS_ENV = "LENGTHWISE_CPU_BF16_PANELS"  # "0" packs bfloat16-exact weights as float32 (A/B)
PACKED_WEIGHTS_ENV = "LENGTHWISE_CPU_PACKED_WEIGHTS"  # "0": keep dense weights, panels as a second copy
# The decoder layer's projections, which the fused path reads as panels.
PROJECTIONS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
# Steps with at most this many tokens take the fused path (it beat MKL and oneDNN at every decode
# batch up to 256 measured: `benchmarks/cpu_decode_candidates.py`, docs/benchmarks.md).
DEFAULT_MAX_ROWS = 256
# ... and only if no sequence brings more new tokens than this: its attention reads the context once
# per query row, which for a long prefill chunk is far slower than SDPA's blocked matmuls.
MAX_QUERY_LEN = 16


def max_rows() -> int:
    """The most tokens a step may have to take the fused path (`LENGTHWISE_CPU_FUSED_MAX_ROWS`)."""
    raw = os.environ.get(MAX_ROWS_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_MAX_ROWS
    except ValueError:
        raise ValueError(f"{MAX_ROWS_ENV} must be an integer, got {raw!r}") from None


def eligible(model: torch.nn.Module, num_tokens: int, max_query_len: int = 1) -> bool:
    """Whether a step of `num_tokens` tokens, at most `max_query_len` of them from any one sequence,
    through `model` can take the fused path."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return False
    # Only the default choice: `LENGTHWISE_KERNELS=torch` asks for the reference ops and `=triton`
    # for the Triton kernels (the interpreter tests run whole models through them on the CPU).
    if os.environ.get(FUSED_ENV, "1") == "0" or kernel_choice() != "auto":
        return False
    lib = segment_attention_kernel()
    if lib is None or not 0 < num_tokens <= max_rows() or max_query_len > MAX_QUERY_LEN:
        return False
    c = model.config
    return c.num_heads <= lib.max_heads and c.head_dim <= lib.max_head_dim and c.head_dim % 2 == 0


def packs_weights(model: torch.nn.Module) -> bool:
    """Whether `load_model` stores `model`'s projections only as panels (`pack_model`): float32 on
    a CPU where the kernels build, unless `LENGTHWISE_CPU_PACKED_WEIGHTS=0`."""
    return (model.device.type == "cpu" and model.dtype == torch.float32 and segment_attention_kernel() is not None
            and os.environ.get(PACKED_WEIGHTS_ENV, "1") != "0")


def is_packed(model: torch.nn.Module) -> bool:
    return getattr(model, "head_panels", None) is not None


def pack_model(model: torch.nn.Module) -> None:
    """Store `model`'s decoder projections once, as the fused path's panels, dropping the dense
    parameters: a bfloat16 checkpoint then takes 2 bytes per weight on the CPU instead of the 4 of
    float32 plus the panels' second copy, an int8 model 1, a 4-bit one about half. Every path reads the panels (`linear`
    runs them on the panel GEMM, as fast as MKL at prefill sizes; the torch reference and Triton
    unpack them). The LM head is packed too; the embedding stays dense (tied, beside the head's
    panels), in bfloat16 if all its values are bfloat16 ones (`embed_tokens` widens the rows)."""
    if is_packed(model):
        return
    for layer in model.layers:
        for name in PROJECTIONS:
            if getattr(layer, name) is None:  # (a sparse layer without a shared expert)
                continue
            packed = packed_weight(layer, name)
            del layer._parameters[name]
            setattr(layer, name, packed)
        if layer.moe is not None:
            gate_up, down = packed_experts(layer)
            for name, packed in (("experts_gate_up", gate_up), ("experts_down", down)):
                del layer._parameters[name]
                setattr(layer, name, packed)
        layer.quantized.clear()  # the int8 or 4-bit panels hold them now
    model.head_panels = pack_panels(_narrowest_exact(model.lm_head))
    tied = model.config.tie_word_embeddings
    if not tied:
        del model._parameters["lm_head"]
        model.lm_head = model.head_panels
    embed = _narrowest_exact(model.embed.data)  # a step reads one row of it: kept dense, but narrow
    if embed.dtype != model.embed.dtype:
        _set_embed(model, embed)
    model._cpu_decode_pointers = None


def _set_embed(model: torch.nn.Module, embed: torch.Tensor) -> None:
    model.embed = torch.nn.Parameter(embed, requires_grad=False)
    if model.config.tie_word_embeddings:
        model.lm_head = model.embed


def unpack_model(model: torch.nn.Module) -> None:
    """Undo `pack_model`: dense float32 parameters again (quantizing a packed model goes through this)."""
    if not is_packed(model):
        return
    if model.quantization is not None:  # (its int8 or 4-bit values would come back as floats, 4-8x larger)
        raise ValueError(f"unpack_model: a model quantized as {model.quantization!r} stays packed; "
                         f"load the checkpoint again for dense weights")
    for layer in model.layers:
        for name in PROJECTIONS:
            if getattr(layer, name) is None:
                continue
            weight = dense(getattr(layer, name))
            delattr(layer, name)
            layer.register_parameter(name, torch.nn.Parameter(weight, requires_grad=False))
        if layer.moe is not None:
            for name in ("experts_gate_up", "experts_down"):
                weight = torch.stack([dense(w) for w in getattr(layer, name)])
                delattr(layer, name)
                layer.register_parameter(name, torch.nn.Parameter(weight, requires_grad=False))
    if model.embed.dtype != model.dtype:
        _set_embed(model, model.embed.data.to(model.dtype))
    if not model.config.tie_word_embeddings:
        head = model.head_panels.unpack()
        delattr(model, "lm_head")
        model.register_parameter("lm_head", torch.nn.Parameter(head, requires_grad=False))
    model.head_panels = None
    model._cpu_decode_pointers = None


def packed_weight(layer: torch.nn.Module, name: str) -> PackedWeight | tuple[PackedWeight, PackedWeight]:
    """`layer`'s projection `name` as panels: its own if the model is packed, else packed now, in the
    fewest bytes that give the same products: int8 or 4-bit panels for a quantized model, bfloat16 where
    every weight of the matrix is a bfloat16 value (any bfloat16 checkpoint served in float32), else
    float32. The gate-up projection comes as (gate, up): the fused path computes both halves of
    the same columns back to back."""
    weight: AnyWeight = getattr(layer, name)
    if not isinstance(weight, torch.Tensor):
        return weight
    quantized = layer.quantized.get(name)
    halves = [slice(None)] if name != "gate_up_weight" else [slice(0, weight.shape[0] // 2),
                                                             slice(weight.shape[0] // 2, None)]
    # The format is chosen for the whole matrix: the fused path reads gate and up in one format.
    narrow = _narrowest_exact(weight) if quantized is None else None
    packed = [_pack_quantized(quantized.rows(rows)) if quantized is not None
              else pack_panels(narrow[rows]) for rows in halves]
    return packed[0] if len(packed) == 1 else (packed[0], packed[1])


def _pack_quantized(w: Int8Weight | Int4Weight) -> PackedWeight:
    if isinstance(w, Int4Weight):
        grouped, perm = w.in_group_order()  # (the loader keeps only weights whose groups sort into runs)
        return pack_int4_panels(grouped.q, grouped.scales, grouped.zeros, grouped.group_size, perm)
    return pack_panels(w.q, w.scales)


def packed_experts(layer: torch.nn.Module) -> tuple[list[tuple[PackedWeight, PackedWeight]], list[PackedWeight]]:
    """A sparse layer's experts as panels: per expert (gate, up) and down; its own if the model is
    packed, else packed now. One format for all of a layer's experts (the fused path reads them in
    the first one's): int8 or 4-bit for quantized experts, else bfloat16 where every expert
    weight is a bfloat16 value, else float32."""
    gate_up, down = layer.experts_gate_up, layer.experts_down
    if not isinstance(down, torch.Tensor):
        return gate_up, down
    if "experts_down" in layer.quantized:  # int8 or 4-bit experts (`quantize_model`, a GPTQ/AWQ checkpoint)
        halves = [(w.rows(slice(0, w.q.shape[0] // 2)), w.rows(slice(w.q.shape[0] // 2, None)))
                  for w in layer.quantized["experts_gate_up"]]
        return ([(_pack_quantized(g), _pack_quantized(u)) for g, u in halves],
                [_pack_quantized(w) for w in layer.quantized["experts_down"]])
    gate_up, down = _narrowest_exact(gate_up), _narrowest_exact(down)
    if gate_up.dtype != down.dtype:
        gate_up, down = layer.experts_gate_up, layer.experts_down
    inter = gate_up.shape[1] // 2
    return ([(pack_panels(w[:inter]), pack_panels(w[inter:])) for w in gate_up],
            [pack_panels(w) for w in down])


def projection_panels(model: torch.nn.Module) -> list[PackedWeight | PackedInt4]:
    """The packed weights `model`'s layers hold as their projections and experts: CPU panels, or
    the Triton kernel's 4-bit weights (none for a dense model)."""
    weights = [getattr(layer, name) for layer in model.layers for name in PROJECTIONS]
    for layer in model.layers:
        if layer.moe is not None and not isinstance(layer.experts_down, torch.Tensor):
            weights += [*layer.experts_gate_up, *layer.experts_down]
    return [w for weight in weights for w in _as_tuple(weight) if isinstance(w, PackedWeight | PackedInt4)]


def _as_tuple(weight: object) -> tuple:
    """A projection as a tuple of its panels: gate-up is packed as two halves, the rest as one."""
    return weight if isinstance(weight, tuple) else (weight,)


def held_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights `model` holds: its dense parameters and every set of panels (its own, and
    the fused path's second copy of a model that is not packed)."""
    ptrs = getattr(model, "_cpu_decode_pointers", None)
    extra = [*ptrs.keep, ptrs.lm_head] if ptrs else []
    panels = {id(w): w for w in (*projection_panels(model), *extra, model.head_panels) if w is not None}
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(w.nbytes for w in panels.values())


class _Pointers:
    """Every layer's packed weights and cache addresses as one C array, built once per (model, cache).

    The matmuls read weights in `decode_forward.cpp`'s panel layout: the model's own where it is
    packed (`pack_model`), else a copy packed here (`packed_weight`) beside the dense parameters."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCacheStorage) -> None:
        self.keep: list[PackedWeight] = []  # the packed weights, alive as long as the pointers
        ptrs: list[int | None] = []
        self.expert_tables: list[ctypes.Array] = []  # per sparse layer: its experts' 3E panel addresses
        self.expert_bytes = 0  # of the panels in `keep`, the experts' (a batch-1 step reads top_k / E)
        for i, layer in enumerate(model.layers):
            dense_mlp = layer.gate_up_weight is not None
            ptrs += [self._addr(layer.input_norm), self._pack(layer, "qkv_weight"), self._addr(layer.qkv_bias),
                     self._addr(layer.q_norm), self._addr(layer.k_norm), self._pack(layer, "o_weight"),
                     self._addr(layer.o_bias), self._addr(layer.post_attn_norm),
                     *(self._pack(layer, "gate_up_weight") if dense_mlp else (None, None)),
                     self._addr(layer.gate_up_bias), self._pack(layer, "down_weight") if dense_mlp else None,
                     self._addr(layer.down_bias), self._addr(kv_cache.k[i]), self._addr(kv_cache.v[i]),
                     *self._experts(layer), self._addr(layer.shared_gate_weight)]
        self.layers = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.windows = (ctypes.c_int32 * len(model.layers))(*(layer.sliding_window or 0 for layer in model.layers))
        self.inters = (ctypes.c_int32 * len(model.layers))(*map(_mlp_width, model.layers))
        self.lm_head = model.head_panels if is_packed(model) else pack_panels(_narrowest_exact(model.lm_head))
        self.key = _key(model, kv_cache)

    @staticmethod
    def _addr(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if not t.is_contiguous():
            raise ValueError("the fused CPU decode path needs contiguous norms, biases and caches")
        return t.data_ptr()

    def _experts(self, layer: torch.nn.Module) -> tuple[int | None, int | None]:
        """A sparse layer's router (a packed copy) and the address of its experts' panel table."""
        if layer.moe is None:
            return None, None
        router = pack_panels(_narrowest_exact(layer.router_weight.data))
        gate_up, down = packed_experts(layer)
        weights = [w for (gate, up), d in zip(gate_up, down, strict=True) for w in (gate, up, d)]
        if len({w.dtype for w in weights}) != 1:
            raise ValueError("a sparse layer's expert panels must share one format")
        if any(w.perm is not None for w in weights):  # (experts_omp reads inputs in their own order)
            raise ValueError("a sparse layer's expert panels cannot reorder their inputs")
        self.keep += [router, *weights]
        self.expert_bytes += sum(w.nbytes for w in weights)
        table = (ctypes.c_void_p * len(weights))(*(w.address for w in weights))
        self.expert_tables.append(table)
        return router.address, ctypes.addressof(table)

    def _pack(self, layer: torch.nn.Module, name: str) -> int | list[int]:
        packed = packed_weight(layer, name)
        if isinstance(packed, tuple):
            if len({p.dtype for p in packed}) != 1:  # decode_forward.cpp reads both in gate's format
                raise ValueError(f"{name}: gate and up panels must share one format, got "
                                 f"{[str(p.dtype) for p in packed]}")
            gate, up = packed  # ... and gathers their inputs in gate's order
            same = gate.perm is None if up.perm is None else gate.perm is not None and torch.equal(gate.perm, up.perm)
            if not same:
                raise ValueError(f"{name}: gate and up panels must read their inputs in one order")
            self.keep += packed
            return [p.address for p in packed]
        self.keep.append(packed)
        return packed.address

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed weights a step streams (LM head included)."""
        return sum(p.nbytes for p in self.keep) + self.lm_head.nbytes


def _mlp_width(layer: torch.nn.Module) -> int:
    """The width of a layer's dense MLP (a sparse layer's shared expert), 0 for none."""
    down = layer.down_weight
    return 0 if down is None else down.k if isinstance(down, PackedWeight) else down.shape[1]


def _narrowest_exact(w: torch.Tensor) -> torch.Tensor:
    """`w` as bfloat16 if that loses nothing (and `LENGTHWISE_CPU_BF16_PANELS` is not "0"), else `w`."""
    if os.environ.get(BF16_PANELS_ENV, "1") == "0":
        return w
    narrow = w.bfloat16()
    for i in range(0, w.shape[0], 4096):  # in row chunks: no float32 copy of a whole LM head
        if not torch.equal(narrow[i:i + 4096].float(), w[i:i + 4096]):
            return w
    return narrow


def _key(model: torch.nn.Module, kv_cache: KVCacheStorage) -> tuple[int, ...]:
    qkv = model.layers[0].qkv_weight  # (a quantized or re-packed model gets new weights)
    return id(kv_cache), kv_cache.k[0].data_ptr(), (qkv if isinstance(qkv, torch.Tensor) else qkv.panels).data_ptr()


def _pointers(model: torch.nn.Module, kv_cache: KVCacheStorage) -> _Pointers:
    ptrs = getattr(model, "_cpu_decode_pointers", None)
    if ptrs is None or ptrs.key != _key(model, kv_cache):
        model._cpu_decode_pointers = None  # free the old packed copies before making new ones
        ptrs = model._cpu_decode_pointers = _Pointers(model, kv_cache)
    return ptrs


class _LoraProj(ctypes.Structure):
    """lora.h's `LoraProj`: one projection of one adapter (`at` null: not adapted)."""

    _fields_ = [("at", ctypes.c_void_p), ("bt", ctypes.c_void_p), ("rank", ctypes.c_int32),
                ("num_blocks", ctypes.c_int32), ("blocks", (ctypes.c_int32 * 4) * 3)]


class _LoraTable:
    """One adapter's projections for `decode_forward.cpp`, [layer][LORA_PROJECTIONS] (lora.h's order),
    built once per adapter. The kernels read `a` and `b` transposed, as the loader stores them (a
    copy only of a weight held otherwise)."""

    def __init__(self, weights: AdapterWeights) -> None:
        self.keep: list[torch.Tensor] = []
        self.rank = 0
        self.entries = (_LoraProj * (len(weights.layers) * len(LORA_PROJECTIONS)))()
        for i, layer in enumerate(weights.layers):
            for j, name in enumerate(LORA_PROJECTIONS):
                w = layer.get(name)
                if w is None:
                    continue
                _check_lora(w, name)
                at, bt = w.a.T.contiguous(), w.b.T.contiguous()
                self.keep += [at, bt]
                e = self.entries[i * len(LORA_PROJECTIONS) + j]
                e.at, e.bt, e.rank = at.data_ptr(), bt.data_ptr(), at.shape[1]
                blocks = w.nonzero_blocks()
                e.num_blocks = len(blocks)
                for b, block in enumerate(blocks):
                    e.blocks[b][:] = block
                self.rank = max(self.rank, at.shape[1])


def _check_lora(w: LoRAWeight, name: str) -> None:
    """What lora.h relies on: float32 CPU tensors, `a` [rank, k] and `b` [n, rank], at most three
    blocks, each inside `b`."""
    for t in (w.a, w.b):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name}: the fused CPU decode path needs float32 CPU adapters, got {t.dtype} on "
                             f"{t.device}")
    (rank, _), (n, b_rank) = w.a.shape, w.b.shape
    blocks = w.nonzero_blocks()
    if b_rank != rank or len(blocks) > 3 or any(not (0 <= c0 <= c1 <= n and 0 <= r0 <= r1 <= rank)
                                                for c0, c1, r0, r1 in blocks):
        raise ValueError(f"{name}: an update with a {tuple(w.a.shape)}, b {tuple(w.b.shape)} and blocks {blocks} "
                         f"is not one lora.h can read")


def _lora_step(lora: LoRABatch, num_tokens: int) -> tuple[ctypes.Array, torch.Tensor, torch.Tensor, int]:
    """A step's adapters for `lw_decode_forward`: their tables, the token rows using them grouped
    by adapter and each group's offset, and the largest rank among them."""
    tables = []
    for weights, _ in lora.groups:
        if "cpu_fused" not in weights.derived:
            weights.derived["cpu_fused"] = _LoraTable(weights)
        tables.append(weights.derived["cpu_fused"])
    rows = [torch.arange(num_tokens) if r is None else r.cpu() for _, r in lora.groups]
    offsets = torch.tensor([0, *itertools.accumulate(len(r) for r in rows)], dtype=torch.int32)
    array = (ctypes.c_void_p * len(tables))(*(ctypes.addressof(t.entries) for t in tables))
    return array, torch.cat(rows).to(torch.int32), offsets, max(t.rank for t in tables)


def logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`CausalLM.compute_logits` for a step that took `forward`: the LM head on its packed copy."""
    return packed_linear(hidden, model._cpu_decode_pointers.lm_head)


def forward(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_cache: KVCacheStorage, lora: LoRABatch | None = None) -> torch.Tensor:
    """The same result as `CausalLM.forward` (final-normed hidden states `[T, hidden]`, keys and values
    written into `kv_cache`, `lora`'s rows through their adapters), computed by `decode_forward.cpp`."""
    lib = segment_attention_kernel()
    ptrs = _pointers(model, kv_cache)
    c = model.config
    x = model.embed_tokens(input_ids).contiguous()
    cos, sin = rotary_cos_sin(positions, model.inv_freq, model.dtype, model.rope_scale)
    kt = meta.kernel_tensors()
    slots = meta.slot_mapping.to(torch.int64).contiguous()
    pos = positions.to(torch.int64).contiguous()
    out = torch.empty_like(x)
    p = ctypes.c_void_p
    moe = c.moe
    tables, rows, offsets, max_rank = _lora_step(lora, x.shape[0]) if lora is not None else (None,) * 3 + (0,)
    lib.lw_decode_forward(
        ptrs.layers, ptrs.windows, ptrs.inters, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
        c.head_dim, moe.num_experts if moe else 0, moe.top_k if moe else 0,
        moe.expert_intermediate_size if moe else 0, int(bool(moe and moe.norm_topk_prob)),
        c.rms_norm_eps, c.head_dim ** -0.5, p(model.final_norm.data_ptr()),
        p(x.data_ptr()), p(out.data_ptr()), x.shape[0], p(cos.data_ptr()), p(sin.data_ptr()), p(slots.data_ptr()),
        p(pos.data_ptr()), p(kt.query_start.data_ptr()), meta.num_seqs, p(kt.prompt_lens.data_ptr()),
        p(kt.response_lens.data_ptr()), p(kt.prompt_block_tables.data_ptr()), kt.prompt_block_tables.shape[1],
        p(kt.response_block_tables.data_ptr()), kt.response_block_tables.shape[1], meta.block_size,
        kv_kind(kv_cache.dtype), attention_order(), tables, None if rows is None else p(rows.data_ptr()),
        None if offsets is None else p(offsets.data_ptr()), 0 if tables is None else len(tables), max_rank,
        torch.get_num_threads())
    return out

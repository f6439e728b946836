"""Load a Hugging Face checkpoint directory into a `CausalLM`, fusing QKV and gate-up on the way.

Reads `model.safetensors` or the shards listed in `model.safetensors.index.json`. Every tensor is
checked against the shape the config implies, so a mismatched checkpoint fails with the tensor's
name rather than deep inside a matmul. A GPTQ or AWQ checkpoint stores its decoder projections as
4-bit `qweight`/`qzeros`/`scales` (`lengthwise.model.int4`): on the CPU in float32 they stay 4-bit
(the fused path's panels), on CUDA too (the Triton W4A16 kernel's `PackedInt4`); elsewhere they are
dequantized into the model's dtype. No dense copy of a 4-bit projection is ever allocated.
A base model saved without the "model." prefix loads too; one without an LM head (an embedding
checkpoint) loads with `CausalLM.generates` False: it embeds, the engine refuses to generate.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lengthwise.model.config import CheckpointError, ModelConfig, read_json
from lengthwise.model.int4 import Int4Weight, read_int4, stored_shapes
from lengthwise.model.llama import CausalLM
from lengthwise.model.quantize import check_quantization, int4_kernel_route, quantize_model, set_int4
from lengthwise.ops.cpu import decode as cpu_decode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"float": "float32", "half": "float16"}  # vLLM's other spellings
# Tensors some exporters leave in checkpoints that carry nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
_BARE = ("embed_tokens.", "layers.", "norm.")  # a bare base model's tensor names start so
# The decoder projections a GPTQ or AWQ checkpoint may store as 4-bit tensors.
# (A sparse layer's experts and Qwen2-MoE's shared expert too; never the router or the shared-expert gate.)
_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_expert\.|experts\.\d+\.)?"
                         r"(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight")


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` means float32 on the CPU (fastest there) and the checkpoint's own dtype on CUDA."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype == "auto":
        if device.type == "cpu" or config.torch_dtype not in DTYPES:
            return torch.float32
        return DTYPES[config.torch_dtype]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` picks CUDA when present. Asking for CUDA without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' naming the shard of each tensor")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shards listed in {index.name} are missing: {missing}")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pth")):
        raise CheckpointError(f"{model_dir}: only safetensors weights are supported (found .bin/.pth files)")
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes that `config` implies."""
    c = config
    h = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, out in (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (out, h)
            if c.qkv_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, c.q_size)
        if c.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if c.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (c.head_dim,)
        if c.moe is not None and c.moe.sparse_layers[i]:
            shapes.update(_expert_shapes(c, i))
            continue
        for name, shape in (("gate", (c.intermediate_size, h)), ("up", (c.intermediate_size, h)),
                            ("down", (h, c.intermediate_size))):
            shapes[p + f"mlp.{name}_proj.weight"] = shape
            if c.mlp_bias:
                shapes[p + f"mlp.{name}_proj.bias"] = (shape[0],)
    return shapes


def expert_names(config: ModelConfig, layer: int) -> tuple[str, list[tuple[str, str, str]]]:
    """A sparse layer's router tensor and, per expert, its (gate, up, down) tensor names, in the
    family's Hugging Face spelling (Mixtral's `block_sparse_moe` w1/w3/w2, Qwen's `mlp` projections)."""
    p = f"model.layers.{layer}."
    if config.model_type == "mixtral":
        m = p + "block_sparse_moe."
        return m + "gate.weight", [(m + f"experts.{e}.w1.weight", m + f"experts.{e}.w3.weight",
                                    m + f"experts.{e}.w2.weight") for e in range(config.moe.num_experts)]
    m = p + "mlp."
    return m + "gate.weight", [tuple(m + f"experts.{e}.{n}_proj.weight" for n in ("gate", "up", "down"))
                               for e in range(config.moe.num_experts)]


def _expert_shapes(c: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    h, moe = c.hidden_size, c.moe
    router, experts = expert_names(c, layer)
    i = moe.expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {router: (moe.num_experts, h)}
    for gate, up, down in experts:
        shapes.update({gate: (i, h), up: (i, h), down: (h, i)})
    if moe.shared_expert_intermediate_size:
        s, m = moe.shared_expert_intermediate_size, f"model.layers.{layer}.mlp."
        shapes.update({m + "shared_expert.gate_proj.weight": (s, h), m + "shared_expert.up_proj.weight": (s, h),
                       m + "shared_expert.down_proj.weight": (h, s), m + "shared_expert_gate.weight": (1, h)})
    return shapes


def read_checkpoint(model_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every expected tensor, shape-checked, as stored (no dtype conversion yet). In a quantized
    checkpoint each decoder projection may be stored as 4-bit tensors or as a plain weight (GPTQ
    and AWQ may leave some unquantized)."""
    shapes = expected_shapes(config)
    if config.tie_word_embeddings:  # a tied checkpoint may also carry (or carry only) the LM head
        shapes[_HEAD] = shapes[_EMBED]
    packed: dict[str, tuple[int, ...]] = {}  # a projection's 4-bit tensors, by name
    if config.quantization is not None:
        for name, (n, k) in [(n, s) for n, s in shapes.items() if _PROJECTION.fullmatch(n)]:
            packed.update(stored_shapes(name.removesuffix(".weight"), n, k, config.quantization))
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            # A base model saved on its own (`LlamaModel.save_pretrained`, as embedding checkpoints
            # such as Qwen3-Embedding are) names its tensors without the "model." prefix.
            bare = not any(n.startswith("model.") for n in names) and any(n.startswith(_BARE) for n in names)
            for stored in names:
                name = f"model.{stored}" if bare and stored.startswith(_BARE) else stored
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                shape = shapes.get(name, packed.get(name))
                if shape is None and packed and _zero_bias(f, name, stored):
                    continue  # GPTQ-for-LLaMa saved a zero bias for every linear (vLLM skips them too)
                if shape is None:
                    hint = (" (it holds 4-bit .qweight tensors, but config.json has no quantization_config and "
                            "no quantize_config.json or quant_config.json is beside it)"
                            if not packed and any(n.endswith(".qweight") for n in names) else "")
                    raise CheckpointError(f"{path.name}: unexpected tensor {name!r} for this config{hint}")
                t = f.get_tensor(stored)
                if tuple(t.shape) != shape:
                    raise CheckpointError(
                        f"{path.name}: tensor {name!r} has shape {tuple(t.shape)}, "
                        f"expected {shape} from config.json")
                tensors[name] = t
    if config.tie_word_embeddings:
        _tie(tensors, model_dir)
        shapes.pop(_HEAD)
    for name in [n for n in shapes if packed and _PROJECTION.fullmatch(n)]:
        base = name.removesuffix(".weight")
        parts = [base + suffix for suffix in (".qweight", ".qzeros", ".scales") if base + suffix in packed]
        stored = [n for n in parts if n in tensors]
        if stored and name in tensors:
            raise CheckpointError(f"{model_dir}: {base} is stored both as a weight and as 4-bit tensors")
        if stored:
            if len(stored) != len(parts):
                raise CheckpointError(f"{model_dir}: {base} is missing 4-bit tensors "
                                      f"{sorted(set(parts) - set(stored))}")
            shapes.pop(name)  # (present in its 4-bit form)
    missing = [n for n in shapes if n not in tensors]
    if missing == [_HEAD]:
        return tensors  # a base model without its LM head: it loads to embed only (`load_model`)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{model_dir}: checkpoint is missing tensors {missing[:5]}{more}")
    return tensors


def _zero_bias(f: Any, name: str, stored: str) -> bool:
    """Whether `name` (stored in the file as `stored`) is a decoder projection's bias that holds only zeros."""
    return (_PROJECTION.fullmatch(name.removesuffix(".bias") + ".weight") is not None and name.endswith(".bias")
            and not f.get_tensor(stored).any())


def _tie(tensors: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Tied embeddings: one matrix for both. As transformers 4.x and vLLM, the embedding is used;
    a stored LM head that differs from it is said aloud (transformers 5 would use the head), and a
    checkpoint that stores only the head gets it as the embedding."""
    head = tensors.pop(_HEAD, None)
    if head is None:
        return
    embed = tensors.get(_EMBED)
    if embed is None:
        tensors[_EMBED] = head
    elif not torch.equal(head, embed):
        warnings.warn(f"{model_dir}: config.json ties the word embeddings, but the stored lm_head.weight "
                      f"differs from model.embed_tokens.weight; the embedding is used for both (as vLLM)",
                      stacklevel=3)


def load_model(model_dir: str | Path, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", quantization: str | None = None) -> CausalLM:
    """Load a checkpoint directory as a `CausalLM` on `device` in `dtype`; `quantization="int8"` or
    `"int4"` quantizes its decoder projections and experts (`lengthwise.model.quantize`: on the CPU
    in float32; int4 also on CUDA). A GPTQ/AWQ checkpoint loads as it is stored (4-bit)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, config, dev)
    check_quantization(quantization, dev, dt, config)  # before the weights are read
    tensors = read_checkpoint(model_dir, config)
    headless = not config.tie_word_embeddings and _HEAD not in tensors
    if headless:  # the embedding stands in for the absent head, which generation refuses to use
        config = dataclasses.replace(config, tie_word_embeddings=True)
    model = CausalLM(config, dt, dev)
    model.generates = not headless
    packs = cpu_decode.packs_weights(model)
    fused = cpu_decode.segment_attention_kernel() is not None  # (else no path reads 4-bit values)
    if config.quantization is not None:
        model.quantization = config.quantization.method

    def put(param: torch.nn.Parameter | None, *names: str) -> None:
        if param is None:
            return
        src = tensors[names[0]] if len(names) == 1 else torch.cat([tensors[n] for n in names])
        param.data.copy_(src.to(dt))

    def put_projection(layer: torch.nn.Module, attr: str, *names: str) -> None:
        if config.quantization is None or getattr(layer, attr) is None:
            return put(getattr(layer, attr), *names)
        _put_4bit(layer, attr, names, tensors, config, packs, fused)

    put(model.embed, "model.embed_tokens.weight")
    put(model.final_norm, "model.norm.weight")
    if not config.tie_word_embeddings:
        put(model.lm_head, "lm_head.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        put(layer.input_norm, p + "input_layernorm.weight")
        put(layer.post_attn_norm, p + "post_attention_layernorm.weight")
        put_projection(layer, "qkv_weight", attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight")
        put(layer.qkv_bias, attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias")
        put(layer.q_norm, attn + "q_norm.weight")
        put(layer.k_norm, attn + "k_norm.weight")
        put_projection(layer, "o_weight", attn + "o_proj.weight")
        put(layer.o_bias, attn + "o_proj.bias")
        if layer.moe is not None:
            _put_experts(layer, tensors, config, i, dt, packs, fused)
            mlp += "shared_expert."  # (Qwen2-MoE's; `put` skips what the layer does not have)
        put_projection(layer, "gate_up_weight", mlp + "gate_proj.weight", mlp + "up_proj.weight")
        put(layer.gate_up_bias, mlp + "gate_proj.bias", mlp + "up_proj.bias")
        put_projection(layer, "down_weight", mlp + "down_proj.weight")
        put(layer.down_bias, mlp + "down_proj.bias")
    if quantization is not None and config.quantization is None:
        quantize_model(model, quantization)
    if packs:
        cpu_decode.pack_model(model)  # the projections held once, as the CPU GEMM's panels
    unloaded = [name for name, p in model.named_parameters() if p.is_meta]
    if unloaded:  # (a bug, not a checkpoint problem: every path above allocates what it keeps)
        raise RuntimeError(f"{model_dir}: parameters left unallocated after loading: {unloaded[:4]}")
    return model.eval()


def _put_4bit(layer: torch.nn.Module, attr: str, names: tuple[str, ...], tensors: dict[str, torch.Tensor],
              config: ModelConfig, packs: bool, fused: bool) -> None:
    """`layer.<attr>` (q, k, v fused; gate, up fused) of a quantized checkpoint. Where all its parts
    are 4-bit with the same groups, it stays 4-bit:

    - on the CPU in float32 with the kernels built (`fused`), if its groups are runs of group_size
      once sorted: `layer.quantized`, which `pack_model` makes 4-bit panels (act-ordered groups
      sorted into runs, the kernel reading the inputs in that order); a model that packs never
      allocates the dense parameter;
    - where the Triton W4A16 kernel runs (CUDA), as a `PackedInt4` in place of the parameter.

    Otherwise the parameter (allocated here: the model leaves quantized projections on the meta
    device) holds the dequantized weight (bfloat16 on the CPU, parts left unquantized, groups that
    sorting cannot make whole on the CPU's path)."""
    param = getattr(layer, attr)
    device = layer.input_norm.device
    parts = _four_bit_parts(tensors, names, config)
    whole = Int4Weight.cat(parts) if all(p is not None for p in parts) else None
    cpu_panels = fused and device.type == "cpu" and param.dtype == torch.float32
    if whole is not None and whole.sortable and cpu_panels:
        layer.quantized[attr] = whole
        if not packs:
            _allocate(layer, attr).copy_(whole.dequantize())
        return
    if whole is not None and int4_kernel_route(device, param.dtype):  # (never where cpu_panels is)
        set_int4(layer, attr, whole)
        return
    _allocate(layer, attr).copy_(_dense(parts, names, tensors).to(param.dtype))


def _four_bit_parts(tensors: dict[str, torch.Tensor], names: tuple[str, ...],
                    config: ModelConfig) -> list[Int4Weight | None]:
    """Each weight `names[i]` read from its 4-bit tensors, or None where it is stored unquantized."""
    bases = [n.removesuffix(".weight") for n in names]
    return [read_int4(tensors, b, config.quantization) if b + ".qweight" in tensors else None for b in bases]


def _dense(parts: list[Int4Weight | None], names: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weights `names` stacked along n: each dequantized from its 4-bit part, or as stored."""
    return torch.cat([p.dequantize() if p is not None else tensors[n].float()
                      for p, n in zip(parts, names, strict=True)])


def _allocate(layer: torch.nn.Module, attr: str) -> torch.Tensor:
    """`layer.<attr>`, a parameter on the meta device, allocated on the layer's device."""
    meta = getattr(layer, attr)
    param = torch.nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype, device=layer.input_norm.device),
                               requires_grad=False)
    layer._parameters[attr] = param
    return param.data


def _put_experts(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], config: ModelConfig, index: int,
                 dtype: torch.dtype, packs: bool, fused: bool) -> None:
    """Stack a sparse layer's experts: gate and up rows of expert e in `experts_gate_up[e]`, its
    down projection in `experts_down[e]`; the router as is, and Qwen2-MoE's shared-expert gate.

    A quantized checkpoint's 4-bit experts stay 4-bit where every expert of the layer is: as the
    fused CPU path's 4-bit panels (`layer.quantized`, packed by `pack_model`; only groups in input
    order: its expert kernel reads no input order), or as a `PackedInt4` per expert where the W4A16
    kernel runs. Otherwise they are dequantized into the stacked parameters (allocated here)."""
    router, experts = expert_names(config, index)
    layer.router_weight.data.copy_(tensors[router].to(dtype))
    if layer.shared_gate_weight is not None:
        layer.shared_gate_weight.data.copy_(tensors[f"model.layers.{index}.mlp.shared_expert_gate.weight"].to(dtype))
    device = layer.input_norm.device
    if config.quantization is not None:
        def four_bit(*names: str) -> Int4Weight | None:
            parts = _four_bit_parts(tensors, names, config)
            return Int4Weight.cat(parts) if all(p is not None for p in parts) else None

        gate_up = [four_bit(gate, up) for gate, up, _ in experts]
        down = [four_bit(d) for _, _, d in experts]
        whole = all(w is not None for w in (*gate_up, *down))
        if whole and fused and device.type == "cpu" and dtype == torch.float32:
            if all(w.in_input_order for w in (*gate_up, *down)):
                layer.quantized.update(experts_gate_up=gate_up, experts_down=down)
                if not packs:  # (kept dense, the 4-bit values beside them for the fused path)
                    _allocate(layer, "experts_gate_up").copy_(torch.stack([w.dequantize() for w in gate_up]))
                    _allocate(layer, "experts_down").copy_(torch.stack([w.dequantize() for w in down]))
                return
        elif whole and int4_kernel_route(device, dtype):
            set_int4(layer, "experts_gate_up", gate_up)
            set_int4(layer, "experts_down", down)
            return
    stacked_gate_up, stacked_down = _allocate(layer, "experts_gate_up"), _allocate(layer, "experts_down")
    for e, (gate, up, down) in enumerate(experts):
        for target, names in ((stacked_gate_up[e], (gate, up)), (stacked_down[e], (down,))):
            parts = _four_bit_parts(tensors, names, config) if config.quantization is not None else [None] * len(names)
            target.copy_(_dense(parts, names, tensors).to(dtype))

"""Load PEFT LoRA adapters for a served model, and keep the loaded ones (`LoRARegistry`).

A PEFT save is a directory with `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
(`[rank, in]`) and `...lora_B.weight` (`[out, rank]`). The update of a projection is
`scaling * B @ A` with `scaling = lora_alpha / rank` (`lora_alpha / sqrt(rank)` with
`use_rslora`; `rank_pattern`/`alpha_pattern` may set them per module, and the rank is read from
the tensors). The loader folds the scaling into `B` and stacks each layer's q/k/v (and gate/up)
into one update of the fused projection (`lengthwise.ops.lora`). What the engine cannot apply is
refused naming it: DoRA, trained biases, embedding or LM-head adapters, `modules_to_save`, mixture-
of-experts MLPs.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lengthwise.lora.request import LoRARequest
from lengthwise.model.config import ModelConfig, read_json
from lengthwise.ops.lora import AdapterWeights, LayerWeights, LoRAWeight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"(?:base_model\.model\.)?(model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+))"
                  r"\.lora_([AB])(?:\.default)?\.weight")
# PEFT module -> (the fused projection it is part of, its part's index there).
PARTS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
          "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}


@dataclass
class LoRAAdapter:
    """A loaded adapter: per decoder layer, its updates by fused projection name."""

    request: LoRARequest
    rank: int  # the largest rank among its modules
    weights: AdapterWeights

    @property
    def layers(self) -> list[LayerWeights]:
        """Per decoder layer, its updates by projection name."""
        return self.weights.layers

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for layer in self.layers for w in layer.values())


def part_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each module PEFT may adapt in `layer`; a sparse layer's MLP has none."""
    c = config
    shapes = {"q_proj": (c.q_size, c.hidden_size), "k_proj": (c.kv_size, c.hidden_size),
              "v_proj": (c.kv_size, c.hidden_size), "o_proj": (c.hidden_size, c.q_size)}
    if c.moe is None or not c.moe.sparse_layers[layer]:
        i = c.intermediate_size
        shapes |= {"gate_proj": (i, c.hidden_size), "up_proj": (i, c.hidden_size), "down_proj": (c.hidden_size, i)}
    return shapes


def adapter_bytes_bound(config: ModelConfig, rank: int, dtype: torch.dtype) -> int:
    """The most bytes one loaded adapter of rank at most `rank` can take: every projection PEFT
    may adapt, at that rank, stored as the loader stores it (A stacked per fused projection, B
    block-diagonal over its parts). What a GPU sets aside for `max_cpu_loras` adapters before it
    sizes the KV cache."""
    elements = 0
    for layer in range(config.num_layers):
        shapes = part_shapes(config, layer)
        fused: dict[str, list[tuple[int, int]]] = {}
        for module, shape in shapes.items():
            fused.setdefault(PARTS[module][0], []).append(shape)
        for parts in fused.values():
            stacked_rank = rank * len(parts)
            elements += sum(rank * fan_in for _, fan_in in parts) + sum(out for out, _ in parts) * stacked_rank
    return elements * torch.empty((), dtype=dtype).element_size()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: the first key that matches the end of the
    module's name (`q_proj`, `layers.0.self_attn.q_proj`, or a regular expression)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """`adapter_config.json`, checked for what the engine cannot serve (ValueError naming it)."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"lora_path {str(directory)!r} has no {ADAPTER_CONFIG} (a PEFT LoRA adapter directory)")
    config = read_json(path)  # (CheckpointError is a ValueError naming the file)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config['peft_type']!r} is not served; only LORA adapters are")
    refusals = {"use_dora": "DoRA adapters (use_dora) are not served",
                "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D weights) is not served",
                "modules_to_save": "modules_to_save (whole modules trained beside the adapter) is not served"}
    for field, why in refusals.items():
        if config.get(field):
            raise ValueError(f"{path}: {why}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} (trained biases) is not served; only bias='none'")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{path}: {field} must be a positive number, got {value!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise ValueError(f"{path}: {field} must be an object of module patterns")
    return config


def load_adapter(request: LoRARequest, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_lora_rank: int) -> LoRAAdapter:
    """Read `request.lora_path` for a model of `config`; every tensor is checked against the
    module it adapts, and no module may have a rank above `max_lora_rank`."""
    directory = Path(request.lora_path)
    cfg = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"lora_path {str(directory)!r} has no {ADAPTER_WEIGHTS}")
    found: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A": ..., "B": ...}
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except SafetensorError as e:  # a truncated or corrupt file: the adapter's fault, not the server's
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{weights}: tensor {key!r} adapts no decoder projection this engine serves "
                             f"(q/k/v/o_proj, gate/up/down_proj of a decoder layer)")
        module, layer, part = m.group(1), int(m.group(2)), m.group(4)
        if layer >= config.num_layers:
            raise ValueError(f"{weights}: tensor {key!r} is for layer {layer}; the model has {config.num_layers}")
        if part not in part_shapes(config, layer):
            where = " (a mixture-of-experts layer)" if part in PARTS else ""
            raise ValueError(f"{weights}: tensor {key!r}: {part} of layer {layer}{where} cannot be adapted")
        found.setdefault(module, {})[m.group(5)] = tensor
    if not found:
        raise ValueError(f"{weights}: holds no LoRA tensors")
    use_rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    parts: list[dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]] = [{} for _ in range(config.num_layers)]
    max_rank = 0
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights}: {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        layer, part = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        a, b = ab["A"], ab["B"]
        out_features, in_features = part_shapes(config, layer)[part]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise ValueError(f"{weights}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                             f"expected [rank, {in_features}] and [{out_features}, rank]")
        expected_rank = _pattern_value(rank_pattern, module, cfg["r"])
        if rank != expected_rank:
            raise ValueError(f"{weights}: {module} has rank {rank}, but adapter_config.json says {expected_rank}")
        if rank > max_lora_rank:
            raise ValueError(f"adapter {request.lora_name!r}: {module} has rank {rank}, above max_lora_rank="
                             f"{max_lora_rank}; raise max_lora_rank")
        max_rank = max(max_rank, rank)
        alpha = _pattern_value(alpha_pattern, module, cfg["lora_alpha"])
        scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        name, index = PARTS[part]
        parts[layer].setdefault(name, []).append((index, a.float(), b.float() * scaling))
    layers = [{name: _fuse(name, found_parts, config, dtype, device) for name, found_parts in layer.items()}
              for layer in parts]
    return LoRAAdapter(request, max_rank, AdapterWeights(layers))


def _fuse(name: str, parts: list[tuple[int, torch.Tensor, torch.Tensor]], config: ModelConfig,
          dtype: torch.dtype, device: torch.device) -> LoRAWeight:
    """One fused projection's update from its parts' `(index, A, scaled B)`: the `A`s stacked, the
    `B`s block-diagonal over the fused output (q, k, v or gate, up); absent parts stay zero."""
    c = config
    widths = {"qkv": (c.q_size, c.kv_size, c.kv_size), "gate_up": (c.intermediate_size,) * 2}.get(name)
    if widths is None:
        (_, a, b), = parts
        return _weight(a, b, (), dtype, device)
    parts = sorted(parts, key=lambda p: p[0])
    a = torch.cat([p[1] for p in parts])
    b = torch.zeros(sum(widths), a.shape[0])
    col, blocks = 0, []
    for index, part_a, part_b in parts:
        row = sum(widths[:index])
        b[row:row + widths[index], col:col + part_a.shape[0]] = part_b
        blocks.append((row, row + widths[index], col, col + part_a.shape[0]))
        col += part_a.shape[0]
    return _weight(a, b, tuple(blocks), dtype, device)


def _weight(a: torch.Tensor, b: torch.Tensor, blocks: tuple[tuple[int, int, int, int], ...], dtype: torch.dtype,
            device: torch.device) -> LoRAWeight:
    """The update with `a` and `b` held transposed in memory (`a.T` [in, rank] and `b.T` [rank, out]
    contiguous, `a` and `b` views): the GEMMs' layout, `x @ a.T` and `... @ b.T` in torch and the
    fused CPU step's kernels (lora.h)."""
    return LoRAWeight(a.to(device, dtype).T.contiguous().T, b.to(device, dtype).T.contiguous().T, blocks)


class LoRARegistry:
    """The adapters an engine has loaded, by `lora_int_id`, at most `capacity` of them kept (the
    least recently used one not in use by a live request is dropped first; vLLM's
    `max_cpu_loras`). One id always means one directory, even after its adapter was dropped:
    asking for it with another is an error. Pinned adapters (`pin`: a server's served ones) are
    never dropped to make room. `remove` drops an adapter at once, or, while live requests use it,
    when they have ended (`collect`)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, max_lora_rank: int,
                 capacity: int) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        self.max_lora_rank, self.capacity = max_lora_rank, capacity
        self._loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()
        # Every id ever loaded -> its directory: dropped adapters' ids stay taken, because the
        # prefix cache may still hold blocks computed with them under that id.
        self._paths: dict[int, tuple[str, Path]] = {}
        self._retired: set[int] = set()  # removed while in use: dropped once no live request holds them
        self._pinned: set[int] = set()

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """`request`'s adapter read from disk and checked against the model, without keeping it
        (thread-safe: a server reads adapters off the engine's thread, then `load`s them)."""
        return load_adapter(request, self.config, self.dtype, self.device, self.max_lora_rank)

    def load(self, request: LoRARequest, in_use: Collection[int] = (), adapter: LoRAAdapter | None = None,
             keep: bool = False) -> LoRAAdapter:
        """The adapter of `request`, read from disk the first time (and after it was dropped), or
        `adapter`, read already (`read`). `in_use`: the ids live requests hold, which stay loaded
        even beyond `capacity`. `keep`: an explicit load (`LLMEngine.add_lora`), which takes back
        an earlier `remove`; a request's own load does not (a removed adapter goes once its
        requests, this one too, have ended)."""
        known = self._paths.get(request.lora_int_id)
        if known is not None and known[1] != Path(request.lora_path).resolve():
            raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter {known[0]!r} at "
                             f"{str(known[1])!r}; give {request.lora_path!r} another lora_int_id")
        if keep:
            self._retired.discard(request.lora_int_id)
        loaded = self._loaded.get(request.lora_int_id)
        if loaded is not None:
            adapter = loaded
            self._loaded.move_to_end(request.lora_int_id)
        else:
            adapter = adapter if adapter is not None else self.read(request)
            self._loaded[request.lora_int_id] = adapter
            self._paths[request.lora_int_id] = (request.lora_name, Path(request.lora_path).resolve())
        for lora_id in list(self._loaded):  # least recently used first
            if len(self._loaded) <= self.capacity:
                break
            if lora_id != request.lora_int_id and lora_id not in in_use and lora_id not in self._pinned:
                del self._loaded[lora_id]
        return adapter

    def pin(self, lora_id: int) -> bool:
        """Keep adapter `lora_id` loaded whatever `capacity` says, until it is removed; False if it
        is not loaded."""
        if lora_id not in self._loaded:
            return False
        self._pinned.add(lora_id)
        return True

    def remove(self, lora_id: int, in_use: Collection[int] = ()) -> bool:
        """Drop adapter `lora_id` (whether it was loaded): now, or while live requests use it
        (`in_use`), once they have ended (`collect`). Its id keeps meaning its directory."""
        if lora_id not in self._loaded:
            return False
        self._pinned.discard(lora_id)
        if lora_id in in_use:
            self._retired.add(lora_id)
        else:
            del self._loaded[lora_id]
        return True

    def collect(self, in_use: Collection[int]) -> None:
        """Drop the removed adapters no live request uses any more."""
        for lora_id in [i for i in self._retired if i not in in_use]:
            self._retired.discard(lora_id)
            self._loaded.pop(lora_id, None)

    @property
    def retiring(self) -> bool:
        """Whether removed adapters wait for their requests to end."""
        return bool(self._retired)

    def ids(self) -> list[int]:
        """The ids of the adapters kept (removed ones still in use excluded), least recently used first."""
        return [i for i in self._loaded if i not in self._retired]

    def get(self, lora_id: int) -> LoRAAdapter:
        """A loaded adapter (requests hold their adapter loaded while they live)."""
        return self._loaded[lora_id]

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self._loaded

    def __len__(self) -> int:
        return len(self._loaded)

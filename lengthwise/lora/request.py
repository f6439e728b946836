"""`LoRARequest`: which adapter a request runs with (vLLM's class, same fields and order).

Pure Python: the scheduler reads `lora_int_id` (adapters per batch, prefix-cache keys) and knows
nothing of the weights, which `lengthwise.lora.adapter` loads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A LoRA adapter by name, id and directory (a PEFT save: `adapter_config.json` and
    `adapter_model.safetensors`).

    `lora_int_id` identifies the adapter within an engine: positive, and one id always means the
    same directory (the engine keeps the loaded weights under it and keys cached prompt blocks by
    it, as vLLM does). `lora_name` is what the server's `model` field and outputs call it."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be a directory path (str), got {self.lora_path!r}")

    @property
    def adapter_id(self) -> int:
        """vLLM's alias of `lora_int_id`."""
        return self.lora_int_id

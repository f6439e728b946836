"""LoRA adapters served over one base model: requests name an adapter (`LoRARequest`), batches mix
adapters and the base model, and each projection adds its rows' low-rank updates
(`lengthwise.ops.lora`)."""

from lengthwise.lora.request import LoRARequest

__all__ = ["LoRARequest"]

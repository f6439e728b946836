"""Model families (Llama, Mistral, Qwen2, Qwen3), the checkpoint loader, and the built-in default model."""

from lengthwise.model.config import CheckpointError, ModelConfig
from lengthwise.model.llama import CausalLM
from lengthwise.model.loader import load_model

__all__ = ["CausalLM", "CheckpointError", "ModelConfig", "load_model"]

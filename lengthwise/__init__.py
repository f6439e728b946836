"""lengthwise: an LLM inference engine that perceives response lengths before decoding and schedules on them."""

from lengthwise.engine import Generation, generate
from lengthwise.model import CausalLM, CheckpointError, ModelConfig, load_model
from lengthwise.sampling_params import SamplingParams
from lengthwise.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CheckpointError",
    "Generation",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "generate",
    "load_model",
]

"""lengthwise: an LLM inference engine that perceives response lengths before decoding and schedules on them."""

from lengthwise.beam_search import BeamSearchParams
from lengthwise.config import EngineConfig
from lengthwise.engine import LLM, Generation, LLMEngine, RequestOutput, generate
from lengthwise.model import CausalLM, CheckpointError, ModelConfig, load_model
from lengthwise.sampling_params import SamplingParams
from lengthwise.structured.params import StructuredOutputsParams
from lengthwise.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CausalLM",
    "CheckpointError",
    "EngineConfig",
    "Generation",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "Tokenizer",
    "generate",
    "load_model",
]

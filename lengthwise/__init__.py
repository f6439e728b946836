"""lengthwise: an LLM inference engine that perceives response lengths before decoding and schedules on them."""

from lengthwise.beam_search import BeamSearchParams
from lengthwise.config import EngineConfig
from lengthwise.engine import LLM, Generation, LLMEngine, RequestOutput, generate
from lengthwise.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput
from lengthwise.model import CausalLM, CheckpointError, ModelConfig, load_model
from lengthwise.pooling import PoolerConfig, PoolingParams
from lengthwise.sampling_params import SamplingParams
from lengthwise.structured.params import StructuredOutputsParams
from lengthwise.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CausalLM",
    "CheckpointError",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "EngineConfig",
    "Generation",
    "LLMEngine",
    "ModelConfig",
    "PoolerConfig",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "Tokenizer",
    "generate",
    "load_model",
]

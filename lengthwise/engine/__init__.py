"""The engine: the step loop (`LLMEngine`), the offline `LLM` API, the sampler and detokenizer."""

from lengthwise.engine.generate import Generation, generate, prompt_logits
from lengthwise.engine.llm import LLM
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["LLM", "CompletionOutput", "Generation", "LLMEngine", "RequestMetrics", "RequestOutput", "generate",
           "prompt_logits"]

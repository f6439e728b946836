"""Sequence state, the step loop and the offline API."""

from lengthwise.engine.generate import Generation, generate, prompt_logits

__all__ = ["Generation", "generate", "prompt_logits"]

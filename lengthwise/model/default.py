"""The built-in default model: the tiny instruction model that ships inside the package.

`lengthwise train-tiny` trained it from scratch (see `lengthwise/tiny/train.py` and the README):
a 2M-parameter Llama that follows the synthetic instructions of `lengthwise/tiny/tasks.py`,
stops by itself, answers the first paper's length query with its own response length, and comes
with a length probe (`probe/`). It is what `LLM()`, `lengthwise generate` and `lengthwise demo`
use when no model directory is given. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from lengthwise.model.loader import CheckpointError, weight_files

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent.parent / "tiny" / "checkpoint"


def default_model_dir() -> Path:
    """The built-in model's checkpoint directory (inside the installed package)."""
    try:
        weight_files(BUILTIN_MODEL_DIR)
    except CheckpointError:
        raise ValueError(f"the built-in model is missing from {BUILTIN_MODEL_DIR}: reinstall lengthwise, or "
                         f"rebuild it with `lengthwise train-tiny --out {BUILTIN_MODEL_DIR}`") from None
    return BUILTIN_MODEL_DIR

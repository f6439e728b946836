"""argparse value types shared by the CLI's commands: a bad value becomes argparse's one-line
error naming the flag (exit status 2), never a traceback from deep inside the work."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lengthwise.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS

T = TypeVar("T")


def _checked(text: str, cast: Callable[[str], T], what: str, ok: Callable[[T], bool]) -> T:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (thread counts, batch sizes, request counts)."""
    return _checked(text, int, "a positive integer", lambda v: v >= 1)


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, learning rates, epochs)."""
    return _checked(text, float, "a positive number", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (roundings, tolerances)."""
    return _checked(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    return _checked(text, int, "a port number (1-65535)", lambda v: 1 <= v <= 65535)


def positive_int_list(text: str) -> list[int]:
    """A comma list of integers >= 1 (a sweep: `16,32,64`)."""
    return [positive_int(t.strip()) for t in text.split(",")]


def kv_memory(text: str) -> int | float:
    """`--kv-cache-memory`: bytes (`4000000000`, `4GiB`, `512MiB`) or a fraction of free memory (`0.5`)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    scale = 1
    for suffix, unit in units.items():
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], unit
            break
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be bytes (e.g. 4GiB) or a fraction of free memory (e.g. 0.5), "
                                         f"got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite size, got {text!r}")
    if scale > 1:
        return int(value * scale)
    return value if "." in t else int(value)


def input_file(text: str) -> Path:
    """A file that must exist now, not be found missing after minutes of work."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def output_file(text: str) -> Path:
    """A file to write at the end: its folder is made now, so a long run cannot fail at its last line."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create the folder of {text}: {e}") from None
    return path


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    """`--quantization` and `--kv-cache-dtype` (`EngineConfig.quantization`, `.kv_cache_dtype`)."""
    p.add_argument("--quantization", default=None, choices=list(QUANTIZATION_METHODS),
                   help="int8 / int4: weight-only int8 or group-wise 4-bit decoder projections (CPU, float32; int4 "
                   "also on CUDA; "
                   "faster batch-1 decode, some accuracy lost); gptq / awq: the method of a quantized "
                   "checkpoint (read from its config.json anyway)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="dtype of the KV cache (default auto: the model's); bfloat16 under a float32 model "
                   "on the CPU holds twice the tokens and halves decode attention's reads; fp8 (= fp8_e4m3) "
                   "and fp8_e5m2 one byte per value, on the CPU and CUDA (some accuracy lost)")


def json_object(text: str) -> dict[str, object]:
    """A JSON object argument, such as `--speculative-config '{"method": "ngram", ...}'`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def add_speculative_argument(p: argparse.ArgumentParser) -> None:
    """`--speculative-config JSON` (`EngineConfig.speculative_config`, vLLM's flag)."""
    p.add_argument("--speculative-config", type=json_object, default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                   "(draft-free n-gram lookup in the prompt and output; prompt_lookup_max/min set the n-gram "
                   'sizes, default 4 down to 2; "adaptive": true drafts per row only what its acceptance and the '
                   "measured step cost pay for)")


def lora_module(text: str) -> tuple[str, str]:
    """One `--lora-modules` entry, as vLLM takes it: `NAME=PATH`, or `{"name": ..., "path": ...}`."""
    if text.lstrip().startswith("{"):
        value = json_object(text)
        name, path = value.get("name"), value.get("path")
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=PATH or a JSON object with name and path, got {text!r}")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise argparse.ArgumentTypeError(f"a LoRA module needs a non-empty name and path, got {text!r}")
    return name, path


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's LoRA flags (`EngineConfig.enable_lora`, `max_loras`, `max_lora_rank`, `max_cpu_loras`)
    and `--lora-modules`, the adapters a server offers under their own model names."""
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (implied by --lora-modules)")
    p.add_argument("--lora-modules", nargs="+", type=lora_module, default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) served as models named NAME; also JSON "
                   '\'{"name": NAME, "path": PATH}\'')
    p.add_argument("--max-loras", type=positive_int, default=1,
                   help="adapters among the requests running at once (default 1; others wait their turn)")
    p.add_argument("--max-lora-rank", type=positive_int, default=16, help="the highest adapter rank (default 16)")
    p.add_argument("--max-cpu-loras", type=positive_int, default=None,
                   help="adapters kept loaded (default --max-loras)")

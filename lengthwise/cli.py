"""The `lengthwise` command line: `lengthwise generate [MODEL_DIR] --prompt TEXT ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lengthwise.engine import generate
from lengthwise.model import CheckpointError, load_model
from lengthwise.model.config import read_json
from lengthwise.model.default import default_model_dir
from lengthwise.sampling_params import SamplingParams
from lengthwise.tokenizer import Tokenizer


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for one or more prompts",
                       description="Generate text from a local Hugging Face checkpoint directory "
                                   "(the built-in random default model when MODEL_DIR is omitted).")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="checkpoint directory (default: built-in)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag to generate for several prompts in one batch")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default: the checkpoint's generation_config, else greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible output")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message, with --chat")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=_cmd_generate)


def generation_defaults(model_dir: Path) -> dict[str, float | int]:
    """Sampling defaults from generation_config.json, as transformers' generate() applies them:
    greedy unless `do_sample`; when sampling, temperature 1.0, top_p 1.0 and top_k 50 unless set."""
    path = model_dir / "generation_config.json"
    gen = read_json(path) if path.is_file() else {}
    if not gen.get("do_sample"):
        return {"temperature": 0.0}
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0}
    out: dict[str, float | int] = {}
    for key, default in defaults.items():
        value = gen.get(key)
        out[key] = type(default)(default if value is None else value)
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not args.model:
        print(f"[lengthwise] no MODEL_DIR given: using the built-in random-initialised model at {model_dir}",
              file=sys.stderr)
    model = load_model(model_dir, args.dtype, args.device)
    tokenizer = Tokenizer(model_dir)
    sampling = generation_defaults(model_dir)
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    # A checkpoint without end tokens in its configs still stops at the tokenizer's EOS.
    stop_ids = () if model.config.eos_token_ids or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed, stop_token_ids=stop_ids, **sampling)
    if params.greedy and (args.top_p is not None or args.top_k is not None or args.seed is not None):
        print("[lengthwise] warning: decoding is greedy (temperature 0), so --top-p/--top-k/--seed have no "
              "effect; pass --temperature to sample", file=sys.stderr)
    if args.chat:
        def to_messages(text: str) -> list[dict[str, str]]:
            system = [{"role": "system", "content": args.system}] if args.system else []
            return [*system, {"role": "user", "content": text}]
        prompts = [tokenizer.encode_chat(to_messages(t)) for t in args.prompt]
    else:
        prompts = [tokenizer.encode(t) for t in args.prompt]
    outputs = generate(model, prompts, params)
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {args.prompt[i]!r} ({out.finish_reason}, {len(out.token_ids)} tokens)")
        print(tokenizer.decode(out.token_ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lengthwise", description="Length-aware LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lengthwise` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"lengthwise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

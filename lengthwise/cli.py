"""The `lengthwise` command line: `lengthwise demo | generate | embed | serve | bench | predictor | simulate |
train-tiny`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lengthwise.argtypes import add_precision_arguments, add_speculative_argument, json_object, kv_memory
from lengthwise.beam_search import BeamSearchParams
from lengthwise.engine import LLM
from lengthwise.engine.llm_engine import generation_defaults
from lengthwise.model import CheckpointError
from lengthwise.model.default import default_model_dir
from lengthwise.pooling import PoolingParams
from lengthwise.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 64  # `lengthwise generate`, when neither --max-tokens nor the checkpoint says


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for one or more prompts",
                       description="Generate text from a local Hugging Face checkpoint directory "
                                   "(the built-in tiny instruction model when MODEL_DIR is omitted).")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="checkpoint directory (default: built-in)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag to generate for several prompts in one batch")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most (default: "
                   f"generation_config.json's max_new_tokens, else {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default: the checkpoint's generation_config, else greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible output")
    p.add_argument("--n", type=int, default=1, help="samples per prompt, sharing one prompt KV segment (default 1)")
    p.add_argument("--beam-width", type=int, default=None,
                   help="beam search with this many beams instead of sampling: prints the best answers, best first")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="with --beam-width: answers ranked by cumulative logprob / length ** this (default 1)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string; repeat for several (a newline from a shell: $'\\n')")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message, with --chat")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_precision_arguments(p)
    p.add_argument("--kv-cache-memory", type=kv_memory, default=None,
                   help="KV cache size: bytes (e.g. 2GiB) or a fraction of free memory (e.g. 0.5)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together at most (default 256)")
    add_speculative_argument(p)
    add_policy_arguments(p)
    p.add_argument("--length-predictor", default=None,
                   help="predict each response's length first: a predictor directory, 'self', "
                   "'self-greedy' or either with ':DIR'")
    p.set_defaults(func=_cmd_generate)


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """`--policy NAME` and repeatable `--policy-option KEY=VALUE` (values parsed as JSON if they can be)."""
    p.add_argument("--policy", "--scheduling-policy", dest="policy", default="fcfs",
                   help="scheduling policy: fcfs (= continuous), priority (vLLM's: requests' priority, then "
                   "arrival), continuous-sjf (priority, then shortest predicted), static, sequence, multibin")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy option, e.g. fcr=continue, batch_size=16, bins=4 (repeat for several)")


def parse_policy_options(items: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--policy-option must be KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare word: fcr=continue
    return options


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.system and not args.chat:
        raise ValueError("--system is a chat message: give --chat too")
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not args.model:
        print(f"[lengthwise] no MODEL_DIR given: using the built-in tiny instruction model at {model_dir}",
              file=sys.stderr)
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
              max_num_seqs=args.max_num_seqs, length_predictor=args.length_predictor, policy=args.policy,
              policy_options=parse_policy_options(args.policy_option), speculative_config=args.speculative_config)
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer.json, so text prompts cannot be encoded")
    if args.length_penalty is not None and args.beam_width is None:
        raise ValueError("--length-penalty needs --beam-width (it ranks beam search answers)")
    if args.beam_width is not None:
        return _beam_search(llm, args, generation_defaults(model_dir).get("max_tokens", DEFAULT_MAX_TOKENS))
    sampling = generation_defaults(model_dir)
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    max_tokens = sampling.pop("max_tokens", DEFAULT_MAX_TOKENS)  # generation_config's max_new_tokens
    params = SamplingParams(max_tokens=max_tokens if args.max_tokens is None else args.max_tokens, seed=args.seed,
                            n=args.n, stop=args.stop, **sampling)
    if params.greedy and (args.top_p is not None or args.top_k is not None or args.seed is not None):
        print("[lengthwise] warning: decoding is greedy (temperature 0), so --top-p/--top-k/--seed have no "
              "effect; pass --temperature to sample", file=sys.stderr)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        outputs = llm.chat([[*system, {"role": "user", "content": t}] for t in args.prompt], params,
                           use_tqdm=len(args.prompt) > 1)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1)
    fallbacks = llm.engine.length.stats.num_fallbacks
    if fallbacks:  # `self` on a model never taught the length question: say that the number is a stand-in
        print(f"[lengthwise] the model gave no usable length for {fallbacks} of its length queries; those "
              f"predictions are the fallback predictor's", file=sys.stderr)
    for i, out in enumerate(outputs):
        if out.predicted_length is not None:
            actual = max(len(c.token_ids) for c in out.outputs)
            print(f"[lengthwise] prompt {i}: predicted length {out.predicted_length:.0f} tokens, generated {actual}",
                  file=sys.stderr)
        for c in out.outputs:
            if len(outputs) > 1 or len(out.outputs) > 1:
                label = f"{i}.{c.index}" if len(out.outputs) > 1 else f"{i}"
                print(f"--- [{label}] {args.prompt[i]!r} ({c.finish_reason}, {len(c.token_ids)} tokens)")
            print(c.text)
    return 0


def _beam_search(llm: LLM, args: argparse.Namespace, default_max_tokens: int) -> int:
    """`generate --beam-width`: each prompt's answers, best first, with their scores."""
    sampling = {"--temperature": args.temperature, "--top-p": args.top_p, "--top-k": args.top_k,
                "--seed": args.seed, "--stop": args.stop, "--n": None if args.n == 1 else args.n}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be used with --beam-width (the search picks the tokens; "
                         f"--beam-width answers are returned)")
    params = BeamSearchParams(beam_width=args.beam_width,
                              length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
                              max_tokens=default_max_tokens if args.max_tokens is None else args.max_tokens)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [{"prompt_token_ids": llm.tokenizer.encode_chat([*system, {"role": "user", "content": t}], True)}
                   for t in args.prompt]
    else:
        prompts = list(args.prompt)
    for i, out in enumerate(llm.beam_search(prompts, params, use_tqdm=len(args.prompt) > 1)):
        for k, answer in enumerate(out.sequences):
            print(f"--- [{i}.{k}] {args.prompt[i]!r} (score {answer.score:.3f}, {answer.finish_reason}, "
                  f"{len(answer.logprobs)} tokens)")
            print(answer.text)
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed prompts: one vector each, as JSON lines",
                       description="Embed texts with a local checkpoint: the final hidden states pooled as its "
                                   "sentence-transformers files say (else the last token), normalized. Prints "
                                   "one JSON line per text: index, prompt_tokens, embedding.")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="checkpoint directory (default: built-in)")
    p.add_argument("--prompt", action="append", default=[], help="text to embed; repeat for several")
    p.add_argument("--input-file", type=Path, default=None, help="a file of texts to embed, one per line")
    p.add_argument("--output", type=Path, default=None, help="write the JSON lines here instead of stdout")
    p.add_argument("--pooler-config", type=json_object, default=None, metavar="JSON",
                   help='e.g. \'{"pooling_type": "mean", "normalize": false}\' (last, mean or cls)')
    p.add_argument("--dimensions", type=int, default=None,
                   help="keep the first N components (matryoshka models only)")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the vectors")
    p.add_argument("--truncate-prompt-tokens", type=int, default=None,
                   help="embed only each text's last N tokens (-1: the context's worth)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per forward pass (default 2048)")
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    texts = list(args.prompt)
    if args.input_file is not None:
        texts += [line for line in args.input_file.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError("nothing to embed: give --prompt TEXT or --input-file FILE")
    params = PoolingParams(dimensions=args.dimensions, normalize=False if args.no_normalize else None,
                           truncate_prompt_tokens=args.truncate_prompt_tokens)
    llm = LLM(Path(args.model) if args.model else default_model_dir(), dtype=args.dtype, device=args.device,
              pooler_config=args.pooler_config, max_num_batched_tokens=args.max_num_batched_tokens)
    outputs = llm.embed(texts, params, use_tqdm=len(texts) > 1)
    out = args.output.open("w") if args.output is not None else sys.stdout
    try:
        for i, o in enumerate(outputs):
            out.write(json.dumps({"index": i, "prompt_tokens": len(o.prompt_token_ids),
                                  "embedding": o.outputs.embedding}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from lengthwise.bench import kernels, predictors, schedule, structured, throughput
    from lengthwise.bench import serve as serve_bench

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    throughput.add_subcommand(bench_sub)
    predictors.add_subcommand(bench_sub)
    schedule.add_subcommand(bench_sub)
    kernels.add_subcommand(bench_sub)
    serve_bench.add_subcommand(bench_sub)
    structured.add_subcommand(bench_sub)


def _add_predictor(sub: argparse._SubParsersAction) -> None:
    from lengthwise.predict.commands import add_parser

    add_parser(sub)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from lengthwise.bench import calibrate, simulate

    p = sub.add_parser("simulate", help="the scheduling policies on a simulated clock, at any scale",
                       description=simulate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    simulate.add_run_arguments(p)
    p.set_defaults(func=simulate.main)
    sim_sub = p.add_subparsers(dest="simulate_command")
    c = sim_sub.add_parser("calibrate", help="fit the step-time model to the real engine's steps",
                           description=calibrate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrate.add_arguments(c)
    c.set_defaults(func=calibrate.main)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from lengthwise.server.cli import add_parser

    add_parser(sub, add_policy_arguments)


def _add_train_tiny(sub: argparse._SubParsersAction) -> None:
    from lengthwise.tiny.train import add_parser

    add_parser(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from lengthwise.tiny.demo import add_parser

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lengthwise", description="Length-aware LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_generate(sub)
    _add_embed(sub)
    _add_serve(sub)
    _add_bench(sub)
    _add_predictor(sub)
    _add_simulate(sub)
    _add_train_tiny(sub)
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

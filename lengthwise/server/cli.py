"""`lengthwise serve MODEL_DIR`: the OpenAI-compatible server under uvicorn.

    lengthwise serve ../shared/models/stories260k --port 8000 --policy continuous-sjf \\
        --length-predictor /tmp/pred/proxy --max-waiting 64 --api-key secret

Threads: the engine thread runs torch with `--threads` threads (default: all cores but one), so
that the event loop, which parses requests and writes streams, keeps a core of its own: two
busy threads on one core slow every step many times over. SIGTERM (or Ctrl-C) stops admitting at
once (503), lets in-flight requests finish for up to `--grace-period` seconds, aborts the rest
(their responses end normally, with finish_reason "abort") and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from lengthwise.argtypes import (
    add_lora_arguments,
    add_precision_arguments,
    add_speculative_argument,
    json_object,
    kv_memory,
    port,
    positive_int,
)
from lengthwise.server.reasoning import PARSERS as REASONING_PARSERS
from lengthwise.server.tools import PARSERS

FLUSH_S = 5.0  # after the grace period, how long aborted responses get to be written


def add_parser(sub: argparse._SubParsersAction, add_policy_arguments: Any) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="checkpoint directory (safetensors + tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: "
                   "the directory's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_precision_arguments(p)
    add_speculative_argument(p)
    add_lora_arguments(p)
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's, there behind "
                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING): adapters added and removed while serving; implies "
                   "--enable-lora")
    p.add_argument("--kv-cache-memory", type=kv_memory, default=None,
                   help="KV cache size: bytes (e.g. 2GiB) or a fraction of free memory (e.g. 0.5)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    add_policy_arguments(p)
    p.add_argument("--length-predictor", default=None,
                   help="predict each response's length first: a predictor directory, 'self', "
                   "'self-greedy' or either with ':DIR'")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="read tool calls out of chat answers in this format (hermes: Qwen2.5/Qwen3); "
                        "without it a request with tools is refused")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines: tool_choice 'auto' works whenever --tool-call-parser is set")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="send a thinking model's <think> part as message.reasoning (deepseek_r1: DeepSeek-R1, QwQ; "
                        "qwen3: Qwen3, which also reads chat_template_kwargs' enable_thinking)")
    p.add_argument("--pooler-config", type=json_object, default=None, metavar="JSON",
                   help='how /v1/embeddings pools, e.g. \'{"pooling_type": "mean", "normalize": false}\' '
                   "(last, mean or cls; default: the checkpoint's sentence-transformers files, else the last "
                   "token, normalized)")
    p.add_argument("--max-waiting", type=int, default=256, help="requests that may wait to be scheduled; "
                   "beyond, 429 with Retry-After (default 256)")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight requests get to finish "
                   "after SIGTERM (default 30)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads of the engine (default: cores - 1)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=run)


def build_state(args: argparse.Namespace) -> Any:
    """Load the model and build the server's state (engine, tokenizer, metrics) from `args`."""
    import torch

    from lengthwise.cli import parse_policy_options
    from lengthwise.config import EngineConfig
    from lengthwise.engine.async_engine import AsyncEngine
    from lengthwise.engine.llm_engine import LLMEngine, generation_defaults
    from lengthwise.server.api_server import ServerState
    from lengthwise.server.metrics import ServerMetrics
    from lengthwise.server.reasoning import make_reasoning_parser
    from lengthwise.server.tools import make_parser

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)")
    threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 2) - 1)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    model_dir = Path(args.model)
    config = EngineConfig(dtype=args.dtype, device=args.device, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, policy=args.policy,
                          policy_options=parse_policy_options(args.policy_option),
                          length_predictor=args.length_predictor, speculative_config=args.speculative_config,
                          pooler_config=args.pooler_config,
                          allow_benchmark_predictors=False,  # real traffic has no true lengths
                          enable_lora=args.enable_lora or bool(args.lora_modules) or args.allow_runtime_lora_updating,
                          max_loras=args.max_loras,
                          max_lora_rank=args.max_lora_rank,
                          # (served adapters are pinned: this bounds only others)
                          max_cpu_loras=args.max_cpu_loras or max(args.max_loras, len(args.lora_modules)))
    name = args.served_model_name or model_dir.resolve().name
    loras = lora_requests(args.lora_modules, name)
    engine = LLMEngine.from_dir(model_dir, config)
    if engine.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer.json: the server needs one to encode prompts")
    for lora in loras.values():  # a bad adapter stops the start-up, naming it, not its first request
        engine.add_lora(lora)
        engine.pin_lora(lora.lora_int_id)  # served adapters stay loaded: none is re-read on the engine thread
    metrics = ServerMetrics(name)
    metrics.describe_cache(engine)
    if engine.loras is not None:
        metrics.describe_loras(config.max_loras)
    return ServerState(AsyncEngine(engine, max_waiting=args.max_waiting, observer=metrics), name, engine.tokenizer,
                       engine.max_model_len, engine.default_sampling_params(), metrics, args.api_key,
                       args.grace_period, generation_defaults(model_dir).get("max_tokens"),
                       make_parser(args.tool_call_parser), make_reasoning_parser(args.reasoning_parser), loras,
                       runtime_lora_updating=args.allow_runtime_lora_updating)


def lora_requests(modules: list[tuple[str, str]], model_name: str) -> dict[str, Any]:
    """`--lora-modules` as `LoRARequest`s by name, ids 1, 2, ... in the order given."""
    from lengthwise.lora import LoRARequest

    loras: dict[str, Any] = {}
    for name, path in modules:
        if name in loras or name == model_name:
            raise ValueError(f"--lora-modules: the name {name!r} is used twice (the base model is {model_name!r})")
        if not Path(path).is_dir():
            raise ValueError(f"--lora-modules: {name}={path}: no such directory")
        loras[name] = LoRARequest(name, len(loras) + 1, str(path))
    return loras


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lengthwise.server.api_server import build_app

    if args.grace_period < 0:
        raise ValueError(f"--grace-period must be >= 0 seconds, got {args.grace_period}")
    state = build_state(args)
    app = build_app(state)

    grace = args.grace_period

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM/SIGINT: refuse new requests at once
            state.engine.stop_accepting()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down, so the process would die of it
            # (exit -15); a drained shutdown on SIGTERM is a clean exit, 0, as orchestrators expect.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s != signal.SIGTERM]

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening now (a port in use never gets here)
                print(f"[lengthwise] serving {state.model_name!r} on http://{args.host}:{args.port}/v1",
                      file=sys.stderr, flush=True)

        async def shutdown(self, sockets: Any = None) -> None:
            # The grace runs on our clock: at its end the engine aborts what is left, so each open
            # response still ends properly (finish_reason "abort", `data: [DONE]`); uvicorn's own
            # timeout, later by FLUSH_S, only cancels handlers that could not write in that time.
            drain = asyncio.ensure_future(state.engine.drain(grace))
            try:
                await super().shutdown(sockets)
            finally:
                drain.cancel()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=grace + FLUSH_S)  # type: ignore[arg-type]
    Server(config).run()
    return 0

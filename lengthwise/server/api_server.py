"""The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions` (both streaming
with server-sent events), `/v1/models` (and `/v1/models/{id}`), vLLM's `/tokenize` and
`/detokenize`, `/health` and `/metrics` (Prometheus).

`build_app` wires a FastAPI app to an `AsyncEngine`; `lengthwise serve` (`server/cli.py`) runs it
under uvicorn. Every response to a bad request is an OpenAI error body with the parameter at
fault; a full waiting queue answers 429 with `Retry-After`, a server that is shutting down 503.
A client that disconnects (mid-stream or while waiting for a whole response) aborts its request,
which frees its KV blocks at once. Responses carry `usage` and, as an extra field,
`predicted_length`: the length predictor's estimate made before decoding (null without one).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lengthwise.beam_search import BeamSearchParams
from lengthwise.engine.async_engine import AsyncEngine, EngineStopped, QueueFull, RequestStream, StreamDelta
from lengthwise.engine.detokenizer import TokenPieces
from lengthwise.engine.llm import chat_messages
from lengthwise.lora.request import LoRARequest
from lengthwise.pooling import PoolingParams
from lengthwise.sampling_params import SamplingParams
from lengthwise.server.metrics import CONTENT_TYPE, ServerMetrics
from lengthwise.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    beam_search_params,
    parse_body,
    sampling_params,
)
from lengthwise.server.reasoning import END, ReasoningParser, ReasoningRequest, ReasoningSplit
from lengthwise.server.tools import ForcedToolCalls, HermesToolParser, ToolCallStream, check_tools
from lengthwise.structured.params import StructuredOutputsParams
from lengthwise.tokenizer import Tokenizer

RETRY_AFTER_S = 1
PROMPT_TAIL_TOKENS = 32  # of a chat prompt, decoded to see whether its template opened or closed <think>
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    tokenizer: Tokenizer
    max_model_len: int
    defaults: SamplingParams
    metrics: ServerMetrics
    api_key: str | None = None
    grace_s: float = 30.0
    default_max_tokens: int | None = None  # generation_config.json's max_new_tokens: caps chat's default
    tool_parser: HermesToolParser | None = None  # --tool-call-parser: reads tool calls out of chat answers
    reasoning_parser: ReasoningParser | None = None  # --reasoning-parser: splits <think> off chat answers
    loras: dict[str, LoRARequest] = dataclasses.field(default_factory=dict)  # --lora-modules, by name
    runtime_lora_updating: bool = False  # --allow-runtime-lora-updating: /v1/load_lora_adapter and unload
    created: int = 0


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state.engine`; the engine thread starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        await state.engine.shutdown(state.grace_s)

    app = FastAPI(title="lengthwise", lifespan=lifespan)
    state.created = int(time.time())
    app.state.lw = state

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # Routing's own refusals (no such path, a wrong method) in OpenAI's shape too.
        what = "no such route" if e.status_code == 404 else str(e.detail)
        return JSONResponse(ApiError(e.status_code, f"{what}: {request.method} {request.url.path}").body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {state.api_key}":
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           type_="invalid_request_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str | None = None) -> dict[str, Any]:
        """The base model's card, or (`name`) a LoRA adapter's, whose `parent` is the base model."""
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lengthwise",
                "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}
        if name is not None and name != state.model_name:
            card |= {"id": name, "root": state.loras[name].lora_path, "parent": state.model_name}
        return card

    async def tokenizer_body(request: Request, cls: type[Any]) -> Any:
        """The checked body of a tokenizer endpoint, whose `model` is optional (vLLM's)."""
        check_key(request)
        req = parse_body(cls, await request.body())
        if req.model is not None:
            check_model(req.model)
        return req

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """vLLM's: the token ids the server would feed the model for a prompt or a conversation."""
        req = await tokenizer_body(request, TokenizeRequest)
        if req.messages is not None:
            try:
                messages = chat_messages([m.model_dump(exclude_none=True) for m in req.messages])
                ids = state.tokenizer.encode_chat(messages, req.add_generation_prompt)
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from None
        else:
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [state.tokenizer.id_to_token(t) for t in ids]
        return JSONResponse(body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        """vLLM's: the text of token ids (special tokens included)."""
        req = await tokenizer_body(request, DetokenizeRequest)
        bad = [t for t in req.tokens if not 0 <= t < state.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"tokens has ids outside the vocabulary [0, {state.tokenizer.vocab_size}): "
                           f"{bad[:5]}", "tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card(), *map(model_card, state.loras)]})

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> Response:  # the openai client's models.retrieve
        check_key(request)
        check_model(model)
        return JSONResponse(model_card(model))

    # Adapters added at run time take ids after every one served so far: an id never names two
    # directories (the prefix cache keys its blocks by id).
    lora_ids = itertools.count(max((lr.lora_int_id for lr in state.loras.values()), default=0) + 1)
    lora_lock = asyncio.Lock()  # one load or unload at a time: each checks the names, then awaits

    def check_lora_updating(request: Request) -> None:
        check_key(request)
        if not state.runtime_lora_updating:
            raise ApiError(400, "adding and removing LoRA adapters at run time is off: start the server with "
                           "--allow-runtime-lora-updating")

    async def serve_lora(name: str, lora: LoRARequest, old: LoRARequest | None) -> None:
        """Load `lora` and serve it as `name`, in place of `old`."""
        try:
            await state.engine.add_lora(lora)
        except (ValueError, OSError) as e:  # the loader names the file and what is wrong with it
            raise ApiError(400, f"cannot load adapter {name!r}: {e}", "lora_path") from None
        state.loras[name] = lora
        if old is not None:  # its running requests finish with the adapter they started with
            await state.engine.remove_lora(old.lora_int_id)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        """vLLM's: serve the adapter at `lora_path` as the model `lora_name` from now on."""
        check_lora_updating(request)
        req = parse_body(LoadLoRAAdapterRequest, await request.body())
        async with lora_lock:
            old = state.loras.get(req.lora_name)
            if req.lora_name == state.model_name:
                raise ApiError(400, f"lora_name {req.lora_name!r} is the base model's name", "lora_name")
            if old is not None and not req.load_inplace:
                raise ApiError(400, f"The lora adapter {req.lora_name!r} has already been loaded; unload it "
                               f"first or set load_inplace", "lora_name")
            # Shielded: a client gone mid-load must not leave the engine and the names disagreeing.
            await asyncio.shield(serve_lora(req.lora_name, LoRARequest(req.lora_name, next(lora_ids), req.lora_path),
                                            old))
        return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        """vLLM's: stop serving adapter `lora_name` (requests already accepted finish with it)."""
        check_lora_updating(request)
        req = parse_body(UnloadLoRAAdapterRequest, await request.body())
        async with lora_lock:
            name = req.lora_name or next((n for n, lr in state.loras.items() if lr.lora_int_id == req.lora_int_id),
                                         None)
            lora = state.loras.get(name) if name else None
            if lora is None or req.lora_int_id not in (None, lora.lora_int_id):
                what = repr(req.lora_name) if req.lora_name else f"with lora_int_id {req.lora_int_id}"
                raise ApiError(404, f"The lora adapter {what} cannot be found",
                               "lora_name" if req.lora_name else "lora_int_id", code="model_not_found")
            del state.loras[name]
            await state.engine.remove_lora(lora.lora_int_id)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        req = parse_body(CompletionRequest, await request.body())
        lora = check_model(req.model)
        items = _completion_prompts(req.prompt, state.tokenizer)
        prompts = [ids for ids, _ in items]
        bound = state.engine.max_waiting
        if bound is not None and len(prompts) > bound:  # each prompt waits as a request: it could never fit
            raise ApiError(400, f"{len(prompts)} prompts in one request; this server queues at most {bound} "
                           f"requests (--max-waiting): send them in smaller batches", "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        # echo with max_tokens 0 scores the prompt alone (OpenAI's legacy way, as vLLM reads it):
        # one token is generated and not shown.
        echo_only = req.echo and max_tokens == 0
        for ids in prompts:
            check_length(len(ids), max(max_tokens, 1), "prompt")
        if req.use_beam_search:
            params: SamplingParams | BeamSearchParams = beam_search_params(req, max_tokens)
        else:
            params = sampling_params(req, 1 if echo_only else max_tokens, req.logprobs, state.defaults,
                                     prompt_logprobs=req.logprobs if req.echo else None)
        echo = [Echo(text if text is not None else state.tokenizer.decode(ids, skip_special_tokens=False),
                     ids, echo_only) for ids, text in items] if req.echo else None
        return await respond(request, req, prompts, params, chat=False, echo=echo, lora=lora)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        req = parse_body(ChatCompletionRequest, await request.body())
        lora = check_model(req.model)
        try:
            messages = chat_messages([m.model_dump(exclude_none=True) for m in req.messages])
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        parser: HermesToolParser | ForcedToolCalls | None = None
        forced_format = None
        template_args: dict[str, Any] = {}
        if req.tools:
            try:
                template_args["tools"] = check_tools(req.tools)
            except ValueError as e:
                raise ApiError(400, str(e), "tools") from None
            forced = req.tool_choice == "required" or isinstance(req.tool_choice, dict)
            if forced:  # structured outputs hold the answer to calls: no parser needed
                name = req.tool_choice["function"]["name"] if isinstance(req.tool_choice, dict) else None
                try:
                    parser = ForcedToolCalls(req.tools, name, single=req.parallel_tool_calls is False)
                    forced_format = StructuredOutputsParams(json=parser.schema())
                except ValueError as e:
                    raise ApiError(400, str(e), "tool_choice" if "tool_choice" in str(e) else "tools") from None
            elif req.tool_choice != "none":  # the model sees the tools either way; "none": no calls read
                if state.tool_parser is None:
                    raise ApiError(400, "tools need the server started with --tool-call-parser (e.g. hermes)",
                                   "tools")
                parser = type(state.tool_parser)(single=req.parallel_tool_calls is False)
        extra = req.chat_template_kwargs or {}
        taken = sorted(set(extra) & {"messages", "tools", "add_generation_prompt", "continue_final_message"})
        if taken:
            raise ApiError(400, f"chat_template_kwargs may not set {taken}: they are request fields",
                           "chat_template_kwargs")
        try:
            ids = state.tokenizer.encode_chat(messages, req.add_generation_prompt,
                                              continue_final_message=req.continue_final_message,
                                              **extra, **template_args)
        except ValueError as e:
            msg = str(e)
            param = ("chat_template_kwargs" if "variables" in msg
                     else "continue_final_message" if "continue_final_message" in msg else "messages")
            raise ApiError(400, msg, param) from None
        # max_tokens is the deprecated name; clients that send both with one value are fine, two
        # different limits are ambiguous (vLLM would silently take max_completion_tokens).
        if None not in (req.max_completion_tokens, req.max_tokens) and req.max_completion_tokens != req.max_tokens:
            raise ApiError(400, f"max_completion_tokens ({req.max_completion_tokens}) and its deprecated alias "
                           f"max_tokens ({req.max_tokens}) differ: give one", "max_completion_tokens")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        check_length(len(ids), asked, "messages", param)
        rest = state.max_model_len - len(ids)  # chat's default, as vLLM: the context left, capped by the config's
        max_tokens = asked if asked is not None else min(rest, state.default_max_tokens or rest)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.use_beam_search:  # (tools were refused with it: no parser, no forced format)
            params: SamplingParams | BeamSearchParams = beam_search_params(req, max_tokens)
        else:
            params = sampling_params(req, max_tokens, logprobs, state.defaults)
        if forced_format is not None:
            if params.structured_outputs is not None:
                raise ApiError(400, "a forced tool_choice and an output format both constrain the answer: give one",
                               "tool_choice")
            params = dataclasses.replace(params, structured_outputs=forced_format)
        elif parser is not None:  # a tokenizer may mark <tool_call> special: keep it for the parser (vLLM's)
            params = dataclasses.replace(params, skip_special_tokens=False)
        reasoning = None
        if state.reasoning_parser is not None:  # where the answer starts: the prompt's last tokens say
            tail = state.tokenizer.decode(ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
            reasoning = state.reasoning_parser.for_request(tail, extra, req.include_reasoning)
            if reasoning.thinking and isinstance(params, SamplingParams) and params.structured_outputs is not None:
                params = dataclasses.replace(params, structured_outputs=dataclasses.replace(
                    params.structured_outputs, start_after=END))
        return await respond(request, req, [ids], params, chat=True, messages=messages, tools=parser,
                             reasoning=reasoning, lora=lora)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """OpenAI's embeddings: one vector per input, pooled from the model's final hidden states
        (`EngineConfig.pooler_config`), computed in the same continuous batches as generation."""
        check_key(request)
        req = parse_body(EmbeddingRequest, await request.body())
        lora = check_model(req.model)
        params = req.pooling_params()
        if req.messages is not None:
            try:
                messages = chat_messages([m.model_dump(exclude_none=True) for m in req.messages])
                prompts = [state.tokenizer.encode_chat(messages, req.add_generation_prompt)]
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from None
            what = "messages"
        else:
            prompts = [ids for ids, _ in _completion_prompts(req.input, state.tokenizer, req.add_special_tokens,
                                                              "input")]
            what = "input"
        bound = state.engine.max_waiting
        if bound is not None and len(prompts) > bound:
            raise ApiError(400, f"{len(prompts)} inputs in one request; this server queues at most {bound} "
                           f"requests (--max-waiting): send them in smaller batches", "input")
        if params.truncate_prompt_tokens is None:
            for ids in prompts:
                if len(ids) > state.max_model_len:
                    raise ApiError(400, f"this model's maximum context length is {state.max_model_len} tokens, "
                                   f"and the {what} is {len(ids)} tokens: shorten it or set truncate_prompt_tokens",
                                   what)
        rid = f"embd-{uuid.uuid4().hex}"
        streams = await accept_all(prompts, params, rid, None, lora, req.priority, what)
        done, finals = await unless_disconnected(request, streams, _finals(streams))
        if not done:
            return Response(status_code=499)
        if any(f is None or f.embedding is None for f in finals):  # aborted: the server is shutting down
            raise ApiError(503, "the server stopped before the embeddings were computed; retry", type_="server_error",
                           code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode_vector(f.embedding, req.encoding_format)} for i, f in enumerate(finals)]
        used = sum(f.prompt_tokens for f in finals)
        return JSONResponse({"id": rid, "object": "list", "created": int(time.time()), "model": req.model,
                             "data": data, "usage": {"prompt_tokens": used, "total_tokens": used}})

    def check_model(name: str) -> LoRARequest | None:
        """The adapter `name` asks for (None: the base model); an unknown name is a 404, as OpenAI and
        vLLM answer (the client raises NotFoundError)."""
        if name == state.model_name:
            return None
        if name in state.loras:
            return state.loras[name]
        served = ", ".join(repr(m) for m in (state.model_name, *state.loras))
        raise ApiError(404, f"the model {name!r} does not exist here; this server serves {served}",
                       "model", code="model_not_found")

    def check_length(prompt_len: int, max_tokens: int | None, what: str, param: str = "max_tokens") -> None:
        if prompt_len >= state.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {state.max_model_len} tokens, and the "
                           f"{what} alone is {prompt_len} tokens", what)
        if max_tokens is not None and prompt_len + max_tokens > state.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {state.max_model_len} tokens; you "
                           f"requested {prompt_len + max_tokens} ({prompt_len} in the {what}, {max_tokens} for "
                           f"the completion): lower {param}", param)

    async def accept_all(prompts: list[list[int]], params: SamplingParams | BeamSearchParams | PoolingParams,
                         rid: str, messages: list[dict[str, Any]] | None, lora: LoRARequest | None,
                         priority: int, prompt_param: str = "prompt") -> list[RequestStream]:
        """Add one request per prompt (ids `rid-k`); if one is refused, those accepted are aborted."""
        streams: list[RequestStream] = []
        try:
            for k, ids in enumerate(prompts):
                streams.append(await _accept(state.engine, ids, params, f"{rid}-{k}", messages, lora, priority,
                                             prompt_param))
        except BaseException:
            for stream in streams:  # the prompts accepted before the refusal: abort them
                stream.close()
            raise
        return streams

    async def unless_disconnected(request: Request, streams: list[RequestStream],
                                  work: Awaitable[Any]) -> tuple[bool, Any]:
        """Await `work`, polling the client: (False, None) if it went away first (its requests
        are then aborted, which frees their blocks), else (True, the result)."""
        task = asyncio.ensure_future(work)
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                for stream in streams:
                    stream.close()
                return False, None
        return True, task.result()

    async def respond(request: Request, req: Any, prompts: list[list[int]], params: SamplingParams | BeamSearchParams,
                      chat: bool, messages: list[dict[str, Any]] | None = None,
                      echo: list[Echo] | None = None, tools: HermesToolParser | ForcedToolCalls | None = None,
                      reasoning: ReasoningRequest | None = None, lora: LoRARequest | None = None) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        streams = await accept_all(prompts, params, rid, messages, lora, req.priority)
        # A beam search's choices are its answers, best first; they come when it ends, whole.
        n, logprobs = (params.n, params.logprobs) if isinstance(params, SamplingParams) else (params.beam_width, None)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream_events(state, rid, streams, n, chat, include_usage, logprobs, echo, tools,
                                  reasoning, req.model)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done, results = await unless_disconnected(request, streams, _collect(streams))
        if not done:
            return Response(status_code=499)
        return JSONResponse(_full_response(state, rid, results, n, chat, logprobs, echo,
                                           tools, reasoning, req.model))

    return app


@dataclass
class Echo:
    """What a completion's `echo` puts before each choice of one prompt: the prompt's text (as
    sent, or its token ids decoded) and, with `logprobs`, its tokens' logprobs. `only`: max_tokens
    was 0, so the prompt is the whole choice."""

    text: str
    prompt_ids: list[int]
    only: bool

    def logprobs(self, tokenizer: Tokenizer, lps: list[Any] | None) -> tuple[dict[str, list[Any]], int]:
        """The prompt's part of a completion's logprobs (the first token has none, as OpenAI shows
        it, nor has a token the request ended before scoring) and the offset the generated tokens'
        text starts at."""
        ids = self.prompt_ids
        lps = lps or [None] * len(ids)
        head = tokenizer.decode(ids[:1], skip_special_tokens=False)
        pieces = TokenPieces(tokenizer, ids[0])
        pieces.offset = len(head)
        parts = [{"tokens": [head], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}]
        for token, lp in zip(ids[1:], lps[1:], strict=True):
            if lp is None:
                text, _, offset = pieces.take(token)
                parts.append({"tokens": [text], "token_logprobs": [None], "top_logprobs": [None],
                              "text_offset": [offset]})
            else:
                parts.append(_completion_logprobs(pieces, [lp]))
        out = _join_logprobs(*parts)
        # Offsets count the decoded prompt's characters; the echoed text may lack its head (a BOS
        # the tokenizer added to a text prompt, SentencePiece's dummy-prefix space): shift them.
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        shift = len(decoded) - len(self.text) if decoded.endswith(self.text) else 0
        out["text_offset"] = [max(0, o - shift) for o in out["text_offset"]]
        return out, len(self.text)


def _reasoning_fields(thought: str | None) -> dict[str, str | None]:
    """A message's (or delta's) reasoning under vLLM's current name and its older one, which the
    DeepSeek API and many clients read."""
    return {"reasoning": thought, "reasoning_content": thought}


def _join_logprobs(*parts: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {key: [x for part in parts for x in part[key]] for key in parts[0]}


def _completion_prompts(prompt: Any, tokenizer: Tokenizer, add_special_tokens: bool = True,
                        param: str = "prompt") -> list[tuple[list[int], str | None]]:
    """`prompt` as (token ids, text or None) pairs: a string, a list of token ids, or a list of
    either (`param`: the field's name in errors)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise ApiError(400, f"{param} must not be empty", param)
    out = []
    for item in items:
        ids = tokenizer.encode(item, add_special_tokens) if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, f"{param} must not be empty", param)
        if any(not 0 <= t < tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"{param} has token ids outside the vocabulary [0, {tokenizer.vocab_size})", param)
        out.append((ids, item if isinstance(item, str) else None))
    return out


async def _finals(streams: list[RequestStream]) -> list[StreamDelta]:
    """Each stream's last delta (an embedding request has just that one)."""
    finals = []
    try:
        for stream in streams:
            final = None
            async for delta in stream:
                final = delta
            finals.append(final)
    finally:
        for stream in streams:
            stream.close()
    return finals


def _encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """OpenAI's encodings of an embedding: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def _accept(engine: AsyncEngine, ids: list[int], params: SamplingParams | BeamSearchParams | PoolingParams,
                  rid: str, messages: list[dict[str, Any]] | None = None, lora: LoRARequest | None = None,
                  priority: int = 0, prompt_param: str = "prompt") -> RequestStream:
    """Add a request; the engine's refusal becomes an `ApiError` (`prompt_param`: the request
    field holding the prompt)."""
    try:
        return await engine.add(ids, params, rid, messages, lora, priority)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}; retry later", type_="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineStopped as e:
        raise ApiError(503, f"the server is not accepting requests: {e}", type_="server_error",
                       code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ValueError as e:  # the engine's own checks: name the request field that decides it
        msg = str(e)
        first = msg.split(" ", 1)[0]
        field = first.split("=", 1)[0]
        param = ("n" if msg.startswith(("n=", "beam_width=")) else "priority" if msg.startswith("priority")
                 else "max_tokens" if "KV blocks" in msg and prompt_param == "prompt"
                 else field if field in ("logit_bias", "stop_token_ids", "dimensions", "truncate_prompt_tokens")
                 else "model" if (lora is not None and ("lora" in msg or "adapter" in msg)) or "embeddings are not"
                 in msg or "LM head" in msg else prompt_param)
        raise ApiError(400, msg, param) from None


async def _collect(streams: list[RequestStream]) -> list[dict[str, Any]]:
    """Run every stream to its end; per prompt, the accumulated samples and the final delta."""
    results = []
    try:
        for stream in streams:
            acc = _Accumulator()
            async for delta in stream:
                acc.add(delta)
            results.append({"samples": acc.samples, "final": acc.final, "prompt_logprobs": acc.prompt_logprobs})
    finally:
        for stream in streams:
            stream.close()
    return results


class _Accumulator:
    def __init__(self) -> None:
        self.samples: dict[int, dict[str, Any]] = {}
        self.final: StreamDelta | None = None
        self.prompt_logprobs: list[Any] | None = None

    def add(self, delta: StreamDelta | None) -> None:
        if delta is None:
            return
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        for s in delta.samples:
            acc = self.samples.setdefault(s.index, {"text": "", "logprobs": [], "finish": None,
                                                    "prev": s.prev_token_id, "stop_reason": None})
            acc["text"] += s.text
            acc["logprobs"] += s.logprobs or []
            acc["finish"] = s.finish_reason or acc["finish"]
            acc["stop_reason"] = s.stop_reason if s.stop_reason is not None else acc["stop_reason"]
        if delta.finished:
            self.final = delta


def _usage(finals: list[StreamDelta | None], echo: list[Echo] | None = None) -> dict[str, int]:
    prompt = sum(f.prompt_tokens for f in finals if f)
    # echo with max_tokens 0 shows nothing generated: it counts none
    completion = 0 if echo and echo[0].only else sum(f.completion_tokens for f in finals if f)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str | None) -> str | None:
    """The engine's reason as the API says it: "stop" also covers stop strings and tokens;
    "abort" (cut off by the server's shutdown) is vLLM's word, so a client can tell a cut-off answer."""
    return reason


def _completion_logprobs(pieces: TokenPieces, lps: list[Any]) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        # OpenAI: "the logprob of the sampled token" always, so up to logprobs + 1 entries.
        top = {pieces.piece(t)[0]: v for t, v in lp.top}
        text, _, offset = pieces.take(lp.token_id)
        top.setdefault(text, lp.logprob)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append(top)
        offsets.append(offset)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(pieces: TokenPieces, lps: list[Any]) -> dict[str, Any]:
    def entry(text: str, raw: bytes, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    content = []
    for lp in lps:
        top = [entry(*pieces.piece(t), v) for t, v in lp.top]
        text, raw, _ = pieces.take(lp.token_id)
        content.append(dict(entry(text, raw, lp.logprob), top_logprobs=top))
    return {"content": content}


def _echoed_choice(state: ServerState, echo: Echo | None, prompt_lps: list[Any] | None, text: str,
                   lps: list[Any], prev: int, finish: str | None, logprobs: int | None,
                   pieces: TokenPieces | None = None,
                   first: bool = True) -> tuple[str, dict[str, Any] | None, str | None]:
    """A completion choice's (text, logprobs, finish_reason), with the prompt before the generated
    part when `echo` asks for it and this is the choice's `first` chunk. `pieces`: the choice's
    running token positions (a stream's), else a new one from `prev`."""
    pieces = TokenPieces(state.tokenizer, prev) if pieces is None else pieces
    if echo is None or not first:
        return text, _completion_logprobs(pieces, lps) if logprobs is not None else None, finish
    head = None
    if logprobs is not None:
        head, pieces.offset = echo.logprobs(state.tokenizer, prompt_lps)
    if echo.only:
        return echo.text, head, "length"
    return (echo.text + text, None if head is None else _join_logprobs(head, _completion_logprobs(pieces, lps)),
            finish)


def _full_response(state: ServerState, rid: str, results: list[dict[str, Any]], n: int, chat: bool,
                   logprobs: int | None, echo: list[Echo] | None = None,
                   tools: HermesToolParser | ForcedToolCalls | None = None,
                   reasoning: ReasoningRequest | None = None, model: str | None = None) -> dict[str, Any]:
    """The non-streamed body; `model`: the name the request asked for (a LoRA adapter's, or the base's)."""
    choices = []
    for k, res in enumerate(results):
        for i in range(n):
            s = res["samples"].get(i, {"text": "", "logprobs": [], "finish": None, "prev": 0, "stop_reason": None})
            index = k * n + i
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": s["text"]}
                finish = _finish(s["finish"])
                if reasoning is not None:
                    thought, message["content"] = reasoning.splitter().whole(s["text"])
                    message.update(_reasoning_fields(thought if reasoning.include else None))
                if tools is not None and message["content"] is not None:  # calls come after any reasoning
                    message["content"], calls = tools.parse(message["content"])
                    message["tool_calls"] = [c.to_openai() for c in calls]
                    finish = tools.calls_finish if calls else finish
                choice = {"index": index, "message": message,
                          "logprobs": _chat_logprobs(TokenPieces(state.tokenizer, s["prev"]), s["logprobs"])
                          if logprobs is not None else None,
                          "finish_reason": finish, "stop_reason": s["stop_reason"]}
            else:
                e = echo[k] if echo else None
                text, lp, finish = _echoed_choice(state, e, res["prompt_logprobs"], s["text"], s["logprobs"],
                                                  s["prev"], _finish(s["finish"]), logprobs)
                choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": lp,
                          "stop_reason": None if e is not None and e.only else s["stop_reason"]}
            choices.append(choice)
    finals = [r["final"] for r in results]
    predicted = [f.predicted_length for f in finals if f is not None]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model or state.model_name, "choices": choices, "usage": _usage(finals, echo),
            "predicted_length": predicted[0] if len(predicted) == 1 else (predicted or None)}


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """(prompt index, delta) from every stream as they come."""
    pending = {asyncio.ensure_future(stream.next()): k for k, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                k = pending.pop(fut)
                delta = fut.result()
                yield k, delta
                if not delta.finished:
                    pending[asyncio.ensure_future(streams[k].next())] = k
    finally:
        for fut in pending:
            fut.cancel()
        for stream in streams:  # a client that went away mid-stream: abort what is unfinished
            stream.close()


async def _stream_events(state: ServerState, rid: str, streams: list[RequestStream], n: int,
                         chat: bool, include_usage: bool, logprobs: int | None,
                         echo: list[Echo] | None = None, tools: HermesToolParser | ForcedToolCalls | None = None,
                         reasoning: ReasoningRequest | None = None, model: str | None = None) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format, `data: [DONE]` last (`model` as `_full_response`)."""
    created = int(time.time())
    model = model or state.model_name
    obj = "chat.completion.chunk" if chat else "text_completion"
    finals: list[StreamDelta | None] = [None] * len(streams)
    pieces: dict[int, TokenPieces] = {}  # per choice, with logprobs: where its tokens are
    started: set[int] = set()
    ended: set[int] = set()  # choices whose finish_reason went out: nothing more is sent for them

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    prompt_lps: dict[int, list[Any]] = {}  # per prompt, with echo and logprobs
    calls: dict[int, ToolCallStream] = {}  # per choice, with tools: content, then the calls as they are written
    splits: dict[int, ReasoningSplit] = {}  # per choice, with a reasoning parser
    async for k, delta in _merged(streams):
        if delta.prompt_logprobs is not None:
            prompt_lps[k] = delta.prompt_logprobs
        choices = []
        for s in delta.samples:
            index = k * n + s.index
            if index in ended or (not (s.text or s.token_ids or s.finish_reason) and index in started):
                continue  # (the engine reports every sample of a request each step, finished ones too)
            finish = _finish(s.finish_reason)
            if logprobs is not None and index not in pieces:
                pieces[index] = TokenPieces(state.tokenizer, s.prev_token_id)
            if chat:
                d: dict[str, Any] = {"role": "assistant"} if index not in started else {}
                d["content"] = s.text
                if reasoning is not None:
                    thought, d["content"] = splits.setdefault(index, reasoning.splitter()).feed(
                        s.text, s.finish_reason is not None)
                    if thought and reasoning.include:
                        d.update(_reasoning_fields(thought))
                if tools is not None:
                    stream = calls.setdefault(index, ToolCallStream(tools))
                    d["content"], tool_deltas = stream.feed(d["content"], s.finish_reason is not None)
                    if tool_deltas:
                        d["tool_calls"] = tool_deltas
                    if stream.has_calls:
                        finish = tools.calls_finish
                if "reasoning" in d and not d["content"]:
                    d["content"] = None  # a delta of reasoning only
                elif (index in started and not d["content"] and "tool_calls" not in d and finish is None
                      and logprobs is None):
                    continue  # nothing to send yet: reasoning left out, a tag or a tool call held back
                choice = {"index": index, "delta": d, "finish_reason": finish,
                          "logprobs": _chat_logprobs(pieces[index], s.logprobs or [])
                          if logprobs is not None else None, "stop_reason": s.stop_reason}
            else:
                e = echo[k] if echo else None
                text, lp, finish = _echoed_choice(state, e, prompt_lps.get(k), s.text, s.logprobs or [],
                                                  s.prev_token_id, finish, logprobs, pieces.get(index),
                                                  first=index not in started)
                choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": lp,
                          "stop_reason": None if e is not None and e.only else s.stop_reason}
            started.add(index)
            if finish is not None:
                ended.add(index)
            choices.append(choice)
        if delta.finished:
            finals[k] = delta
        if choices:
            yield event(choices, predicted_length=delta.predicted_length)
    if include_usage:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                "usage": _usage(finals, echo)}
        yield f"data: {json.dumps(body)}\n\n".encode()
    yield b"data: [DONE]\n\n"

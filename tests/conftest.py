"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers, and ../shared paths."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

# Keep the suite deterministic and off a busy second core.
torch.set_num_threads(int(os.environ.get("LENGTHWISE_TEST_THREADS", "1")))

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before anything
# imports triton (transformers does), because triton's own @jit helpers are built at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260k"

requires_stories = pytest.mark.skipif(
    not STORIES.is_dir(), reason=f"{STORIES} is absent (../shared not beside the repo)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class name, model class name, overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-rope-linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama-head-dim-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=32, attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1)),
    # YaRN as Qwen2.5/Qwen3 model cards add it, over a 32-token pretrained context so the ramp
    # between kept and interpolated frequencies falls inside the 8 rotary frequencies
    "qwen2-rope-yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32))),
}
# Mixture-of-experts families, kept apart from FAMILIES (int8 and some dense-only checks do not
# apply to them). Qwen2-MoE: a shared expert and a dense layer 1.
MOE_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=3, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
        num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=24, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)),
}


def stories_with_template(tmp_path_factory, chat_template: str) -> Path:
    """A copy of stories260k whose tokenizer_config.json carries `chat_template` (skips the test
    when ../shared is absent)."""
    import json
    import shutil

    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent (the ../shared checkout)")
    d = tmp_path_factory.mktemp("model") / "stories260k"
    shutil.copytree(STORIES, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@contextmanager
def forced_answer_server(model_dir: Path, args: list[str], answer: Callable, trigger: str) -> Iterator:
    """An `openai` client of a server run in this process on `model_dir` (with `serve` `args`),
    whose sampler writes `answer(tokenizer)`'s token ids, then the end token, for every request
    whose prompt text contains `trigger` (tiny models cannot write tool calls or reasoning tags)."""
    import openai
    import uvicorn

    import lengthwise.engine.llm_engine as engine_module
    from lengthwise.cli import build_parser
    from lengthwise.server.api_server import build_app
    from lengthwise.server.cli import build_state

    state = build_state(build_parser().parse_args(["serve", str(model_dir), "--served-model-name", "stories",
                                                   "--threads", "1", "--max-num-seqs", "4", *args]))
    tok = state.tokenizer
    forced = answer(tok) + [tok.eos_token_id]
    real = engine_module.sample

    def sample(logits, params, gens, prompts, outputs, **kw):  # noqa: ANN001, ANN202
        out = real(logits, params, gens, prompts, outputs, **kw)
        hit = [trigger.encode() in tok.decode(list(p), skip_special_tokens=False).encode() for p in prompts]
        out.token_ids = [forced[min(len(o), len(forced) - 1)] if h else t
                         for o, h, t in zip(outputs, hit, out.token_ids, strict=True)]
        return out

    engine_module.sample = sample
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        server.should_exit = True
        thread.join(30)
        engine_module.sample = real


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of `family` with every parameter (biases and norms too) randomised."""
    import transformers

    config_cls, model_cls, family_overrides = {**FAMILIES, **MOE_FAMILIES}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**BASE, **family_overrides, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_adapter(path: Path, hf: nn.Module, seed: int, rank: int = 4, alpha: float = 8.0, modules=LORA_MODULES,
                 rank_pattern: dict | None = None, alpha_pattern: dict | None = None, **config) -> Path:
    """A PEFT LoRA save for `hf`'s decoder projections named in `modules` (random A and B, so the
    adapter changes the outputs); `rank_pattern`/`alpha_pattern` as PEFT writes them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in hf.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in modules and ".layers." in name \
                and ".experts." not in name:
            r = lora_pattern(rank_pattern or {}, name, rank)
            tensors[f"base_model.model.{name}.lora_A.weight"] = 0.2 * torch.randn(r, mod.in_features, generator=g)
            tensors[f"base_model.model.{name}.lora_B.weight"] = 0.2 * torch.randn(mod.out_features, r, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
           "target_modules": list(modules), "bias": "none", "use_rslora": False, "use_dora": False,
           "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": rank_pattern or {},
           "alpha_pattern": alpha_pattern or {}, **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def lora_pattern(patterns: dict, name: str, default):
    """A PEFT rank/alpha pattern's value for module `name` (PEFT's `get_pattern_key`: the key, a
    regular expression, matches the end of the name)."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: `hf_checkpoint(family)` -> (transformers model, checkpoint dir), cached per family."""
    cache: dict[str, tuple] = {}

    def build(family: str):
        if family not in cache:
            model = make_hf_model(family)
            cache[family] = (model, save_hf_model(model, tmp_path_factory.mktemp(family)))
        return cache[family]

    return build


@pytest.fixture(scope="session")
def random_model(tmp_path_factory):
    """A random-initialised Llama (word-salad text), built into a temporary cache."""
    from lengthwise.model.random_model import random_model_dir

    return random_model_dir(seed=0, cache_dir=tmp_path_factory.mktemp("lw-cache"))


def spy_graph_runs(monkeypatch) -> list[int]:
    """The rows of every decode step that goes through `DecodeGraphs.run` from now on."""
    from lengthwise.engine.cuda_graph import DecodeGraphs

    calls: list[int] = []
    real_run = DecodeGraphs.run

    def counting_run(self, rows):
        calls.append(len(rows.token_ids))
        return real_run(self, rows)

    monkeypatch.setattr(DecodeGraphs, "run", counting_run)
    return calls


def graphed_and_plain_decode(model, monkeypatch, graph_batch: int = 4):
    """Run the same five requests through an engine whose decode steps of up to `graph_batch` rows
    go through `DecodeGraphs` (CUDA graphs on a GPU, the same static buffers eagerly elsewhere) and
    through a plain one. Returns (graphed outputs, plain outputs, graphed steps taken); the
    requests' lengths differ so that the decode batch shrinks through every bucket, with padding
    rows, and starts above `graph_batch` (the eager fallback)."""
    from lengthwise import SamplingParams
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm import run_to_completion
    from lengthwise.engine.llm_engine import LLMEngine

    prompts = [[5, 17, 9, 3, 50], list(range(10, 40)), [7], [1, 2, 3], [8, 8, 8, 8, 8, 8, 8, 8, 9]]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=2, n=n)
              for m, n in ((14, 1), (11, 1), (8, 1), (5, 1), (3, 2))]
    calls = spy_graph_runs(monkeypatch)
    outs = {}
    for batch in (graph_batch, 0):
        monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self, b=batch: b)
        engine = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=8))
        outs[batch] = run_to_completion(engine, prompts, params)
    return outs[graph_batch], outs[0], calls


def step_to_completion(engine, prompts, params, events=None):
    """Add `prompts` (request ids "0", "1", ...) and step `engine` until all finish, calling
    `events[k](engine)` after step k. Returns ({request_id: each sample's token ids}, steps)."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(p, sp, request_id=str(i))
    steps, outs = 0, {}
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if events and steps in events:
            events[steps](engine)
        for rid, req in list(engine.requests.items()):
            if req.finished:
                outs[rid] = [list(s.output_ids) for s in req.seqs]
                engine.pop_finished(rid)
    return outs, steps


def assert_same_generations(got, want, logprob_tol: float) -> None:
    """Same token ids for every sample; each token's logprob within `logprob_tol`."""
    for g, w in zip(got, want, strict=True):
        for gs, ws in zip(g.outputs, w.outputs, strict=True):
            assert gs.token_ids == ws.token_ids
            for a, b in zip(gs.logprobs, ws.logprobs, strict=True):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < logprob_tol
                assert [t for t, _ in a.top] == [t for t, _ in b.top]

"""LoRA adapters: PEFT saves load, batches mixing adapters and the base model match transformers
with each adapter merged into its weights, prefixes are cached per adapter, `max_loras` bounds the
adapters running together, and what cannot be served is refused naming it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import lora_pattern, make_hf_model, requires_cuda, save_adapter, save_hf_model
from safetensors.torch import save_file
from torch import nn

from lengthwise import LLM, SamplingParams
from lengthwise.config import EngineConfig
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.lora import LoRARequest
from lengthwise.lora.adapter import load_adapter
from lengthwise.model import load_model
from lengthwise.ops import cpu as cpu_kernels
from lengthwise.ops.cpu import decode as cpu_decode
from lengthwise.sequence import RequestStatus

PROMPTS = [[5, 17, 9, 3, 50, 61, 7], list(range(10, 40)), [7, 300, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def merged(hf: nn.Module, adapter: Path) -> nn.Module:
    """`hf` with the adapter merged into its weights: W + scaling * B @ A (PEFT's merge)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = copy.deepcopy(hf)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            alpha = lora_pattern(cfg["alpha_pattern"], name, cfg["lora_alpha"])
            scaling = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
            modules[name].weight += scaling * (b @ a)
    return out


def hf_greedy(hf: nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and each one's log-probability."""
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)[0]
        logp = torch.log_softmax(hf(ids[None]).logits[0].float(), -1)
    new = ids[len(prompt):].tolist()
    return new, [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(new)]


def assert_matches(outputs, references) -> None:
    for out, (tokens, logprobs) in zip(outputs, references, strict=True):
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert max(abs(lp.logprob - want) for lp, want in zip(got.logprobs, logprobs, strict=True)) < 1e-3


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random llama checkpoint and two adapters: (hf, checkpoint, adapter 1, adapter 2)."""
    hf = make_hf_model("llama")
    root = tmp_path_factory.mktemp("lora-llama")
    return (hf, save_hf_model(hf, root / "model"), save_adapter(root / "a1", hf, seed=1),
            save_adapter(root / "a2", hf, seed=2, rank=8, alpha=4.0, modules=("q_proj", "v_proj", "down_proj")))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral-sliding", "llama-head-dim-bias"])
def test_adapter_matches_transformers_with_the_adapter_merged(family, tmp_path):
    hf = make_hf_model(family)
    path = save_hf_model(hf, tmp_path / "model")
    adapter = save_adapter(tmp_path / "a", hf, seed=3)
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True)
    lora = LoRARequest("a", 1, str(adapter))
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=lora)
    ref = merged(hf, adapter)
    assert_matches(outs, [hf_greedy(ref, p, 12) for p in PROMPTS])
    assert all(o.lora_request == lora for o in outs)
    # The adapter changes the outputs (the comparison above is not of the base model).
    assert [o.outputs[0].token_ids for o in outs] != [hf_greedy(hf, p, 12)[0] for p in PROMPTS]


def test_one_batch_mixes_adapters_and_the_base_model(llama):
    hf, path, a1, a2 = llama
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True, max_loras=2)
    loras = [LoRARequest("a1", 1, str(a1)), LoRARequest("a2", 2, str(a2))]
    prompts = PROMPTS * 2
    per_prompt = [loras[0], None, loras[1], loras[0], loras[1], loras[1], None, loras[0]]
    steps = []
    real = llm.engine.runner.run

    def spy(chunks, kv, padding_rows=0):
        steps.append({c.request.lora_id for c in chunks})
        return real(chunks, kv, padding_rows)

    llm.engine.runner.run = spy
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=per_prompt)
    models = {None: hf, 1: merged(hf, a1), 2: merged(hf, a2)}
    assert_matches(outs, [hf_greedy(models[lr and lr.lora_int_id], p, 12) for p, lr in zip(prompts, per_prompt,
                                                                                             strict=True)])
    assert {0, 1, 2} in steps  # base rows and both adapters' rows ran in the same forward passes


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapters_on_a_gpu_mixed_with_graphed_base_rows(llama, dtype):
    """On CUDA (Triton kernels, decode steps as CUDA graphs): a batch mixing two adapters and the
    base model answers as transformers does with each adapter merged (float32: the same tokens,
    logprobs to 1e-3; bfloat16: every token it picks is within 0.1 nats of the float32 merged
    model's best at that position, so only near ties may differ), while steps with adapter rows
    run eagerly and, once the adapters' requests end, the base rows' steps replay graphs."""
    hf, path, a1, a2 = llama
    llm = LLM(path, dtype=dtype, device="cuda", enable_lora=True, max_loras=2)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and llm.engine.loras.device.type == "cuda"
    replays = []
    real = graphs.run
    graphs.run = lambda rows: replays.append(rows) or real(rows)
    loras = [LoRARequest("a1", 1, str(a1)), LoRARequest("a2", 2, str(a2))]
    prompts = PROMPTS * 2
    per_prompt = [loras[0], None, loras[1], loras[0], loras[1], loras[1], None, loras[0]]
    # The adapters' requests end first, so the last steps are the base model's alone.
    lengths = [6 if lr is not None else 12 for lr in per_prompt]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=per_prompt)
    models = {None: hf, 1: merged(hf, a1), 2: merged(hf, a2)}
    refs = [models[lr and lr.lora_int_id] for lr in per_prompt]
    if dtype == "float32":
        assert_matches(outs, [hf_greedy(m, p, n) for m, p, n in zip(refs, prompts, lengths, strict=True)])
    else:
        for out, ref, prompt in zip(outs, refs, prompts, strict=True):
            tokens = out.outputs[0].token_ids
            with torch.no_grad():
                logp = torch.log_softmax(ref(torch.tensor([prompt + tokens])).logits[0].float(), -1)
            for i, t in enumerate(tokens):
                row = logp[len(prompt) - 1 + i]
                assert row[t] >= row.max() - 0.1, (prompt, i)
    assert replays, "no decode step of the base rows alone replayed a CUDA graph"


@pytest.mark.skipif(cpu_kernels.segment_attention_kernel() is None, reason="the CPU kernels do not build here")
def test_decode_steps_with_adapters_take_the_fused_cpu_step(llama, monkeypatch):
    """Decode steps mixing two adapters (one on every projection, one on q/v/down only) and the base
    model run in the fused C++ step, with the op-by-op path's tokens and log-probabilities."""
    hf, path, a1, a2 = llama
    loras = [LoRARequest("a1", 1, str(a1)), LoRARequest("a2", 2, str(a2))]
    per_prompt = [loras[0], None, loras[1], loras[0]]
    fused_groups = []
    real = cpu_decode.forward

    def spy(model, input_ids, positions, meta, kv_cache, lora=None):
        fused_groups.append((len(lora.groups) if lora else 0, input_ids.shape[0]))
        return real(model, input_ids, positions, meta, kv_cache, lora)

    monkeypatch.setattr(cpu_decode, "forward", spy)
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True, max_loras=2)
    fused = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=per_prompt)
    assert (2, 4) in fused_groups  # a step of all four rows: both adapters and the base model
    monkeypatch.setenv(cpu_decode.FUSED_ENV, "0")
    fused_groups.clear()
    plain = LLM(path, dtype="float32", device="cpu", enable_lora=True, max_loras=2).generate(
        PROMPTS, GREEDY, use_tqdm=False, lora_request=per_prompt)
    assert not fused_groups
    for f, p in zip(fused, plain, strict=True):
        assert f.outputs[0].token_ids == p.outputs[0].token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(f.outputs[0].logprobs, p.outputs[0].logprobs,
                                                               strict=True)) < 1e-4
    models = {None: hf, 1: merged(hf, a1), 2: merged(hf, a2)}
    assert_matches(fused, [hf_greedy(models[lr and lr.lora_int_id], p, 12) for p, lr in zip(PROMPTS, per_prompt,
                                                                                             strict=True)])


def test_max_loras_bounds_the_adapters_running_together(llama):
    hf, path, a1, a2 = llama
    engine = LLMEngine(load_model(path, "float32", "cpu"), None, EngineConfig(enable_lora=True, max_loras=1))
    loras = [LoRARequest("a1", 1, str(a1)), LoRARequest("a2", 2, str(a2))]
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, lora_request=loras[i % 2])
    engine.add_request(PROMPTS[0], GREEDY)  # the base model never counts against max_loras
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        seen.append({r.lora_id for r in engine.scheduler.running})
        assert len({i for i in seen[-1] if i}) <= 1
    assert {0, 1} in seen or {0, 2} in seen  # the base request ran beside an adapter's
    assert any(1 in s for s in seen) and any(2 in s for s in seen)


def test_prefix_cache_is_kept_per_adapter(llama):
    hf, path, a1, a2 = llama
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True, max_loras=2, block_size=4)
    prompt = list(range(20, 45))
    first = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=LoRARequest("a1", 1, str(a1)))[0]
    assert first.num_cached_tokens == 0
    # Another adapter (and the base model) must compute the prompt again: its keys differ.
    other = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=LoRARequest("a2", 2, str(a2)))[0]
    base = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    again = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=LoRARequest("a1", 1, str(a1)))[0]
    assert again.num_cached_tokens == 24
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_matches([other, base], [hf_greedy(merged(hf, a2), prompt, 12), hf_greedy(hf, prompt, 12)])


def test_scaling_rslora_and_per_module_patterns(tmp_path):
    hf = make_hf_model("llama")
    path = save_hf_model(hf, tmp_path / "model")
    adapter = save_adapter(tmp_path / "a", hf, seed=4, rank=4, alpha=6.0, use_rslora=True,
                           rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                           alpha_pattern={"o_proj|up_proj": 1.5})
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=LoRARequest("a", 1, str(adapter)))
    ref = merged(hf, adapter)
    assert_matches(outs, [hf_greedy(ref, p, 12) for p in PROMPTS])


def test_mixture_of_experts_attention_adapter(tmp_path):
    hf = make_hf_model("qwen3-moe")
    path = save_hf_model(hf, tmp_path / "model")
    adapter = save_adapter(tmp_path / "a", hf, seed=5, modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=LoRARequest("a", 1, str(adapter)))
    assert_matches(outs, [hf_greedy(merged(hf, adapter), p, 12) for p in PROMPTS])


def test_adapter_memory_is_set_aside_before_a_gpu_sizes_its_kv_cache(llama, tmp_path, monkeypatch):
    """A GPU's KV cache takes a share of the memory free at start-up, and adapters are loaded
    later: `max_cpu_loras` adapters at `max_lora_rank` are set aside first. The bound is exactly
    what an adapter of every projection at that rank takes; explicit bytes are taken as given."""
    from lengthwise.engine import llm_engine
    from lengthwise.lora.adapter import adapter_bytes_bound

    hf, path, a1, a2 = llama
    mc = load_model(path, "float32", "cpu").config
    full = load_adapter(LoRARequest("full", 1, str(save_adapter(tmp_path / "full", hf, seed=7, rank=16))),
                        mc, torch.float32, torch.device("cpu"), 16)
    bound = adapter_bytes_bound(mc, 16, torch.float32)
    assert full.nbytes == bound and adapter_bytes_bound(mc, 16, torch.bfloat16) * 2 == bound
    assert load_adapter(LoRARequest("a2", 2, str(a2)), mc, torch.float32, torch.device("cpu"), 16).nbytes < bound
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    assert llm_engine._kv_budget_bytes(0.5, cuda, 1 << 30) == 4 << 30
    assert llm_engine._kv_budget_bytes(None, cuda, 0) == int(0.9 * (10 << 30))
    assert llm_engine._kv_budget_bytes(None, cuda, 20 << 30) == 0
    assert llm_engine._kv_budget_bytes(1 << 20, cuda, 1 << 30) == 1 << 20
    # The engine sets aside max_cpu_loras adapters' worth (none without LoRA).
    asked = []
    real = llm_engine._kv_budget_bytes
    monkeypatch.setattr(llm_engine, "_kv_budget_bytes", lambda m, d, reserve=0: asked.append(reserve) or real(m, d))
    LLMEngine(load_model(path, "float32", "cpu"), None, EngineConfig(enable_lora=True, max_loras=2, max_cpu_loras=3))
    LLMEngine(load_model(path, "float32", "cpu"), None, EngineConfig())
    assert asked == [3 * bound, 0]


def test_graphed_decode_steps_leave_adapter_rows_to_the_eager_path(llama, monkeypatch):
    from lengthwise.engine.cuda_graph import DecodeGraphs

    hf, path, a1, _ = llama
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 4)
    graphed = []
    real_run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, rows: graphed.append(len(rows.token_ids))
                        or real_run(self, rows))
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True)
    lora = LoRARequest("a1", 1, str(a1))
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=[lora, None])
    assert_matches(outs, [hf_greedy(merged(hf, a1), PROMPTS[0], 12), hf_greedy(hf, PROMPTS[1], 12)])
    assert not graphed  # every decode step had an adapter row
    graphed.clear()
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert graphed  # base-only decode steps still replay the graphs
    assert_matches(outs, [hf_greedy(hf, p, 12) for p in PROMPTS[:2]])


def test_speculative_decoding_with_an_adapter(llama):
    hf, path, a1, _ = llama
    lora = LoRARequest("a1", 1, str(a1))
    plain = LLM(path, dtype="float32", device="cpu", enable_lora=True)
    spec = LLM(path, dtype="float32", device="cpu", enable_lora=True,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 9, 9, 9, 9]]
    want = plain.generate(prompts, GREEDY, use_tqdm=False, lora_request=lora)
    got = spec.generate(prompts, GREEDY, use_tqdm=False, lora_request=lora)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert spec.engine.stats.draft_tokens > 0


def test_bfloat16_model_with_an_adapter(llama):
    hf, path, a1, _ = llama
    llm = LLM(path, dtype="bfloat16", device="cpu", enable_lora=True)
    lora = LoRARequest("a1", 1, str(a1))
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                       use_tqdm=False, lora_request=lora)[0]
    adapter = load_adapter(lora, llm.engine.model.config, torch.bfloat16, torch.device("cpu"), 16)
    assert all(w.a.dtype == torch.bfloat16 for layer in adapter.layers for w in layer.values())
    assert out.outputs[0].token_ids[:2] == hf_greedy(merged(hf, a1), PROMPTS[1], 2)[0]


def test_registry_keeps_max_cpu_loras_and_ids_mean_one_directory(llama):
    hf, path, a1, a2 = llama
    engine = LLMEngine(load_model(path, "float32", "cpu"), None,
                       EngineConfig(enable_lora=True, max_loras=1, max_cpu_loras=1))
    engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("a1", 1, str(a1)))
    with pytest.raises(ValueError, match="lora_int_id 1 is already adapter 'a1'"):
        engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("x", 1, str(a2)))
    # Adapter 1 is in use: loading adapter 2 keeps it beyond max_cpu_loras until its request ends.
    engine.add_request(PROMPTS[1], GREEDY, lora_request=LoRARequest("a2", 2, str(a2)))
    assert 1 in engine.loras and 2 in engine.loras
    while engine.has_unfinished_requests():
        engine.step()
    for rid in list(engine.requests):
        engine.pop_finished(rid)
    engine.add_request(PROMPTS[2], GREEDY, lora_request=LoRARequest("a1", 1, str(a1)))
    assert len(engine.loras) == 1 and 1 in engine.loras


def test_adapters_added_and_removed_at_run_time(llama):
    """vLLM's LLMEngine.add_lora / remove_lora / list_loras: an adapter removed while a request uses
    it stays loaded until that request ends (which finishes with it), then goes; removing an
    unknown id says so."""
    hf, path, a1, a2 = llama
    engine = LLMEngine(load_model(path, "float32", "cpu"), None,
                       EngineConfig(enable_lora=True, max_loras=2, max_cpu_loras=4))
    assert engine.add_lora(LoRARequest("a1", 1, str(a1))) and engine.add_lora(LoRARequest("a2", 2, str(a2)))
    assert engine.list_loras() == {1, 2}
    engine.add_request(PROMPTS[0], GREEDY, request_id="r", lora_request=LoRARequest("a1", 1, str(a1)))
    engine.step()
    assert engine.remove_lora(1) and engine.remove_lora(2)
    assert engine.list_loras() == set() and 1 in engine.loras and 2 not in engine.loras
    # A request naming the removed adapter (accepted before its removal was seen) uses it, but
    # does not take the removal back: the adapter goes when the last of them ends.
    engine.add_request(PROMPTS[1], GREEDY, request_id="s", lora_request=LoRARequest("a1", 1, str(a1)))
    assert engine.list_loras() == set()
    while engine.has_unfinished_requests():
        engine.step()
    assert_matches([engine.pop_finished(rid) for rid in "rs"],
                   [hf_greedy(merged(hf, a1), p, 12) for p in PROMPTS[:2]])
    assert 1 not in engine.loras and not engine.remove_lora(1)
    with pytest.raises(ValueError, match="max_lora_rank"):
        engine.add_lora(LoRARequest("big", 3, str(save_adapter(path.parent / "big", hf, seed=9, rank=32))))
    assert engine.list_loras() == set()
    plain = LLMEngine(load_model(path, "float32", "cpu"), None, EngineConfig())
    with pytest.raises(ValueError, match="enable_lora"):
        plain.add_lora(LoRARequest("a1", 1, str(a1)))


def test_pinned_adapters_stay_beyond_max_cpu_loras(llama):
    """A server pins the adapters it serves: loading another never drops them (it would be read
    again on the engine thread at its next request); unpinned ones still make room."""
    hf, path, a1, a2 = llama
    engine = LLMEngine(load_model(path, "float32", "cpu"), None,
                       EngineConfig(enable_lora=True, max_loras=1, max_cpu_loras=1))
    engine.add_lora(LoRARequest("a1", 1, str(a1)))
    assert engine.pin_lora(1) and not engine.pin_lora(5)
    engine.add_lora(LoRARequest("a2", 2, str(a2)))
    engine.add_lora(LoRARequest("a3", 3, str(a2)))  # (another id, the same directory)
    assert engine.list_loras() == {1, 3}  # 1 pinned; 2 made room for 3
    assert engine.remove_lora(1)  # removing unpins
    engine.add_lora(LoRARequest("a2", 2, str(a2)))
    assert engine.list_loras() == {2}


def test_an_id_stays_its_directory_after_its_adapter_was_dropped(llama):
    """The prefix cache keeps blocks under an adapter's id after the adapter itself was dropped:
    the id may not come back meaning another directory."""
    hf, path, a1, a2 = llama
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True, max_loras=1, max_cpu_loras=1)
    llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False, lora_request=LoRARequest("a1", 1, str(a1)))
    llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False, lora_request=LoRARequest("a2", 2, str(a2)))
    assert 1 not in llm.engine.loras and 2 in llm.engine.loras
    with pytest.raises(ValueError, match="lora_int_id 1 is already adapter 'a1'"):
        llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False, lora_request=LoRARequest("c", 1, str(a2)))


def test_a_steady_stream_of_one_adapter_does_not_starve_another(llama):
    hf, path, a1, a2 = llama
    engine = LLMEngine(load_model(path, "float32", "cpu"), None,
                       EngineConfig(enable_lora=True, max_loras=1, max_cpu_loras=2))
    engine.scheduler.lora_turn_steps = 4  # (default 256: a typical answer's length)
    first, second = LoRARequest("a1", 1, str(a1)), LoRARequest("a2", 2, str(a2))
    short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPTS[0], short, lora_request=first)
    engine.step()
    other = engine.add_request(PROMPTS[1], short, lora_request=second)
    base = engine.add_request(PROMPTS[2], short)
    for _ in range(30):  # a new request of the running adapter every step
        engine.add_request(PROMPTS[3], short, lora_request=first)
        engine.step()
        if other.status is not RequestStatus.WAITING:
            break
    assert other.status is not RequestStatus.WAITING  # admitted once the first adapter's rows drained
    assert base.status is not RequestStatus.WAITING  # the base model's request never waited for it


def test_a_running_adapter_takes_all_its_waiting_requests_in_its_turn(llama):
    """max_loras=1 with requests of two adapters interleaved: the first adapter's turn batches all
    of its requests (not one at a time behind the other adapter's), then the second's."""
    hf, path, a1, a2 = llama
    engine = LLMEngine(load_model(path, "float32", "cpu"), None,
                       EngineConfig(enable_lora=True, max_loras=1, max_cpu_loras=2))
    loras = [LoRARequest("a1", 1, str(a1)), LoRARequest("a2", 2, str(a2))]
    for i in range(8):
        engine.add_request(PROMPTS[i % 4], GREEDY, lora_request=loras[i % 2])
    engine.step()
    assert [r.lora_id for r in engine.scheduler.running] == [1, 1, 1, 1]
    while engine.has_unfinished_requests() and 2 not in {r.lora_id for r in engine.scheduler.running}:
        engine.step()
    assert [r.lora_id for r in engine.scheduler.running] == [2, 2, 2, 2]


def _adapter_with(tmp_path: Path, hf, config: dict | None = None, extra: dict | None = None) -> Path:
    path = save_adapter(tmp_path / "bad", hf, seed=6, modules=("q_proj",), **(config or {}))
    if extra:
        from safetensors.torch import load_file

        save_file({**load_file(path / "adapter_model.safetensors"), **extra}, path / "adapter_model.safetensors")
    return path


def test_a_corrupt_adapter_file_is_refused_naming_it(llama, tmp_path):
    hf, path, *_ = llama
    adapter = _adapter_with(tmp_path, hf)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True)
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request=LoRARequest("bad", 1, str(adapter)))


@pytest.mark.parametrize("config, extra, message", [
    ({"use_dora": True}, None, "DoRA adapters"),
    ({"bias": "lora_only"}, None, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"peft_type": "IA3"}, None, "peft_type 'IA3'"),
    ({"r": 0}, None, "r must be a positive number"),
    (None, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 320)}, "embed_tokens"),
    (None, {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, "lm_head"),
    (None, {"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}, "layer 5"),
    (None, {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}, "lora_B missing"),
    (None, {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(64, 4)}, r"expected \[rank, 64\]"),
])
def test_adapters_the_engine_cannot_serve_are_refused(llama, tmp_path, config, extra, message):
    hf, path, *_ = llama
    bad = _adapter_with(tmp_path, hf, config, extra)
    engine = LLMEngine(load_model(path, "float32", "cpu"), None, EngineConfig(enable_lora=True))
    with pytest.raises(ValueError, match=message):
        engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("bad", 1, str(bad)))
    assert not engine.requests  # nothing was queued


def test_lora_request_and_config_errors(llama, tmp_path):
    hf, path, a1, a2 = llama
    model = load_model(path, "float32", "cpu")
    with pytest.raises(ValueError, match="enable_lora=True"):
        LLMEngine(model, None, EngineConfig()).add_request(PROMPTS[0], GREEDY,
                                                           lora_request=LoRARequest("a", 1, str(a1)))
    engine = LLMEngine(model, None, EngineConfig(enable_lora=True, max_lora_rank=4))
    with pytest.raises(ValueError, match="above max_lora_rank=4"):
        engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("a2", 2, str(a2)))  # rank 8
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("none", 3, str(tmp_path)))
    with pytest.raises(ValueError, match="lora_request must be a LoRARequest"):
        engine.add_request(PROMPTS[0], GREEDY, lora_request={"lora_name": "a"})
    for kwargs, message in (({"lora_int_id": 0}, "lora_int_id must be a positive integer"),
                            ({"lora_name": ""}, "lora_name must be a non-empty string")):
        with pytest.raises(ValueError, match=message):
            LoRARequest(**{"lora_name": "a", "lora_int_id": 1, "lora_path": str(a1), **kwargs})
    for kwargs, message in (({"max_loras": 0}, "max_loras must be a positive integer"),
                            ({"max_lora_rank": -1}, "max_lora_rank must be a positive integer"),
                            ({"max_loras": 4, "max_cpu_loras": 2}, r"max_cpu_loras \(2\) must be at least max_loras"),
                            ({"enable_lora": "yes"}, "enable_lora must be a bool")):
        with pytest.raises(ValueError, match=message):
            EngineConfig(**kwargs)
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True)
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=[LoRARequest("a", 1, str(a1))])
    # An engine sharing another's adapters must be one with LoRA on, over the same model.
    owner = llm.engine
    other = load_model(path, "float32", "cpu")
    for model, config in ((owner.model, EngineConfig()), (other, EngineConfig(enable_lora=True))):
        with pytest.raises(ValueError, match="lora_owner must be an engine with enable_lora=True on the same model"):
            LLMEngine(model, None, config, lora_owner=owner)


def test_mixture_of_experts_mlp_adapters_are_refused(tmp_path):
    hf = make_hf_model("qwen3-moe")
    path = save_hf_model(hf, tmp_path / "model")
    bad = save_adapter(tmp_path / "a", hf, seed=7, modules=("q_proj",))
    from safetensors.torch import load_file

    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, bad / "adapter_model.safetensors")
    engine = LLMEngine(load_model(path, "float32", "cpu"), None, EngineConfig(enable_lora=True))
    with pytest.raises(ValueError, match="a mixture-of-experts layer"):
        engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("a", 1, str(bad)))


LENGTH_INSTRUCTIONS = ["Count from 12 to 57.", "Spell the word apple.", "List 5 animals.",
                       "Describe a fox in 3 sentences.", "Repeat the phrase 'good day' 9 times.",
                       "Write the numbers from 175 to 189 in words.", "What is 34 + 58? Show your working.",
                       "Sort these numbers: 5, 3, 9, 1."]


@pytest.fixture(scope="module")
def builtin_with_adapter(tmp_path_factory):
    """The built-in model (it answers the length query), a mild adapter for it, and the built-in
    model with that adapter merged, saved with its tokenizer: (model dir, adapter, merged dir)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lengthwise.model.default import default_model_dir

    model_dir = default_model_dir()
    root = tmp_path_factory.mktemp("lora-builtin")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = save_adapter(root / "a", hf, seed=3, alpha=0.5)
    merged(hf, adapter).save_pretrained(root / "merged")
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, root / "merged" / f.name)
    return model_dir, adapter, root / "merged"


def test_self_length_predictor_asks_through_the_request_adapter(builtin_with_adapter):
    """The `self` predictor asks the model that will answer: a request with an adapter gets the
    prediction the model with that adapter merged makes, not the base model's."""
    model_dir, adapter, merged_dir = builtin_with_adapter
    lora = LoRARequest("a", 1, str(adapter))
    one = SamplingParams(max_tokens=1)
    llm = LLM(model_dir, dtype="float32", device="cpu", enable_lora=True, length_predictor="self")
    with_adapter = [o.predicted_length for o in llm.generate(LENGTH_INSTRUCTIONS, one, use_tqdm=False,
                                                              lora_request=lora)]
    base = [o.predicted_length for o in llm.generate(LENGTH_INSTRUCTIONS, one, use_tqdm=False)]
    ref = LLM(merged_dir, dtype="float32", device="cpu", length_predictor="self")
    want = [o.predicted_length for o in ref.generate(LENGTH_INSTRUCTIONS, one, use_tqdm=False)]
    assert with_adapter == pytest.approx(want, rel=1e-4)
    # The adapter moves the model's own estimates (the comparison above is not of the base model).
    assert sum(abs(a - b) > 1 for a, b in zip(with_adapter, base, strict=True)) >= 3


def test_self_predictor_keeps_a_removed_adapter_its_request_still_needs(builtin_with_adapter, tmp_path):
    """The asking engine shares the served engine's adapters and keeps the ones the served
    requests hold: an adapter removed while its request waits to be predicted still serves that
    request's question and answer, and goes when the request ends. Recorded lengths name it."""
    model_dir, adapter, merged_dir = builtin_with_adapter
    lora = LoRARequest("a", 1, str(adapter))
    engine = LLMEngine.from_dir(model_dir, EngineConfig(dtype="float32", device="cpu", enable_lora=True,
                                                        length_predictor="self",
                                                        record_lengths=str(tmp_path / "rec.jsonl")))
    engine.add_request(LENGTH_INSTRUCTIONS[0], GREEDY, request_id="r", lora_request=lora)
    assert engine.remove_lora(1) and 1 in engine.loras
    while engine.has_unfinished_requests():
        engine.step()
    out = engine.pop_finished("r")
    ref = LLM(merged_dir, dtype="float32", device="cpu", length_predictor="self")
    want = ref.generate([LENGTH_INSTRUCTIONS[0]], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want.outputs[0].token_ids
    assert out.predicted_length == pytest.approx(want.predicted_length, rel=1e-4)
    assert 1 not in engine.loras
    record = json.loads((tmp_path / "rec.jsonl").read_text())
    assert record["lora"] == "a" and record["predicted"] == out.predicted_length

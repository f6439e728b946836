"""The continuous-batching engine end to end: batching, preemption, sharing, seeds, abort, validation."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import STORIES, requires_stories

from lengthwise import LLM, SamplingParams
from lengthwise.config import EngineConfig
from lengthwise.engine.llm import run_to_completion
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.kv.storage import KVCacheStorage
from lengthwise.model import load_model


@pytest.fixture(scope="module")
def llama(hf_checkpoint):
    """(transformers model, lengthwise float32 model) of the tiny random Llama."""
    hf, path = hf_checkpoint("llama")
    return hf, load_model(path, "float32", "cpu")


def _engine(model, **config) -> LLMEngine:
    return LLMEngine(model, None, EngineConfig(**config))


def _prompts(n: int, seed: int = 0, vocab: int = 320, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _block_bytes(model, block_size: int = 16) -> int:
    c = model.config
    return KVCacheStorage.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, model.dtype)


def test_greedy_matches_transformers(llama):
    hf, model = llama
    prompts = _prompts(4, seed=1)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = run_to_completion(_engine(model), prompts, [params] * 4)
    for p, got in zip(prompts, _tokens(outs), strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert got == ref[0, len(p):].tolist()


@pytest.mark.parametrize("tight_cache", [False, True], ids=["roomy", "preempting"])
def test_64_mixed_prompts_batched_equal_each_alone(llama, tight_cache):
    _, model = llama
    prompts = _prompts(64, seed=2)
    rng = random.Random(3)
    params = [SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True) for _ in prompts]
    alone = [_tokens(run_to_completion(_engine(model, max_num_seqs=1), [p], [sp]))[0]
             for p, sp in zip(prompts, params, strict=True)]
    # 20 blocks of 16 tokens hold a few sequences at a time: the 64 requests must preempt each other.
    config = dict(kv_cache_memory=20 * _block_bytes(model)) if tight_cache else {}
    engine = _engine(model, max_num_batched_tokens=256, **config)
    batched = _tokens(run_to_completion(engine, prompts, params))
    assert batched == alone
    assert [len(t) for t in batched] == [sp.max_tokens for sp in params]
    if tight_cache:
        assert engine.num_blocks == 20
        assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks


def test_chunked_prefill_gives_the_same_tokens(llama):
    _, model = llama
    prompts = _prompts(6, seed=4, max_len=120)
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 6
    whole = _tokens(run_to_completion(_engine(model), prompts, params))
    chunked_engine = _engine(model, max_num_batched_tokens=7)
    assert _tokens(run_to_completion(chunked_engine, prompts, params)) == whole


def test_n_samples_store_the_prompt_once(llama):
    _, model = llama
    engine = _engine(model, block_size=4)
    prompt = _prompts(1, seed=5, max_len=40)[0]
    prompt = (prompt * 3)[:30]  # 30 tokens: 8 blocks of 4
    engine.add_request(prompt, SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=1, ignore_eos=True), "r")
    kv = engine.scheduler.kv
    engine.step()  # prefill: the prompt once, then a first token for each sample
    prompt_blocks = kv.prompt_segment("r").blocks
    assert len(prompt_blocks) == 8
    assert engine.num_blocks - kv.num_free_blocks == 8
    assert all(kv.pool.refcount(b) == 4 for b in prompt_blocks)
    engine.step()  # each sample's first response block
    assert engine.num_blocks - kv.num_free_blocks == 8 + 4
    while engine.has_unfinished_requests():
        engine.step()
    out = engine.pop_finished("r")
    assert [len(c.token_ids) for c in out.outputs] == [10] * 4
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # samples differ (seed + index)
    assert kv.num_free_blocks == engine.num_blocks


def test_seeded_sample_is_the_same_alone_and_in_a_batch_of_32(llama):
    _, model = llama
    prompts = _prompts(32, seed=6)
    rng = random.Random(7)
    params = [SamplingParams(max_tokens=rng.randint(4, 20), temperature=rng.choice([0.0, 0.7, 1.0]),
                             top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]), seed=rng.randrange(1000),
                             ignore_eos=True) for _ in prompts]
    target = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    params[17] = target
    alone = _tokens(run_to_completion(_engine(model), [prompts[17]], [target]))[0]
    batched = _tokens(run_to_completion(_engine(model, max_num_batched_tokens=64), prompts, params))
    assert batched[17] == alone
    again = _tokens(run_to_completion(_engine(model), [prompts[17]], [target]))[0]
    assert again == alone
    other = _tokens(run_to_completion(_engine(model), [prompts[17]], [SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.95, seed=4321, ignore_eos=True)]))[0]
    assert other != alone


def test_abort_frees_every_block(llama):
    _, model = llama
    engine = _engine(model, max_num_seqs=4)
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, n=2, ignore_eos=True)).request_id
           for p in _prompts(6, seed=8)]
    for _ in range(3):
        engine.step()
    kv = engine.scheduler.kv
    assert kv.num_free_blocks < engine.num_blocks
    assert engine.scheduler.num_waiting > 0  # some still waiting, some running
    for rid in ids:
        assert engine.abort_request(rid)
    assert kv.num_free_blocks == engine.num_blocks
    assert not engine.has_unfinished_requests()
    out = engine.pop_finished(ids[0])
    assert out.finished and {c.finish_reason for c in out.outputs} == {"abort"}
    assert not engine.abort_request(ids[1])  # already finished


def test_engine_validation_names_the_problem(llama):
    _, model = llama
    engine = _engine(model)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(3, 259)), SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.add_request([5, 320], SamplingParams())
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("text", SamplingParams())
    engine.add_request([5], SamplingParams(), "dup")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([5], SamplingParams(), "dup")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        _engine(model, kv_cache_memory=100)
    with pytest.raises(ValueError, match="max_num_seqs"):
        _engine(model, max_num_seqs=2).add_request([5], SamplingParams(n=3))
    small = _engine(model, kv_cache_memory=17 * _block_bytes(model))  # 16 blocks: one 256-token context
    with pytest.raises(ValueError, match="KV blocks"):
        small.add_request([5] * 10, SamplingParams(n=4, max_tokens=200))
    for bad in (dict(max_num_seqs=0), dict(max_num_batched_tokens=-1), dict(kv_cache_memory=1.5),
                dict(block_size="16"), dict(policy="")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)


def test_llm_api_text_prompts_chat_and_outputs(random_model):
    llm = LLM(random_model, dtype="float32", device="cpu", max_num_seqs=8)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate(["the sun and the sea", "a word"], params, use_tqdm=False)
    assert [o.prompt for o in outs] == ["the sun and the sea", "a word"]
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "length" and len(c.token_ids) == 6
        assert c.text == llm.tokenizer.decode(c.token_ids)
        assert o.prompt_token_ids == llm.tokenizer.encode(o.prompt)
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
    by_ids = llm.generate([{"prompt_token_ids": outs[0].prompt_token_ids}], params, use_tqdm=False)
    assert by_ids[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": "hello there"}], params, use_tqdm=False)
    assert chat[0].prompt_token_ids == llm.tokenizer.encode_chat([{"role": "user", "content": "hello there"}])
    with pytest.raises(ValueError, match="unknown LLM argument"):
        LLM(random_model, max_num_sequences=3)
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        llm.generate(["x"], [params, params], use_tqdm=False)
    assert not llm.engine.requests  # nothing left queued after the failed call


@pytest.mark.parametrize("policy", ["priority", "continuous-sjf"])
def test_generate_serves_lower_priority_values_first_with_the_same_tokens(random_model, policy):
    """vLLM's `LLM.generate(..., priority=[...])`: one sequence at a time, the requests start in
    priority order (ties: arrival), and each writes what it writes under FCFS."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = ["the sun", "a word", "the sea and", "one more", "last"]
    prio = [3, 1, 2, 1, 0]
    llm = LLM(random_model, dtype="float32", device="cpu", max_num_seqs=1, policy=policy)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=prio)
    started = sorted(range(len(prompts)), key=lambda i: outs[i].metrics.first_token_time)
    assert started == [4, 1, 3, 2, 0]
    fcfs = LLM(random_model, dtype="float32", device="cpu", max_num_seqs=1)
    assert _tokens(outs) == _tokens(fcfs.generate(prompts, params, use_tqdm=False))
    with pytest.raises(ValueError, match="priority has 1 entries for 2 prompts"):
        llm.generate(["x", "y"], params, use_tqdm=False, priority=[0])
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.generate(["x"], params, use_tqdm=False, priority=[True])
    with pytest.raises(ValueError, match="priority must be a list"):
        llm.generate(["x"], params, use_tqdm=False, priority=1)
    # A policy that would ignore it refuses it (vLLM's rule), naming the policies that do not.
    with pytest.raises(ValueError, match=r"priority=2 needs a scheduling policy .*'fcfs'"):
        fcfs.generate(["x"], params, use_tqdm=False, priority=[2])
    assert fcfs.generate(["x"], params, use_tqdm=False, priority=[0])[0].finished
    assert not llm.engine.requests and not fcfs.engine.requests


def test_logprobs_and_stop_strings_through_the_engine(random_model):
    llm = LLM(random_model, dtype="float32", device="cpu")
    base = llm.generate(["the sun and the sea"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    words = base.text.split()
    assert len(words) >= 4
    stop = " " + words[2]
    cut = llm.generate(["the sun and the sea"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                                stop=[stop], logprobs=3), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[:base.text.index(stop)]
    assert len(cut.logprobs) == len(cut.token_ids)
    assert all(len(lp.top) == 3 and lp.rank >= 1 for lp in cut.logprobs)


@requires_stories
def test_stories260k_batched_equals_unbatched():
    llm = LLM(STORIES, dtype="float32", device="cpu")
    prompts = ["Once upon a time", "Lily wanted to", "The dog ran to the", "One day, a big bird", "Tom"]
    greedy = SamplingParams(max_tokens=400, temperature=0.0)
    sampled = SamplingParams(max_tokens=80, temperature=0.8, top_p=0.9, seed=11)
    for params in (greedy, sampled):
        batched = llm.generate(prompts, params, use_tqdm=False)
        for p, b in zip(prompts, batched, strict=True):
            alone = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
            assert alone.token_ids == b.outputs[0].token_ids
            assert alone.text == b.outputs[0].text
    assert any(o.outputs[0].finish_reason == "stop" for o in llm.generate(prompts, greedy, use_tqdm=False))


@requires_stories
def test_min_tokens_holds_off_every_stop_until_it_is_reached():
    """vLLM's min_tokens: the end token cannot be drawn and stop strings do not cut before it; the
    greedy tokens before the natural end are unchanged, and a batch mixing it with plain requests
    gives each what it gives alone."""
    llm = LLM(STORIES, dtype="float32", device="cpu")
    prompt = "Once upon a time"
    base = llm.generate(prompt, SamplingParams(max_tokens=400, temperature=0), use_tqdm=False)[0].outputs[0]
    assert base.finish_reason == "stop" and base.stop_reason is None  # ended at the end token
    n = len(base.token_ids)
    longer = SamplingParams(max_tokens=400, temperature=0, min_tokens=n + 10)
    out = llm.generate(prompt, longer, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= n + 10 and out.token_ids[:n - 1] == base.token_ids[:n - 1]
    assert llm.get_tokenizer().eos_token_id not in out.token_ids[:n + 10]
    stop = base.text.split()[1]  # a word early in the text: it would cut there
    cut = llm.generate(prompt, SamplingParams(max_tokens=400, temperature=0, stop=[stop]), use_tqdm=False)[0]
    held = llm.generate(prompt, SamplingParams(max_tokens=400, temperature=0, stop=[stop], min_tokens=n - 1),
                        use_tqdm=False)[0].outputs[0]
    assert len(cut.outputs[0].token_ids) < n - 1 and len(held.token_ids) >= n - 1
    mixed = llm.generate([prompt, "Tom", prompt], [longer, SamplingParams(max_tokens=50, temperature=0),
                                                   SamplingParams(max_tokens=400, temperature=0)], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == out.token_ids and mixed[2].outputs[0].token_ids == base.token_ids
    # vLLM's boundary: the text of the first min_tokens tokens is never cut by a stop string
    first = llm.get_tokenizer().decode(base.token_ids[:1])
    at_first = SamplingParams(max_tokens=4, temperature=0, stop=[first])
    assert llm.generate(prompt, at_first, use_tqdm=False)[0].outputs[0].token_ids == base.token_ids[:1]
    kept = llm.generate(prompt, dataclasses.replace(at_first, min_tokens=1), use_tqdm=False)[0].outputs[0]
    assert len(kept.token_ids) > 1 and kept.text.startswith(first)
    with pytest.raises(ValueError, match="min_tokens must be at most max_tokens"):
        SamplingParams(max_tokens=5, min_tokens=6)


def test_prefix_caching_reuses_a_shared_prompt_prefix_without_changing_outputs(llama):
    _, model = llama
    shared = _prompts(1, seed=9, max_len=60)[0]
    shared = (shared * 3)[:40]
    prompts = [shared + tail for tail in _prompts(3, seed=10, max_len=10)]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)] * 3
    off = _tokens(run_to_completion(_engine(model, enable_prefix_caching=False), prompts, params))
    engine = _engine(model)
    first = run_to_completion(engine, prompts[:1], params[:1])
    rest = run_to_completion(engine, prompts[1:], params[1:])
    assert _tokens(first + rest) == off
    # 40 shared tokens = 2 whole blocks of 16 found in the cache for each later request.
    assert first[0].num_cached_tokens == 0
    assert [r.num_cached_tokens for r in rest] == [32, 32]
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks


# -- the offline API as vLLM users call it ---------------------------------------------------------

def test_llm_inputs_are_read_as_vllm_reads_them_or_refused_by_name(random_model):
    llm = LLM(model=random_model, dtype="float32", device="cpu", max_num_seqs=8, max_model_len=40)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    ids = llm.tokenizer.encode("the sun")
    both = llm.generate([{"prompt": "the sun", "prompt_token_ids": ids}], params, use_tqdm=False)[0]
    assert both.prompt == "the sun" and both.prompt_token_ids == ids
    for bad, match in ((b"the sun", "bytes"), ({"prompt": 5}, "'prompt' must be a string"),
                       ({"prompt_token_ids": None}, "prompt_token_ids"), ({"prompt": "x", "images": 1}, "images"),
                       ({"prompt": "x", "true_length": "abc"}, "true_length")):
        with pytest.raises(ValueError, match=match):
            llm.generate(["the sea", bad] if not isinstance(bad, bytes) else bad, params, use_tqdm=False)
        assert not llm.engine.requests  # the good prompt before it is not left queued
    with pytest.raises(ValueError, match="sampling_params must be"):
        llm.generate(["x"], {"max_tokens": 3}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"sampling_params\[1\]"):
        llm.generate(["x", "y"], [params, "greedy"], use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(["x"], SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(random_model, dtype="float32", device="cpu", max_model_len=10**6)
    with pytest.raises(ValueError, match="not both"):
        LLM(random_model, model=random_model)
    with pytest.raises(ValueError, match="policy_options must be a dict"):
        LLM(random_model, device="cpu", policy_options=[1])
    assert LLM(random_model, dtype="half", device="cpu").engine.model.embed.dtype == torch.float16  # vLLM's alias
    rest = llm.generate(["the sun"], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0]
    assert len(rest.outputs[0].token_ids) == 40 - len(rest.prompt_token_ids)  # None: up to the context
    bars = []

    class Bar:  # vLLM's use_tqdm may be a tqdm-like class
        def __init__(self, **kwargs):
            bars.append(kwargs["total"])

        def update(self, n):
            bars.append(n)

        def set_postfix(self, **_):
            pass

        def close(self):
            pass

        format_dict = {"elapsed": 1.0}

    llm.generate(["a", "b"], params, use_tqdm=Bar)
    assert bars == [2, 1, 1]


def test_llm_chat_joins_text_parts_and_keeps_the_rendered_prompt(random_model):
    llm = LLM(random_model, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    plain = llm.chat([{"role": "user", "content": "hello there"}], params, use_tqdm=False)[0]
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                   {"type": "text", "text": "there"}]}], params, use_tqdm=False)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids and parts.outputs[0].text == plain.outputs[0].text
    assert plain.prompt == llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}])
    with pytest.raises(ValueError, match=r"messages\[1\].content"):
        llm.chat([{"role": "system", "content": "x"}, {"role": "user", "content": None}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="only text parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], params, use_tqdm=False)
    # vLLM's chat arguments: a prefilled answer to go on with, template variables, tools
    prefilled = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "General"}]
    go_on = llm.chat(prefilled, params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True,
                     chat_template_kwargs={"unused": True}, tools=[{"type": "function", "function": {"name": "f"}}])[0]
    assert go_on.prompt.endswith("General")


def test_outputs_carry_vllms_fields_and_stop_tokens_leave_no_text(random_model):
    llm = LLM(random_model, dtype="float32", device="cpu")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    base = llm.generate(["the sun and the sea"], greedy, use_tqdm=False)[0].outputs[0]
    assert base.finished() and base.stop_reason is None
    assert base.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in base.logprobs))
    first = base.logprobs[0]
    assert first[base.token_ids[0]].logprob == first.logprob and first[first.top[1][0]].rank == 2
    assert set(first) == {base.token_ids[0], *(t for t, _ in first.top)}
    # vLLM's decoded_token: each token's text where it stands, so the sampled ones spell the text
    # (a piece of a character shows its bytes escaped, as the server's logprobs do).
    pieces = [lp[t].decoded_token for lp, t in zip(base.logprobs, base.token_ids, strict=True)]
    raw = b"".join(llm.tokenizer.token_bytes(t) if "\\x" in d else d.encode()
                   for d, t in zip(pieces, base.token_ids, strict=True))
    assert raw.decode("utf-8", "replace") == base.text
    prompt_ids = llm.tokenizer.encode("the sun and the sea")
    for t, _ in first.top:
        want = llm.tokenizer.decode(prompt_ids + [t])[len(llm.tokenizer.decode(prompt_ids)):]
        if "\ufffd" in want:  # part of a character: its bytes, escaped
            want = llm.tokenizer.token_bytes(t).decode("utf-8", "backslashreplace")
        assert first[t].decoded_token == want
    undecoded = dataclasses.replace(greedy, detokenize=False)
    plain = llm.generate(["the sun and the sea"], undecoded, use_tqdm=False)[0].outputs[0]
    assert plain.token_ids == base.token_ids and plain.logprobs[0][plain.token_ids[0]].decoded_token is None
    assert SamplingParams(max_tokens=3).clone() == SamplingParams(max_tokens=3)
    stop_id = base.token_ids[3]
    k = base.token_ids.index(stop_id)
    for include in (False, True):
        p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id],
                           include_stop_str_in_output=include)
        out = llm.generate(["the sun and the sea"], p, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == base.token_ids[:k + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
        prompt = llm.tokenizer.encode("the sun and the sea")
        want = llm.tokenizer.decode(prompt + out.token_ids[:k + include])[len(llm.tokenizer.decode(prompt)):]
        assert out.text == want  # vLLM: the stop token's text only with include_stop_str_in_output
    stop = " " + base.text.split()[2]
    cut = llm.generate(["the sun and the sea"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                                stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.stop_reason == stop and cut.cumulative_logprob is None


@requires_stories
def test_a_stop_string_in_text_flushed_at_the_end_is_still_cut(monkeypatch):
    """A byte-fallback run is held back until it is complete; when the sample ends right after it
    (its token limit, or the end token), the flushed text is checked for stop strings too."""
    import lengthwise.engine.llm_engine as engine_module
    from lengthwise.engine.sampler import SampleOutput

    llm = LLM(STORIES, dtype="float32", device="cpu")
    tok = llm.tokenizer
    euro = [tok.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    forced = [tok.encode(" c", add_special_tokens=False)[-1], *euro, tok.eos_token_id]
    monkeypatch.setattr(engine_module, "sample", lambda logits, params, gens, prompts, outputs, **_:
                        SampleOutput([forced[len(o)] for o in outputs], [None] * len(outputs)))
    for max_tokens in (4, 10):  # the run ends at the limit, or the end token follows it
        out = llm.generate(["Once"], SamplingParams(max_tokens=max_tokens, stop=["€"]), use_tqdm=False)[0].outputs[0]
        assert out.text == " c" and out.finish_reason == "stop" and out.stop_reason == "€", (max_tokens, out)


def test_generation_config_repetition_penalty_and_max_new_tokens_are_defaults(random_model, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(random_model, d)
    (d / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.3, "max_new_tokens": 7}))
    llm = LLM(d, dtype="float32", device="cpu")
    defaults = llm.get_default_sampling_params()
    assert defaults.repetition_penalty == 1.3 and defaults.max_tokens == 7 and defaults.greedy
    explicit = SamplingParams(max_tokens=7, temperature=0.0, repetition_penalty=1.3)
    got = llm.generate(["the sun and the sea"], use_tqdm=False)[0].outputs[0]
    assert got.token_ids == llm.generate(["the sun and the sea"], explicit, use_tqdm=False)[0].outputs[0].token_ids


# -- prompt logprobs (scoring a text, as evaluation harnesses do) -----------------------------------

def _reference_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each prompt position, `[len(prompt) - 1, vocab]`."""
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


@pytest.mark.parametrize("config", [
    {}, {"max_num_batched_tokens": 7}, {"enable_prefix_caching": True}, {"num_blocks": 12}],
    ids=["whole", "chunked", "prefix-cached", "preempting"])
def test_prompt_logprobs_match_transformers(llama, config):
    """Every prompt token after the first, scored under the tokens before it, with its rank and the
    top k: equal to transformers' log-softmax whether the prompt is computed whole, in chunks of 7,
    after the same prompts filled the prefix cache (which scoring must not reuse), or
    recomputed after a preemption. Requests without prompt_logprobs get none."""
    hf, model = llama
    prompts = [p for p in _prompts(8, seed=21, max_len=40) if len(p) > 1][:5]
    num_blocks = config.pop("num_blocks", None)
    engine = _engine(model, **config)
    if num_blocks is not None:  # a cache too small for all five at once: some are preempted
        engine = _engine(model, kv_cache_memory=num_blocks * _block_bytes(model), max_model_len=128)
    if config.get("enable_prefix_caching"):  # the prompts' whole blocks are cached before they are scored
        warm = run_to_completion(engine, prompts, [SamplingParams(max_tokens=2, temperature=0)] * len(prompts))
        assert run_to_completion(engine, prompts, [SamplingParams(max_tokens=2, temperature=0)] * len(prompts)
                                 )[2].num_cached_tokens == 32 and warm[2].num_cached_tokens == 0
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=k) for k in (0, 3, 3, 1, 5)]
    outs = run_to_completion(engine, prompts, params)
    if num_blocks is not None:
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    for prompt, out, p in zip(prompts, outs, params, strict=True):
        assert out.num_cached_tokens == 0
        want = _reference_prompt_logprobs(hf, prompt)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for j, lp in enumerate(got[1:]):
            row = want[j]
            assert lp.token_id == prompt[j + 1]
            assert lp.logprob == pytest.approx(row[prompt[j + 1]].item(), abs=1e-4)
            assert lp.rank == int((row >= row[prompt[j + 1]] - 1e-6).sum())
            # the k largest values, each at a token whose reference logprob it is (near-ties may swap)
            assert [v for _, v in lp.top] == pytest.approx(row.topk(p.prompt_logprobs).values.tolist(), abs=1e-4)
            assert [v for _, v in lp.top] == pytest.approx([row[t].item() for t, _ in lp.top], abs=1e-4)
            assert lp[prompt[j + 1]].logprob == lp.logprob  # vLLM's dict view
    plain = run_to_completion(engine, prompts[:1], [SamplingParams(max_tokens=2, temperature=0)])[0]
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_of_a_request_ended_before_its_prompt_was_scored(random_model):
    """Aborted before its prefill, or halfway through a chunked one: the output (detokenized) has
    None for every prompt token not scored yet and the scored ones with their text."""
    engine = LLM(random_model, dtype="float32", device="cpu", max_num_batched_tokens=8).engine
    prompt = _prompts(1, seed=30, max_len=40)[0] * 2
    params = SamplingParams(max_tokens=4, prompt_logprobs=1)
    engine.add_request(prompt, params, "before")
    engine.abort_request("before")
    assert engine.pop_finished("before").prompt_logprobs == [None] * len(prompt)
    engine.add_request(prompt, params, "halfway")
    engine.step()  # the first chunk of 8 tokens: positions 0..7 score tokens 1..8
    engine.abort_request("halfway")
    got = engine.pop_finished("halfway").prompt_logprobs
    assert [lp is not None for lp in got] == [False] + [True] * 8 + [False] * (len(prompt) - 9)
    assert [lp.token_id for lp in got[1:9]] == prompt[1:9]
    assert all(lp[lp.token_id].decoded_token is not None for lp in got[1:9])


def test_prompt_logprobs_are_scored_once_when_decode_steps_are_graphed(llama, monkeypatch):
    """Decode steps through the graph buffers (run eagerly on the CPU) score no prompt again."""
    _, model = llama
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 4)
    engine = _engine(model)
    assert engine.runner.graphs is not None
    calls = []
    score = engine._score_prompt
    monkeypatch.setattr(engine, "_score_prompt", lambda *a: (calls.append(a[0].request_id), score(*a)))
    prompt = _prompts(1, seed=31, max_len=30)[0] * 2
    out = run_to_completion(engine, [prompt], [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                              prompt_logprobs=1)])[0]
    assert len(calls) == 1 and len(out.outputs[0].token_ids) == 10
    assert all(lp is not None for lp in out.prompt_logprobs[1:])


def test_prompt_logprobs_decoded_tokens_and_validation(random_model):
    """Offline, each prompt entry's `decoded_token` is the token's text where it stands, so the
    pieces after the first token join into the prompt's text after it; bad values name the field."""
    llm = LLM(random_model, dtype="float32", device="cpu")
    text = "the cat sat on the mat"
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    pieces = [lp[t].decoded_token for lp, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(ids[:1], skip_special_tokens=False) + "".join(pieces) == \
        tokenizer.decode(ids, skip_special_tokens=False)
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)

"""Beam search: the same answers and scores as transformers' `generate(num_beams=...)`, through
preemption, small token budgets, FCR and the static decode buffers, with the beams of a request
sharing KV blocks (kv/block_manager.py `fork_responses`)."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, make_hf_model, requires_stories, save_hf_model, spy_graph_runs

from lengthwise import LLM, BeamSearchParams, SamplingParams
from lengthwise.config import EngineConfig
from lengthwise.engine.llm import run_to_completion
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.kv.block_manager import KVBlockManager
from lengthwise.kv.storage import KVCacheStorage
from lengthwise.model import load_model

PROMPTS = [[5, 17, 9, 3, 50], list(range(10, 30)), [7]]


@pytest.fixture(scope="module")
def liked_eos(tmp_path_factory):
    """(transformers model, our model, eos id, checkpoint): a random Llama whose end token is one it
    writes early after the first prompt, so that beams really end (a random model's own end token
    would almost never come)."""
    hf = make_hf_model("llama")
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    eos = int(greedy[0, len(PROMPTS[0]) + 2])
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    path = save_hf_model(hf, tmp_path_factory.mktemp("beam-llama"))
    return hf, load_model(path, dtype="float32", device="cpu"), eos, path


def hf_beams(hf, prompt: list[int], params: BeamSearchParams, eos: int | list[int]
             ) -> tuple[list[list[int]], list[float]]:
    """transformers' answers (without the padding after an end token, `eos` one or several) and
    their scores."""
    ends = {eos} if isinstance(eos, int) else set(eos)
    with torch.no_grad():
        r = hf.generate(torch.tensor([prompt]), num_beams=params.beam_width, num_return_sequences=params.beam_width,
                        max_new_tokens=params.max_tokens, do_sample=False, length_penalty=params.length_penalty,
                        early_stopping=params.early_stopping, return_dict_in_generate=True, output_scores=True,
                        pad_token_id=0)
    answers = []
    for seq in r.sequences:
        tokens = seq[len(prompt):].tolist()
        end = next((i for i, t in enumerate(tokens) if t in ends), None)
        answers.append(tokens if end is None else tokens[:end + 1])
    scores = [float(s) for s in r.sequences_scores] if params.beam_width > 1 else [float("nan")]
    return answers, scores


def _engine(model, **config) -> LLMEngine:
    return LLMEngine(model, None, EngineConfig(**{"block_size": 4, "max_num_seqs": 16, **config}))


def _block_bytes(model) -> int:
    c = model.config
    return KVCacheStorage.bytes_per_block(c.num_layers, 4, c.num_kv_heads, c.head_dim, model.dtype)


@pytest.mark.parametrize("width, max_tokens, length_penalty, early_stopping, reasons", [
    (4, 12, 1.0, False, {"stop", "length"}), (3, 10, 0.0, "never", {"stop", "length"}),
    (2, 9, 2.0, True, {"stop", "length"}), (4, 14, -0.5, False, {"stop", "length"}),
    (3, 8, 1.5, "never", {"length"}),  # a penalty favouring long answers: none of the ended ones wins
])
def test_answers_and_scores_match_transformers(liked_eos, width, max_tokens, length_penalty, early_stopping, reasons):
    hf, model, eos, _ = liked_eos
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    outs = run_to_completion(_engine(model), PROMPTS, [params] * len(PROMPTS))  # all prompts in one batch
    seen = set()
    for prompt, out in zip(PROMPTS, outs, strict=True):
        want, scores = hf_beams(hf, prompt, params, eos)
        assert [c.token_ids for c in out.outputs] == want
        for c, score in zip(out.outputs, scores, strict=True):
            assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
            assert c.score == pytest.approx(c.cumulative_logprob / len(c.token_ids) ** length_penalty, rel=1e-5)
            assert c.score == pytest.approx(score, rel=1e-4, abs=1e-5)
            seen.add(c.finish_reason)
    assert seen == reasons  # both ways of ending are exercised


def test_one_beam_is_transformers_one_beam_search(liked_eos):
    hf, model, eos, _ = liked_eos
    params = BeamSearchParams(beam_width=1, max_tokens=6)
    outs = run_to_completion(_engine(model), PROMPTS, [params] * len(PROMPTS))
    assert [o.outputs[0].token_ids for o in outs] == [hf_beams(hf, p, params, eos)[0][0] for p in PROMPTS]


@pytest.mark.parametrize("blocks, budget, policy", [
    (40, 2048, "fcfs"),            # preempted for blocks, recomputed whole
    (24, 6, "fcfs"),               # recomputed beams exceed the budget: fed over several steps first
    (30, 2048, "continuous-sjf"),
])
def test_same_answers_through_preemption_small_budgets_and_sampling_neighbours(liked_eos, blocks, budget, policy):
    _, model, _, _ = liked_eos
    beams = BeamSearchParams(beam_width=4, max_tokens=12)
    samples = SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=2, ignore_eos=True)
    reference = run_to_completion(_engine(model), PROMPTS * 2, [beams] * 3 + [samples] * 3)
    engine = _engine(model, kv_cache_memory=(blocks + 1) * _block_bytes(model), max_model_len=64,
                     max_num_batched_tokens=budget, policy=policy)
    outs = run_to_completion(engine, PROMPTS * 2, [beams] * 3 + [samples] * 3)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[c.token_ids for c in o.outputs] for o in reference]
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks  # every block back: none leaked by forks


@pytest.mark.parametrize("options", [{"bucket": 4, "fcr": "recompute", "vbs": False, "vbs_fixed": 4},
                                     {"bucket": 4, "fcr": "continue"}])
def test_a_collected_beam_search_restarts_or_resumes_with_the_same_answers(liked_eos, tmp_path, options):
    from lengthwise.predict import ConstantPredictor

    _, model, _, _ = liked_eos
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    reference = run_to_completion(_engine(model), PROMPTS, [params] * 3)
    const = ConstantPredictor(3.0, edges=[0.0, 10.0], probs=[1.0]).save(tmp_path / "c")
    engine = _engine(model, policy="sequence", policy_options=options, length_predictor=str(const))
    outs = run_to_completion(engine, PROMPTS, [params] * 3)
    assert engine.scheduler.num_collected == 3  # each reached the 4-token cap unfinished
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[c.token_ids for c in o.outputs] for o in reference]


def test_beams_through_the_static_decode_buffers(liked_eos, monkeypatch):
    """The decode graphs' buffers keep each row's block table by list identity: a fork must hand a
    beam a different list (CUDA graphs on a GPU; the same buffers run eagerly here)."""
    _, model, _, _ = liked_eos
    params = BeamSearchParams(beam_width=4, max_tokens=14)
    plain = run_to_completion(_engine(model), PROMPTS, [params] * 3)
    calls = spy_graph_runs(monkeypatch)
    monkeypatch.setattr(LLMEngine, "_graph_batch", lambda self: 16)
    graphed = run_to_completion(_engine(model), PROMPTS, [params] * 3)
    assert calls  # decode steps went through the buffers
    assert [[c.token_ids for c in o.outputs] for o in graphed] == [[c.token_ids for c in o.outputs] for o in plain]


def test_forks_share_full_blocks_and_copy_the_partial_one():
    kv = KVBlockManager(num_blocks=16, block_size=4)
    for i in range(3):
        kv.add_sequence(f"s{i}", "r")
    kv.grow_prompt("r", 5)
    for i in range(3):
        assert kv.grow_response(f"s{i}", 6)  # one full block and a partial one each
    before = {f"s{i}": list(kv.response_segment(f"s{i}").blocks) for i in range(3)}
    lists = {f"s{i}": kv.response_segment(f"s{i}").blocks for i in range(3)}
    free = kv.num_free_blocks
    # s0 goes on twice (itself and s1), s1 goes on as s2, s2 ends.
    copies = kv.fork_responses([("s0", "s0"), ("s1", "s0"), ("s2", "s1")])
    s0, s1, s2 = (kv.response_segment(f"s{i}") for i in range(3))
    assert s0.blocks is lists["s0"] and s0.blocks == before["s0"]  # kept as it was
    assert s2.blocks == before["s1"] and s2.blocks is not lists["s2"]  # moved: another list than s2 had
    assert s1.blocks[0] == before["s0"][0] and s1.blocks[1] not in before["s0"]  # full shared, partial copied
    # ... into the partial block of s2's beam, which ended: no free block taken (it could be a
    # cached prefix's)
    assert copies == [(before["s0"][1], before["s2"][1])] and s1.blocks[1] == before["s2"][1]
    assert kv.pool.refcount(before["s0"][0]) == 2
    assert kv.num_free_blocks == free + 2 - 1  # s2's two blocks freed, one copy taken
    assert s1.num_tokens == 6
    for i in range(3):
        kv.free_sequence(f"s{i}")
    assert kv.num_free_blocks == 16


def test_fork_refuses_a_source_that_is_not_a_destination():
    kv = KVBlockManager(num_blocks=8, block_size=4)
    for i in range(2):
        kv.add_sequence(f"s{i}", "r")
    with pytest.raises(ValueError, match="every source among the destinations"):
        kv.fork_responses([("s0", "s1")])


def test_copy_blocks_copies_every_layer_in_every_kv_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        cache = KVCacheStorage(2, 4, 2, 1, 3, dtype, "cpu")
        for pool in (*cache.k, *cache.v):
            pool.copy_(torch.randn(pool.shape).to(dtype))
        want = [pool[0:4].clone() for pool in (*cache.k, *cache.v)]
        cache.copy_blocks([(0, 3), (1, 2)])
        for pool, w in zip((*cache.k, *cache.v), want, strict=True):
            assert torch.equal(pool[6:8].float(), w[0:2].float()) and torch.equal(pool[4:6].float(), w[2:4].float())


def test_llm_beam_search_returns_vllm_shaped_answers(liked_eos):
    hf, _, eos, path = liked_eos
    llm = LLM(path, dtype="float32", device="cpu", block_size=4)
    params = BeamSearchParams(beam_width=3, max_tokens=10)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert len(outs) == 3
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert [s.tokens for s in out.sequences] == [prompt + a for a in hf_beams(hf, prompt, params, eos)[0]]
        scores = [s.score for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
        for s in out.sequences:
            assert s.cum_logprob == pytest.approx(sum(lp.logprob for lp in s.logprobs))
            assert all(lp.rank >= 1 and lp[lp.token_id].logprob == lp.logprob for lp in s.logprobs)


@requires_stories
def test_stories_beams_match_transformers_and_read_as_text():
    """A real model that writes and ends its stories: long beams, real end tokens, text."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    llm = LLM(STORIES, dtype="float32", device="cpu", max_num_seqs=16)
    tok = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=2, max_tokens=400, length_penalty=1.0)
    prompts = ["Once upon a time", "Lily saw a bird"]  # (beams of "Tom had a red ball" loop to the end)
    outs = llm.beam_search(prompts, params)
    eos = hf.generation_config.eos_token_id
    for text, out in zip(prompts, outs, strict=True):
        ids = tok.encode(text)
        want, scores = hf_beams(hf, ids, params, eos)
        assert [s.tokens[len(ids):] for s in out.sequences] == want
        assert [s.score for s in out.sequences] == pytest.approx(scores, rel=1e-4)
        for s in out.sequences:
            answer = s.tokens[len(ids):]
            assert s.finish_reason == "stop" and answer[-1] in eos  # the stories end on their own
            assert s.text == tok.decode(answer[:-1]) and len(s.text) > 100


def test_bad_beam_search_parameters_are_named():
    for bad, field in [(dict(beam_width=0), "beam_width"), (dict(max_tokens=0), "max_tokens"),
                       (dict(temperature=0.7), "temperature"), (dict(early_stopping="sometimes"), "early_stopping"),
                       (dict(length_penalty=float("nan")), "length_penalty"), (dict(ignore_eos=1), "ignore_eos")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **bad})


def test_the_engine_refuses_beams_it_cannot_run(liked_eos):
    _, model, _, path = liked_eos
    engine = _engine(model, max_num_seqs=4, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request([1, 2], BeamSearchParams(beam_width=5, max_tokens=4))
    with pytest.raises(ValueError, match="vocabulary"):
        _engine(model, max_num_seqs=512).add_request([1, 2], BeamSearchParams(beam_width=200, max_tokens=4))
    with pytest.raises(ValueError, match="eos_after"):
        engine.add_request([1, 2], BeamSearchParams(beam_width=2, max_tokens=4), eos_after=3)
    with pytest.raises(ValueError, match="BeamSearchParams"):
        LLM(path, dtype="float32", device="cpu").beam_search([[1, 2]], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished_requests()


def test_an_aborted_beam_search_frees_everything(liked_eos):
    _, model, _, _ = liked_eos
    engine = _engine(model)
    engine.add_request(PROMPTS[1], BeamSearchParams(beam_width=4, max_tokens=40, ignore_eos=True), request_id="b")
    for _ in range(6):
        engine.step()
    assert engine.scheduler.kv.num_free_blocks < engine.num_blocks
    assert engine.abort_request("b")
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks and not engine._beams
    assert not engine.has_unfinished_requests()


def test_ranks_one_candidate_at_a_time_as_all_at_once(liked_eos, monkeypatch):
    """A large vocabulary ranks candidates one at a time (no [requests, candidates, vocab]
    temporary): the same answers, logprobs and ranks."""
    import lengthwise.engine.beam as beam

    _, model, _, _ = liked_eos
    params = BeamSearchParams(beam_width=3, max_tokens=10)
    gathered = run_to_completion(_engine(model), PROMPTS, [params] * 3)
    monkeypatch.setattr(beam, "RANK_GATHER_ELEMENTS", 0)
    looped = run_to_completion(_engine(model), PROMPTS, [params] * 3)
    for a, b in zip(gathered, looped, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            assert [(lp.logprob, lp.rank) for lp in x.logprobs] == [(lp.logprob, lp.rank) for lp in y.logprobs]
    assert any(lp.rank > 1 for o in gathered for c in o.outputs for lp in c.logprobs)  # not all greedy picks


def test_beam_steps_count_in_the_engine_stats(liked_eos):
    _, model, _, _ = liked_eos
    engine = _engine(model)
    run_to_completion(engine, PROMPTS, [BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)] * 3)
    assert engine.stats.sampling_steps == 5 and engine.stats.row_steps >= 3 * 2 * 4

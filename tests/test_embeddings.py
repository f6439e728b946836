"""Embeddings (`LLM.embed`, `PoolingParams`, `PoolerConfig`): the vectors equal transformers'
final hidden states pooled by hand (last token, mean, first token; normalized or not), for
Llama and Qwen3 checkpoints, base models saved without their LM head, through chunked prefill,
preemption, prefix caching and batches shared with generation, whose outputs they leave unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model, save_hf_model

from lengthwise import LLM, EngineConfig, PoolerConfig, PoolingParams, SamplingParams
from lengthwise.engine.outputs import EmbeddingRequestOutput

PROMPTS = [[1, 5, 7, 9, 11] * 3, list(range(2, 60)), [3], [1, 44, 45, 46, 47, 48, 49, 50, 51]]


def reference(hf, prompts, kind: str = "last", normalize: bool = True) -> list[torch.Tensor]:
    """transformers' final hidden states of each prompt, pooled by hand."""
    base = hf.model
    out = []
    with torch.no_grad():
        for p in prompts:
            h = base(torch.tensor([p])).last_hidden_state[0]
            v = {"last": h[-1], "mean": h.mean(0), "cls": h[0]}[kind]
            out.append(F.normalize(v, dim=-1) if normalize else v)
    return out


def vectors(outs) -> list[torch.Tensor]:
    return [torch.tensor(o.outputs.embedding) for o in outs]


def assert_close(got, want, tol: float = 2e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = make_hf_model("llama")
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("embed-llama"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kind, normalize", [("last", True), ("mean", True), ("cls", True), ("mean", False)])
def test_embeddings_equal_transformers_hidden_states_pooled(family, kind, normalize, hf_checkpoint):
    """A 16-token forward budget prefills the 58-token prompt over four steps."""
    hf, path = hf_checkpoint(family)
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=16,
              pooler_config={"pooling_type": kind.upper(), "normalize": normalize})
    outs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in outs)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert all(o.outputs.hidden_size == hf.config.hidden_size for o in outs)
    assert_close(vectors(outs), reference(hf, PROMPTS, kind, normalize), 2e-5 if normalize else 1e-4)


def test_request_options_dimensions_normalize_and_truncation(llama, tmp_path):
    hf, path = llama
    llm = LLM(path, dtype="float32", device="cpu")
    raw = vectors(llm.embed(PROMPTS, PoolingParams(normalize=False), use_tqdm=False))
    assert_close(raw, reference(hf, PROMPTS, normalize=False), 1e-4)
    # The last 5 tokens only, as if they were the prompt.
    cut = vectors(llm.embed(PROMPTS, truncate_prompt_tokens=5, use_tqdm=False))
    assert_close(cut, reference(hf, [p[-5:] for p in PROMPTS]))
    with pytest.raises(ValueError, match="dimensions=8: this model does not support matryoshka"):
        llm.embed(PROMPTS, PoolingParams(dimensions=8), use_tqdm=False)
    # A matryoshka model: the first components, normalized after the cut.
    config = json.loads((path / "config.json").read_text())
    for key, value, ok, bad in (("is_matryoshka", True, 8, 65), ("matryoshka_dimensions", [16, 32], 16, 8)):
        mdir = tmp_path / key
        mdir.mkdir()
        for f in path.iterdir():
            (mdir / f.name).symlink_to(f)
        (mdir / "config.json").unlink()
        (mdir / "config.json").write_text(json.dumps({**config, key: value}))
        m = LLM(mdir, dtype="float32", device="cpu")
        got = vectors(m.embed(PROMPTS, PoolingParams(dimensions=ok), use_tqdm=False))
        assert_close(got, [F.normalize(v[:ok], dim=-1) for v in reference(hf, PROMPTS, normalize=False)])
        with pytest.raises(ValueError, match=f"dimensions={bad}"):
            m.embed(PROMPTS, PoolingParams(dimensions=bad), use_tqdm=False)


def test_prompt_lengths_against_the_context(llama):
    hf, path = llama
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=32)
    # A prompt may fill the whole context (nothing is generated after it) but not exceed it.
    full = list(range(3, 35))
    assert_close(vectors(llm.embed([full], use_tqdm=False)), reference(hf, [full]))
    with pytest.raises(ValueError, match="33 tokens, more than the model's context of 32"):
        llm.embed([[5] + full], use_tqdm=False)
    assert_close(vectors(llm.embed([[5] + full], truncate_prompt_tokens=-1, use_tqdm=False)), reference(hf, [full]))
    with pytest.raises(ValueError, match="truncate_prompt_tokens=40 is more than max_model_len=32"):
        llm.embed([full], truncate_prompt_tokens=40, use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt 0: \['true_length'\] do not apply to embeddings"):
        llm.embed([{"prompt_token_ids": full, "true_length": 3}], use_tqdm=False)


@pytest.mark.parametrize("bad, field", [
    (dict(dimensions=0), "dimensions"), (dict(dimensions=True), "dimensions"), (dict(normalize=1), "normalize"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"), (dict(truncate_prompt_tokens=-2),
                                                                 "truncate_prompt_tokens")])
def test_bad_pooling_params_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        PoolingParams(**bad)


def test_bad_pooler_configs_name_the_field():
    with pytest.raises(ValueError, match="pooler_config.pooling_type must be one of last, mean, cls"):
        EngineConfig(pooler_config={"pooling_type": "max"})
    with pytest.raises(ValueError, match="pooler_config.normalize"):
        PoolerConfig("last", normalize="yes")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['dimensions'\]"):
        EngineConfig(pooler_config={"dimensions": 3})
    assert EngineConfig(pooler_config={"pooling_type": "CLS"}).pooler_config == PoolerConfig("cls", None)


def _sentence_transformers_dir(src: Path, dst: Path, modes: dict, normalize: bool, extra: list | None = None) -> Path:
    """`src` with sentence-transformers' modules.json and 1_Pooling/config.json beside it."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    modules += extra or []
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))
    return dst


def test_the_checkpoints_sentence_transformers_files_choose_the_pooling(llama, tmp_path):
    hf, path = llama
    mean = _sentence_transformers_dir(path, tmp_path / "mean", {"pooling_mode_mean_tokens": True}, normalize=False)
    llm = LLM(mean, dtype="float32", device="cpu")
    assert_close(vectors(llm.embed(PROMPTS, use_tqdm=False)), reference(hf, PROMPTS, "mean", False), 1e-4)
    # A request may still ask for normalization; pooler_config overrides the files.
    assert_close(vectors(llm.embed(PROMPTS, PoolingParams(normalize=True), use_tqdm=False)),
                 reference(hf, PROMPTS, "mean", True))
    # pooler_config overrides the files field by field: the type here, the normalization there.
    over = LLM(mean, dtype="float32", device="cpu", pooler_config={"pooling_type": "cls"})
    assert_close(vectors(over.embed(PROMPTS, use_tqdm=False)), reference(hf, PROMPTS, "cls", False), 1e-4)
    over = LLM(mean, dtype="float32", device="cpu", pooler_config={"normalize": True})
    assert_close(vectors(over.embed(PROMPTS, use_tqdm=False)), reference(hf, PROMPTS, "mean", True))
    cls = _sentence_transformers_dir(path, tmp_path / "cls", {"pooling_mode_cls_token": True}, normalize=True)
    assert_close(vectors(LLM(cls, dtype="float32", device="cpu").embed(PROMPTS, use_tqdm=False)),
                 reference(hf, PROMPTS, "cls", True))
    # What lengthwise cannot reproduce is refused by name; generation is unaffected.
    for name, modes, extra, match in (
            ("max", {"pooling_mode_max_tokens": True}, None, "pooling_mode_max_tokens"),
            ("dense", {"pooling_mode_lasttoken": True},
             [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}], "Dense")):
        odd = LLM(_sentence_transformers_dir(path, tmp_path / name, modes, True, extra), dtype="float32", device="cpu")
        with pytest.raises(ValueError, match=f"embeddings are not available for this checkpoint: .*{match}"):
            odd.embed(PROMPTS, use_tqdm=False)
        assert odd.generate([PROMPTS[0]], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids
    # A pooling type given in pooler_config replaces a mode lengthwise lacks (not a Dense layer).
    chosen = LLM(tmp_path / "max", dtype="float32", device="cpu", pooler_config={"pooling_type": "mean"})
    assert_close(vectors(chosen.embed(PROMPTS, use_tqdm=False)), reference(hf, PROMPTS, "mean", True))
    # Files that cannot be read refuse embeddings, not the engine.
    broken = _sentence_transformers_dir(path, tmp_path / "broken", {}, True)
    (broken / "modules.json").write_text("[{")
    llm = LLM(broken, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="modules.json: cannot be read as JSON"):
        llm.embed(PROMPTS, use_tqdm=False)
    assert llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("tied", [True, False])
def test_a_base_model_saved_without_its_lm_head_embeds_and_refuses_to_generate(tied, tmp_path):
    """As embedding checkpoints (Qwen3-Embedding) are saved: `Qwen3Model.save_pretrained`, tensor
    names without "model.", no lm_head.weight."""
    hf = make_hf_model("qwen3", tie_word_embeddings=tied)
    hf.model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not any(k.startswith("model.") for k in _tensor_names(tmp_path))
    config["architectures"] = ["Qwen3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(tmp_path, dtype="float32", device="cpu")
    assert_close(vectors(llm.embed(PROMPTS, use_tqdm=False)), reference(hf, PROMPTS))
    if tied:  # the head is the embedding: generation is the causal LM's
        assert llm.engine.model.generates
        return
    assert not llm.engine.model.generates
    with pytest.raises(ValueError, match="has no LM head .* it can only embed"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2), use_tqdm=False)
    from lengthwise import BeamSearchParams

    with pytest.raises(ValueError, match="has no LM head"):
        llm.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=2, max_tokens=2))


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("policy", ["fcfs", "continuous-sjf", "multibin", "sequence"])
def test_embeddings_share_batches_with_generation_and_change_none_of_it(llama, policy):
    """Generation requests and embedding requests queued together: every completion is the one it
    is alone, every vector the one it is alone, under each policy, with a budget that splits
    prompts and a cache small enough to preempt."""
    hf, path = llama
    kw = dict(dtype="float32", device="cpu", max_num_batched_tokens=24, block_size=4, max_num_seqs=4, policy=policy,
              max_model_len=64)
    gen = [[1, 8, 9], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38], [1, 77]]
    params = SamplingParams(max_tokens=30, ignore_eos=True, seed=7)
    alone = LLM(path, **kw).generate(gen, params, use_tqdm=False)
    llm = LLM(path, **kw, kv_cache_memory=_cache_bytes(hf, 64, 4))
    engine = llm.engine
    for i, p in enumerate(gen):
        engine.add_request(p, params, request_id=f"g{i}")
        engine.add_request(PROMPTS[i], PoolingParams(), request_id=f"e{i}")
    engine.add_request(PROMPTS[3], PoolingParams(), request_id="e3")
    done = {}
    while engine.has_unfinished_requests():
        for r in engine.step():
            if r.finished:
                done[r.request_id] = engine.pop_finished(r.request_id)
    print(policy, {k: v.metrics.num_preemptions for k, v in done.items()})
    assert [done[f"g{i}"].outputs[0].token_ids for i in range(3)] == [o.outputs[0].token_ids for o in alone]
    assert_close(vectors([done[f"e{i}"] for i in range(4)]), reference(hf, PROMPTS))
    assert not engine.requests and engine.scheduler.kv.num_free_blocks == engine.num_blocks


def _cache_bytes(hf, tokens: int, block_size: int) -> int:
    c = hf.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    return per_token * tokens // block_size * block_size


def test_a_cached_prefix_serves_last_token_pooling_but_not_mean(llama):
    hf, path = llama
    shared = list(range(3, 40))
    prompts = [shared + [50, 51], shared + [60]]
    for kind in ("last", "mean"):
        llm = LLM(path, dtype="float32", device="cpu", block_size=4, pooler_config={"pooling_type": kind})
        first = llm.embed([prompts[0]], use_tqdm=False)
        second = llm.engine.add_request(prompts[1], PoolingParams())
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        # Last-token pooling reuses the 36 cached tokens; mean pooling computes all 38.
        assert second.num_cached_tokens == (36 if kind == "last" else 0)
        got = vectors(first) + [torch.tensor(llm.engine.pop_finished(second.request_id).outputs.embedding)]
        assert_close(got, reference(hf, prompts, kind))


def test_an_aborted_embedding_frees_its_blocks_and_outputs_carry_timings(llama):
    hf, path = llama
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=8, enable_prefix_caching=False)
    engine = llm.engine
    req = engine.add_request(PROMPTS[1], PoolingParams())
    engine.step()
    assert engine.scheduler.kv.num_free_blocks < engine.num_blocks
    assert engine.abort_request(req.request_id)
    assert engine.scheduler.kv.num_free_blocks == engine.num_blocks and not engine.has_unfinished_requests()
    m = llm.embed([PROMPTS[0]], use_tqdm=False)[0].metrics
    assert m.arrival_time <= m.first_token_time == m.finish_time


def test_stories260k_embeds_texts_and_the_cli_prints_them(tmp_path, capsys):
    stories = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
    if not stories.is_dir():
        pytest.skip("../shared/models/stories260k is absent")
    from lengthwise.cli import main

    texts = ["Once upon a time there was a cat.", "Lily liked to play in the park."]
    llm = LLM(stories, dtype="float32", device="cpu")
    outs = llm.embed(texts, use_tqdm=False)
    assert [o.prompt for o in outs] == texts
    assert [o.prompt_token_ids for o in outs] == [llm.tokenizer.encode(t) for t in texts]
    for o in outs:
        assert abs(torch.tensor(o.outputs.embedding).norm().item() - 1) < 1e-5
    (tmp_path / "texts.txt").write_text(texts[1] + "\n\n")
    assert main(["embed", str(stories), "--prompt", texts[0], "--input-file", str(tmp_path / "texts.txt"),
                 "--dtype", "float32"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    assert [line["prompt_tokens"] for line in lines] == [len(o.prompt_token_ids) for o in outs]
    assert_close([torch.tensor(line["embedding"]) for line in lines], vectors(outs), 1e-6)
    assert main(["embed", str(stories), "--prompt", "x", "--dimensions", "4"]) == 2
    assert "does not support matryoshka" in capsys.readouterr().err
    assert main(["embed", str(stories)]) == 2
    assert "nothing to embed" in capsys.readouterr().err


def test_an_embedding_preempted_mid_prompt_starts_its_pooling_over(llama):
    """Under `priority`, an urgent generation takes the blocks of a less urgent embedding whose
    prompt is half computed; the embedding recomputes it and its mean is still the whole prompt's."""
    hf, path = llama
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=16, block_size=4, max_model_len=64,
              policy="priority", kv_cache_memory=_cache_bytes(hf, 64, 4), enable_prefix_caching=False,
              pooler_config={"pooling_type": "mean"})
    engine = llm.engine
    embedding = engine.add_request(PROMPTS[1], PoolingParams(), request_id="e", priority=1)
    engine.step()
    engine.step()
    assert 0 < embedding.num_prompt_computed < len(PROMPTS[1])
    engine.add_request([1, 30, 31, 32, 33, 34, 35, 36, 37, 38], SamplingParams(max_tokens=30, ignore_eos=True),
                       request_id="g", priority=0)
    done = {}
    while engine.has_unfinished_requests():
        for r in engine.step():
            if r.finished:
                done[r.request_id] = engine.pop_finished(r.request_id)
    assert done["e"].metrics.num_preemptions >= 1
    assert done["g"].metrics.finish_time < done["e"].metrics.finish_time
    assert_close(vectors([done["e"]]), reference(hf, [PROMPTS[1]], "mean"))


def test_embeddings_with_lora_adapters_and_the_base_model_in_one_batch(llama, tmp_path):
    """Each vector is transformers' with the request's adapter merged into the weights."""
    from conftest import save_adapter
    from test_lora import merged

    from lengthwise.lora import LoRARequest

    hf, path = llama
    adapter = save_adapter(tmp_path / "a", hf, seed=3)
    lora = LoRARequest("a", 1, str(adapter))
    llm = LLM(path, dtype="float32", device="cpu", enable_lora=True, pooler_config={"pooling_type": "mean"})
    outs = llm.embed(PROMPTS, lora_request=[lora, None, lora, None], use_tqdm=False)
    with_adapter, base = reference(merged(hf, adapter), PROMPTS, "mean"), reference(hf, PROMPTS, "mean")
    assert_close(vectors(outs), [with_adapter[0], base[1], with_adapter[2], base[3]])
    assert [o.lora_request for o in outs] == [lora, None, lora, None]
    assert (with_adapter[0] - base[0]).abs().max() > 1e-2  # (the adapter does change the vector)


def test_reset_prefix_cache_forgets_every_cached_prefix(llama):
    hf, path = llama
    llm = LLM(path, dtype="float32", device="cpu", block_size=4)
    shared = list(range(3, 40))
    greedy = SamplingParams(max_tokens=2, temperature=0)
    llm.generate([shared + [50]], greedy, use_tqdm=False)
    kv = llm.engine.scheduler.kv
    assert kv.num_cached_blocks == 9
    assert llm.generate([shared + [51]], greedy, use_tqdm=False)[0].num_cached_tokens == 36
    assert llm.reset_prefix_cache() and kv.num_cached_blocks == 0
    assert llm.generate([shared + [52]], greedy, use_tqdm=False)[0].num_cached_tokens == 0
    assert kv.num_free_blocks == llm.engine.num_blocks

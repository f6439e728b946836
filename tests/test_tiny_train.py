"""`lengthwise train-tiny --quick`: the whole recipe on a toy model, and the checkpoint it writes
loads in lengthwise and in transformers with the same greedy output."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from lengthwise.model.loader import weight_files
from lengthwise.predict import load_predictor
from lengthwise.predict.training import warmup_cosine
from lengthwise.tiny import tasks
from lengthwise.tiny.train import (
    QUICK,
    TinyConfig,
    config_overrides,
    evaluate,
    format_evaluation,
    reference_length_pairs,
    render,
    restart_answer_pairs,
    restart_length_pairs,
    round10,
    save_weights,
    stage1_data,
    train_steps,
    train_tiny,
)


def test_schedule_and_rounding():
    lr = warmup_cosine(100, 0.1, floor=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(100) == pytest.approx(0.1) and lr(200) == pytest.approx(0.1)
    assert lr(55) == pytest.approx(0.55)  # half-way down the cosine
    assert warmup_cosine(100, 0.1)(100) == pytest.approx(0.0)  # the predictors' schedule: down to 0
    assert [round10(n) for n in (1, 4, 5, 14, 15, 24, 96)] == [0, 0, 10, 10, 20, 20, 100]


def test_recipe_overrides_are_typed_by_the_field_and_bad_ones_are_named():
    assert config_overrides(["lr=0.002", "num_layers=6"]) == {"lr": 0.002, "num_layers": 6}
    assert isinstance(config_overrides(["lr=1"])["lr"], float)
    assert config_overrides(["stage2_replay=reference"]) == {"stage2_replay": "reference"}
    with pytest.raises(ValueError, match="stage2_replay"):
        TinyConfig(stage2_replay="everything")
    assert TinyConfig(**config_overrides(["stage1_steps=10"])).stage1_steps == 10
    for bad in ("learning_rate=0.1", "lr=", "lr"):
        with pytest.raises(ValueError, match="TinyConfig field"):
            config_overrides([bad])


def test_stage1_length_warm_start_answers_the_query_with_the_reference_length():
    from lengthwise.predict.self_predict import QUERY
    from lengthwise.tiny.tokenizer import train_tokenizer

    examples = tasks.generate(200, seed=7)
    tok = train_tokenizer([t for e in examples for t in (e.instruction, e.answer)] + [QUERY] * 5, 600)
    assert reference_length_pairs(tok, examples, 0, seed=1) == []
    pairs = reference_length_pairs(tok, examples, 50, seed=1)
    assert len(pairs) == 50 and pairs == reference_length_pairs(tok, examples, 50, seed=1)
    by_prompt = {render(e.instruction + QUERY): e for e in examples}
    for ids, prompt_len in pairs:
        e = by_prompt[tok.decode(ids[:prompt_len], skip_special_tokens=False)]
        generated = len(tok.encode(e.answer).ids) + 1  # the answer's tokens and EOS, as the engine counts
        assert tok.decode(ids[prompt_len:]) == str(round10(generated))
    with pytest.raises(ValueError, match="stage1_length_share"):
        TinyConfig(stage1_length_share=1.5)


def test_example_weights_scale_each_examples_tokens_in_the_loss():
    from lengthwise.tiny.train import TinyLlama

    c = TinyConfig(**QUICK)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(1, c.vocab_size, (n,), generator=g).tolist(), n // 2) for n in (9, 12, 15, 18) * 6]

    def trained(weights):
        torch.manual_seed(0)
        model = TinyLlama(c)
        losses = train_steps(model, data, 3, 1e-3, c, 0, "w", torch.device("cpu"), weights=weights)
        return losses, [p.detach().clone() for p in model.parameters()]

    plain, plain_params = trained(None)
    ones, ones_params = trained([1.0] * len(data))  # a weighted mean with equal weights is the token mean
    assert ones == pytest.approx(plain, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_params, ones_params, strict=True))
    tilted, tilted_params = trained([1.0, 1.0, 1.0, 8.0] * 6)  # the longest examples weigh 8 times as much
    assert tilted[0] != pytest.approx(plain[0], rel=1e-4)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_params, tilted_params, strict=True))
    with pytest.raises(ValueError, match="weights"):
        train_steps(TinyLlama(c), data, 1, 1e-3, c, 0, "w", torch.device("cpu"), weights=[1.0])
    with pytest.raises(ValueError, match="stage1_length_weight"):
        TinyConfig(stage1_length_weight=0)


def test_list_answers_name_distinct_members_in_the_kinds_order():
    # the generator lists a random n of a kind in the kind's own order (no repeats to learn)
    for e in tasks.generate(400, seed=3, families=["list_things"]):
        items = [line.split(". ", 1)[1] for line in e.answer.splitlines()]
        order = [tasks.KINDS[e.params["kind"]].index(x) for x in items]
        assert order == sorted(set(order)) and len(items) == e.params["n"], e
        assert tasks.check(e, e.answer)


def test_quick_recipe_writes_a_checkpoint_transformers_and_lengthwise_agree_on(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lengthwise import LLM, SamplingParams

    out = tmp_path / "tiny"
    info = train_tiny(out, TinyConfig(**QUICK), device="cpu")
    assert info["stage1_final_loss"] < 10 and info["parameters"] > 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    probe = load_predictor(out / "probe")  # the length probe ships beside the weights
    sharded = tmp_path / "sharded"  # the shipped model's layout: shards under 2 MB and their index
    sharded.mkdir()
    state = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}
    save_weights(state, sharded, max_shard_bytes=900)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = {k: v for f in weight_files(sharded) for k, v in load_file(str(f)).items()}
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and loaded.keys() == state.keys()
    assert probe.kind == "probe" and "heldout_mae" in info["probe_metrics"]
    prompt = render(tasks.generate(1, seed=5)[0].instruction)
    llm = LLM(out, dtype="float32", device="cpu")
    ours = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.prompt_token_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    with torch.no_grad():  # plain greedy, never stopping (as ignore_eos)
        for _ in range(12):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ids[0, -12:].tolist() == ours.outputs[0].token_ids
    report = evaluate(out, per_family=1)
    assert set(report) == set(tasks.FAMILIES) | {"all"}
    assert all(0 <= v["accuracy"] <= 1 and v["mean_length"] >= 1 for v in report.values())
    assert "| **all** |" in format_evaluation(report)


def test_stage2_from_saved_stage1_weights_reproduces_the_full_run(tmp_path):
    c = dict(QUICK, stage1_steps=8, stage1_restart_steps=0, stage2_rounds=1, stage2_steps=4, stage2_examples=16,
             probe_examples=24)
    full = train_tiny(tmp_path / "full", TinyConfig(**c), device="cpu", save_stage1=tmp_path / "s1.pt")
    resumed = train_tiny(tmp_path / "resumed", TinyConfig(**c), device="cpu", stage1=tmp_path / "s1.pt")
    assert resumed["stage1_final_loss"] == full["stage1_final_loss"] and "stage1_from" in resumed
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the warm restart runs after the saved point: a saved stage 1 goes through it as a fresh one does
    restart = TinyConfig(**{**c, "stage1_restart_steps": 3})
    fresh = train_tiny(tmp_path / "r_fresh", restart, device="cpu")
    again = train_tiny(tmp_path / "r_saved", TinyConfig(**{**c, "stage1_restart_steps": 3}), device="cpu",
                       stage1=tmp_path / "s1.pt")
    assert "stage1_restart_final_loss" not in full
    assert again["stage1_restart_final_loss"] == fresh["stage1_restart_final_loss"]
    more = train_tiny(tmp_path / "r_more", TinyConfig(**{**c, "stage1_restart_steps": 3,
                                                         "stage1_restart_length_examples": 200}),
                      device="cpu", stage1=tmp_path / "s1.pt")  # the restart's extra length examples
    assert more["stage1_restart_final_loss"] != pytest.approx(fresh["stage1_restart_final_loss"], rel=1e-3)
    r, s = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("r_fresh", "r_saved"))
    assert all(torch.equal(r[k], s[k]) for k in r) and not all(torch.equal(r[k], a[k]) for k in r)
    with pytest.raises(ValueError, match="num_layers"):  # another shape than the saved stage 1
        train_tiny(tmp_path / "other", TinyConfig(**{**c, "num_layers": 3}), device="cpu", stage1=tmp_path / "s1.pt")
    warm = train_tiny(tmp_path / "warm", TinyConfig(**c, perception_warmup_examples=30), device="cpu",
                      stage1=tmp_path / "s1.pt")  # a reference-lengths round before the Perception round
    w = load_file(str(tmp_path / "warm" / "model.safetensors"))
    assert "perception_warmup_final_loss" in warm and "perception_warmup_final_loss" not in resumed
    assert not all(torch.equal(w[k], b[k]) for k in w)
    with pytest.raises(ValueError, match="stage1_length_share"):  # trained otherwise than the saved one
        train_tiny(tmp_path / "other", TinyConfig(**{**c, "stage1_length_share": 0.3}), device="cpu",
                   stage1=tmp_path / "s1.pt")
    # a file from before stage1_length_share existed was trained without it, whatever the default is now
    saved = torch.load(tmp_path / "s1.pt")
    del saved["config"]["stage1_length_share"]
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="stage1_length_share=0.0"):
        train_tiny(tmp_path / "other", TinyConfig(**c), device="cpu", stage1=tmp_path / "old.pt")
    with pytest.raises(ValueError, match="stage1_length_weight"):
        train_tiny(tmp_path / "other", TinyConfig(**{**c, "stage1_length_weight": 0.5}), device="cpu",
                   stage1=tmp_path / "s1.pt")
    lighter = train_tiny(tmp_path / "lighter", TinyConfig(**{**c, "stage1_length_weight": 0.5}), device="cpu")
    assert lighter["stage1_final_loss"] != pytest.approx(full["stage1_final_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="family_weights"):  # other data than the saved stage 1's
        train_tiny(tmp_path / "other", TinyConfig(**{**c, "family_weights": "story:2"}), device="cpu",
                   stage1=tmp_path / "s1.pt")
    with pytest.raises(ValueError, match="unknown task families"):
        TinyConfig(stage2_family_weights="juggling:2")


def test_digit_splitting_tokenizer_gives_every_digit_its_own_token(tmp_path):
    from lengthwise.tiny.tokenizer import save_tokenizer, train_tokenizer

    texts = [t for e in tasks.generate(400, seed=3) for t in (e.instruction, e.answer)]
    tok = train_tokenizer(texts, 600, split_digits=True)
    text = "Count from 28 to 140. 28, 29, 30."
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    numbers = [t for t in enc.tokens if any(ch.isdigit() for ch in t)]
    assert numbers and all(len(t) == 1 for t in numbers)  # "28" is "2" "8", in the prompt and the answer
    assert [enc.tokens.count(d) for d in "0123489"] == [2, 1, 3, 1, 1, 2, 1]
    merged = train_tokenizer(texts, 600)  # the default keeps BPE's whole-number tokens
    assert any(len(t.lstrip("Ġ")) > 1 and t.lstrip("Ġ").isdigit() for t in merged.encode(text).tokens)
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tok, tmp_path, 1024)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text, add_special_tokens=False)["input_ids"] == enc.ids


def test_restart_length_examples_are_fresh_instructions_of_their_mix_with_reference_lengths():
    from lengthwise.predict.self_predict import QUERY
    from lengthwise.tiny.tokenizer import ASSISTANT, BOS, USER

    c = TinyConfig(**dict(QUICK, stage1_restart_length_examples=60, stage1_restart_length_weights="count_down:1000"))
    _, tok, _, _ = stage1_data(c)
    pairs = restart_length_pairs(tok, c)
    assert len(pairs) == 60
    down = 0
    for ids, n_prompt in pairs:
        prompt, answer = tok.decode(ids[:n_prompt], skip_special_tokens=False), tok.decode(ids[n_prompt:])
        assert prompt.startswith(BOS + USER) and prompt.endswith(QUERY + ASSISTANT)
        m = re.fullmatch(r"Count down from (\d+) to (\d+)\.", prompt[len(BOS + USER):-len(QUERY + ASSISTANT)])
        if m:  # the answer is the reference count-down's length (its tokens and EOS) rounded to 10
            b, a = int(m[1]), int(m[2])
            reference = ", ".join(map(str, range(b, a - 1, -1))) + "."
            assert answer == str(round10(len(tok.encode(reference).ids) + 1))
            down += 1
    assert down >= 55  # the mix: count_down weighs 1,000 against 1 for each other family
    assert restart_length_pairs(tok, TinyConfig(**dict(QUICK, stage1_restart_length_examples=0))) == []
    with pytest.raises(ValueError, match="stage1_restart_length_examples"):
        TinyConfig(stage1_restart_length_examples=-1)
    with pytest.raises(ValueError, match="unknown task families"):
        TinyConfig(stage1_restart_length_weights="juggling:2")


def test_restart_answer_examples_are_fresh_reference_answers_of_their_mix_never_a_fixed_instruction(monkeypatch):
    from lengthwise.tiny.tokenizer import ASSISTANT, BOS, USER

    c = TinyConfig(**dict(QUICK, stage1_restart_answer_examples=40, stage1_restart_answer_weights="sort_numbers:1000",
                          stage1_restart_repeat_sorts=0))
    _, tok, _, _ = stage1_data(c)
    pairs = restart_answer_pairs(tok, c)
    assert len(pairs) == 40
    sorts = 0
    for ids, n_prompt in pairs:
        prompt, answer = tok.decode(ids[:n_prompt], skip_special_tokens=False), tok.decode(ids[n_prompt:])
        assert prompt.startswith(BOS + USER) and prompt.endswith(ASSISTANT)
        m = re.fullmatch(r"Sort these numbers from smallest to largest: ([\d, ]+)\.",
                         prompt[len(BOS + USER):-len(ASSISTANT)])
        if m:  # the reference answer: the numbers sorted
            assert answer == ", ".join(map(str, sorted(int(x) for x in m[1].split(", ")))) + "."
            sorts += 1
    assert sorts >= 36
    assert restart_answer_pairs(tok, TinyConfig(**dict(QUICK, stage1_restart_answer_examples=0,
                                                       stage1_restart_repeat_sorts=0))) == []
    fixed, other = tasks.FIXED_HELD_OUT[0], tasks.generate(1, seed=3)[0]
    repeats = restart_answer_pairs(tok, TinyConfig(**dict(QUICK, stage1_restart_answer_examples=0,
                                                          stage1_restart_repeat_sorts=12)))
    assert len(repeats) == 12  # each a sort whose list repeats a number, with its sorted answer
    for ids, n_prompt in repeats:
        m = re.search(r"smallest to largest: ([\d, ]+)\.", tok.decode(ids[:n_prompt], skip_special_tokens=False))
        xs = [int(x) for x in m[1].split(", ")]
        assert len(set(xs)) < len(xs) and tok.decode(ids[n_prompt:]) == ", ".join(map(str, sorted(xs))) + "."
    monkeypatch.setattr(tasks, "generate", lambda n, seed, weights=None: [fixed, other])
    [(ids, n_prompt)] = restart_answer_pairs(tok, c)
    assert other.instruction in tok.decode(ids[:n_prompt], skip_special_tokens=False)
    with pytest.raises(ValueError, match="stage1_restart_answer_examples"):
        TinyConfig(stage1_restart_answer_examples=-1)
    with pytest.raises(ValueError, match="stage1_restart_repeat_sorts"):
        TinyConfig(stage1_restart_repeat_sorts=-1)
    with pytest.raises(ValueError, match="unknown task families"):
        TinyConfig(stage1_restart_answer_weights="juggling:2")


def test_perception_rounds_from_weights_saved_after_the_warm_restart_reproduce_the_full_run(tmp_path):
    c = dict(QUICK, stage1_steps=8, stage1_restart_steps=3, stage2_rounds=1, stage2_steps=4, stage2_examples=16,
             probe_examples=24)
    full = train_tiny(tmp_path / "full", TinyConfig(**c), device="cpu", save_restart=tmp_path / "r.pt")
    resumed = train_tiny(tmp_path / "resumed", TinyConfig(**c), device="cpu", stage1=tmp_path / "r.pt")
    assert resumed["stage1_restart_final_loss"] == full["stage1_restart_final_loss"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other Perception settings start from the same restarted weights
    other = train_tiny(tmp_path / "other", TinyConfig(**{**c, "stage2_family_weights": "count_down:4"}),
                       device="cpu", stage1=tmp_path / "r.pt")
    assert other["stage1_restart_final_loss"] == full["stage1_restart_final_loss"]
    o = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert not all(torch.equal(a[k], o[k]) for k in a)
    # the file holds a restart's result: a run with another restart cannot start from it
    with pytest.raises(ValueError, match="stage1_restart_steps"):
        train_tiny(tmp_path / "x", TinyConfig(**{**c, "stage1_restart_steps": 5}), device="cpu",
                   stage1=tmp_path / "r.pt")
    with pytest.raises(ValueError, match="stage1_restart_repeat_sorts"):
        train_tiny(tmp_path / "x", TinyConfig(**{**c, "stage1_restart_repeat_sorts": 10}), device="cpu",
                   stage1=tmp_path / "r.pt")
    with pytest.raises(ValueError, match="save_restart"):  # nothing to save without a restart
        train_tiny(tmp_path / "x", TinyConfig(**{**c, "stage1_restart_steps": 0}), device="cpu",
                   save_restart=tmp_path / "r2.pt")

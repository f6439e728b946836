"""The shipped built-in model (lengthwise/tiny/checkpoint): it follows held-out instructions, stops
by itself, perceives its own response length, and transformers generates exactly what we do."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from lengthwise import LLM, SamplingParams
from lengthwise.cli import main
from lengthwise.model.default import default_model_dir
from lengthwise.predict.self_predict import MIN_FIRST_TOKEN_PROB, QUERY, TOP_FIRST_TOKENS, binned_median, parse_length
from lengthwise.tiny import tasks
from lengthwise.tiny.demo import WORKLOAD_SEED, held_out_instructions, perception, run_demo

MODEL = default_model_dir()
HELD_OUT_SEED = 777  # not a training seed (0, 1000, 1001, 2000) nor the demo's


def _greedy(instructions: list[str], **kw) -> list:
    llm = LLM(MODEL, dtype="float32", device="cpu", **kw)
    return llm.chat([[{"role": "user", "content": i}] for i in instructions],
                    SamplingParams(max_tokens=512, temperature=0.0), use_tqdm=False)


def test_checkpoint_is_complete_and_at_most_ten_megabytes():
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "training.json", "probe/manifest.json"):
        assert (MODEL / name).is_file(), name
    assert "chat_template" in json.loads((MODEL / "tokenizer_config.json").read_text())
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    assert all(f.stat().st_size <= 2 * 2**20 for f in files)  # the repository keeps no file over 2 MB
    config = json.loads((MODEL / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    params = json.loads((MODEL / "training.json").read_text())["parameters"]
    assert 1e6 <= params <= 10e6


@pytest.mark.parametrize("e", tasks.FIXED_HELD_OUT, ids=lambda e: e.family)
def test_answers_a_fixed_held_out_instruction_correctly_and_stops(e):
    # tasks.FIXED_HELD_OUT: drawn from a seed training never used (see there for which of the ten
    # the training data happens to contain anyway).
    [o] = _greedy([e.instruction])
    assert o.outputs[0].finish_reason == "stop", (e.instruction, o.outputs[0].text)
    assert tasks.check(e, o.outputs[0].text), (e.instruction, o.outputs[0].text, e.answer)


@functools.cache
def _self_metrics() -> dict:
    instructions = [e.instruction for e in tasks.generate(200, seed=HELD_OUT_SEED + 1)]
    return perception(MODEL, instructions, kinds=("self",))["self"]["metrics"]


def test_self_predictor_orders_its_own_lengths_on_200_held_out_instructions():
    assert _self_metrics()["kendall_tau"] >= 0.8


def test_self_predictor_mae_within_15_percent_of_the_mean_length():
    assert _self_metrics()["mae_share"] <= 0.15


def test_transformers_greedy_output_equals_ours():
    transformers = pytest.importorskip("transformers")
    instructions = [e.instruction for e in tasks.generate(6, seed=HELD_OUT_SEED + 2)]
    ours = _greedy(instructions)
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    for instruction, o in zip(instructions, ours, strict=True):
        ids = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        assert ids[0].tolist() == o.prompt_token_ids
        out = hf.generate(ids, max_new_tokens=512, do_sample=False, attention_mask=torch.ones_like(ids))
        assert out[0, ids.shape[1]:].tolist() == o.outputs[0].token_ids, instruction


def test_self_reads_the_median_of_the_answer_distribution_transformers_gives():
    # The default `self` read, recomputed independently with transformers: the query's likely first
    # tokens, each completed greedily, their numbers weighted by the first token's probability.
    transformers = pytest.importorskip("transformers")
    instructions = [e.instruction for e in tasks.generate(8, seed=HELD_OUT_SEED + 3)]
    llm = LLM(MODEL, dtype="float32", device="cpu", length_predictor="self")
    outs = llm.chat([[{"role": "user", "content": i}] for i in instructions],
                    SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    torn = 0
    for instruction, o in zip(instructions, outs, strict=True):
        ids = tok.apply_chat_template([{"role": "user", "content": instruction + QUERY}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(hf(ids).logits[0, -1].float(), -1)
        top = probs.topk(TOP_FIRST_TOKENS)
        numbers, weights = [], []
        for rank, (p, t) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            if rank and p < MIN_FIRST_TOKEN_PROB:
                continue
            forced = torch.cat([ids, torch.tensor([[t]])], 1)
            out = hf.generate(forced, max_new_tokens=7, do_sample=False, attention_mask=torch.ones_like(forced))
            n = parse_length(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            if n is not None:
                numbers.append(n)
                weights.append(p)
        torn += len(set(numbers)) > 1
        expected = min(max(binned_median(numbers, weights, 10.0), 1.0), llm.engine.max_model_len)
        assert o.predicted_length == pytest.approx(expected, rel=1e-4, abs=1e-3), instruction
    assert torn > 0  # the distribution, not only the greedy answer, was read somewhere


def test_generate_command_uses_the_builtin_model(capsys):
    e = tasks.generate(1, seed=HELD_OUT_SEED, families=["times_table"])[0]
    assert main(["generate", "--prompt", e.instruction, "--chat", "--max-tokens", "512"]) == 0
    captured = capsys.readouterr()
    assert str(MODEL) in captured.err
    assert tasks.check(e, captured.out)


def test_demo_reports_perception_and_policies(tmp_path, capsys):
    summary = run_demo(MODEL, 24, tmp_path, ["static:batch_size=8", "sequence"])
    assert {"self", "probe"} <= set(summary["perception"])
    assert [r["policy"] for r in summary["policies"]] == ["static", "sequence"]
    assert all(r["num_requests"] == 24 for r in summary["policies"])
    for name in ("demo.json", "schedule.md", "schedule.png"):
        assert (tmp_path / name).is_file(), name
    out = capsys.readouterr().out
    assert "| self |" in out and "| probe |" in out and "| static" in out
    assert held_out_instructions(3) == tasks.generate(3, seed=WORKLOAD_SEED)

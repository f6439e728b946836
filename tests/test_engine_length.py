"""Length perception inside the engine: predictions before scheduling, the probe at the end of
prefill, recording a probe dataset, the self predictor and its fallback count."""

from __future__ import annotations

import json

import pytest
from conftest import STORIES, requires_stories

from lengthwise import SamplingParams
from lengthwise.engine import LLM
from lengthwise.predict import ConstantPredictor, TrainConfig, load_length_data, train_probe
from lengthwise.predict.self_predict import parse_length

PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def test_oracle_predictions_reach_requests_before_scheduling(random_model):
    llm = LLM(random_model, dtype="float32", device="cpu", length_predictor="oracle")
    outs = llm.generate([{"prompt": "a b c", "true_length": 17}, {"prompt": "d e", "true_length": 3}], PARAMS,
                        use_tqdm=False)
    assert [o.predicted_length for o in outs] == [17.0, 3.0]
    stats = llm.engine.length.stats
    assert stats.num_predicted == 2 and stats.seconds > 0
    with pytest.raises(ValueError, match="needs true_length"):
        llm.generate(["no hint"], PARAMS, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_a_saved_predictor_directory_is_used_and_an_abort_before_prediction_is_clean(random_model, tmp_path):
    d = ConstantPredictor(42.0, edges=[0.0, 100.0], probs=[1.0]).save(tmp_path / "const")
    llm = LLM(random_model, dtype="float32", device="cpu", length_predictor=str(d))
    assert all(o.predicted_length == 42.0 for o in llm.generate(["x y", "z"], PARAMS, use_tqdm=False))
    engine = llm.engine
    req = engine.add_request("pending one", PARAMS)
    assert engine.has_unfinished_requests() and engine.abort_request(req.request_id)
    assert not engine.has_unfinished_requests() and req.seqs[0].finish_reason == "abort"
    with pytest.raises(ValueError, match="must be trained first"):
        LLM(random_model, dtype="float32", device="cpu", length_predictor="proxy")


def test_recorded_lengths_train_a_probe_the_engine_then_uses(random_model, tmp_path):
    record = tmp_path / "rec.jsonl"
    llm = LLM(random_model, dtype="float32", device="cpu", record_lengths=str(record))
    prompts = [" ".join(["w"] * (1 + i % 7)) + f" {i}" for i in range(48)]
    params = [SamplingParams(max_tokens=2 + (i % 7) * 3, temperature=0.0, ignore_eos=True, n=1 + i % 2)
              for i in range(48)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 48
    hidden = llm.engine.model.config.hidden_size
    by_prompt = {o.prompt: o for o in outs}
    for row in rows:
        assert len(row["features"]) == hidden
        out = by_prompt[row["prompt"]]
        assert row["length"] == max(len(c.token_ids) for c in out.outputs)
    probe_dir = train_probe(load_length_data(record, "length", need_features=True),
                            TrainConfig(epochs=20, batch_size=16, progress=False)).save(tmp_path / "probe")
    served = LLM(random_model, dtype="float32", device="cpu", length_predictor=str(probe_dir))
    res = served.generate(prompts[:4], PARAMS, use_tqdm=False)
    assert all(o.predicted_length is not None and o.predicted_length >= 1 for o in res)
    assert served.engine.length.stats.num_predicted == 4


def _self_check(llm: LLM, n: int) -> None:
    predictor = llm.engine.length.predictor
    answers = predictor.last_answers
    unparsable = sum(parse_length(a) is None for a in answers)
    assert predictor.num_queries == n and predictor.num_fallbacks == unparsable
    assert llm.engine.length.stats.num_fallbacks == unparsable


def test_self_predictor_asks_the_model_and_counts_fallbacks(random_model):
    llm = LLM(random_model, dtype="float32", device="cpu", length_predictor="self-greedy")
    assert llm.engine.length.predictor.read == "greedy"
    outs = llm.generate(["tell me about rivers", "count to ten", "hi"], PARAMS, use_tqdm=False)
    _self_check(llm, 3)
    predictor = llm.engine.length.predictor
    for o, a in zip(outs, predictor.last_answers, strict=True):
        n = parse_length(a)
        expected = 128.0 if n is None else float(min(max(n, 1), llm.engine.max_model_len))
        assert o.predicted_length == expected


def test_self_predictor_asks_a_chat_request_inside_its_own_conversation(random_model, tmp_path):
    """The paper puts its question in the user's turn. A chat request's prompt is already a
    template rendering; with role markers in plain text (Vicuna's "USER:"), wrapping that text in
    the template again would ask "USER: USER: ...". The question is appended to the last user
    message instead, for LLM.chat and the server alike."""
    import shutil

    from lengthwise.predict.self_predict import QUERY

    d = tmp_path / "vicuna"
    shutil.copytree(random_model, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                            "{% else %}ASSISTANT: {{ m['content'] }} {% endif %}{% endfor %}ASSISTANT:")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(d, dtype="float32", device="cpu", length_predictor="self-greedy")
    predictor = llm.engine.length.predictor
    asked = []
    original = predictor.query_prompt
    predictor.query_prompt = lambda q: asked.append(llm.tokenizer.decode(original(q))) or original(q)
    conversation = [{"role": "user", "content": "name a river"}, {"role": "assistant", "content": "the Nile"},
                    {"role": "user", "content": "and another"}]
    llm.chat(conversation, PARAMS, use_tqdm=False)
    want = llm.tokenizer.apply_chat_template([*conversation[:2], {"role": "user", "content": "and another" + QUERY}])
    assert asked == [llm.tokenizer.decode(llm.tokenizer.encode(want, add_special_tokens=False))]
    assert asked[0].count("USER:") == 2  # the conversation's two turns, not a third around them


@requires_stories
def test_self_predictor_on_a_real_model_falls_back_and_counts():
    # stories260k writes stories, not numbers: every answer is unparsable and falls back.
    llm = LLM(STORIES, dtype="float32", device="cpu", length_predictor="self-greedy")
    outs = llm.generate(["Once upon a time", "The cat"], PARAMS, use_tqdm=False)
    _self_check(llm, 2)
    assert all(o.predicted_length is not None for o in outs)


def test_cli_record_writes_one_probe_row_per_prompt(random_model, tmp_path, capsys):
    from lengthwise.cli import main

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "prompt": f"the sea {i}", "L_max": 3}) + "\n" for i in range(5)))
    out = tmp_path / "rec.jsonl"
    assert main(["predictor", "record", "--model", str(random_model), "--data", str(data), "--out", str(out),
                 "--max-tokens", "4", "--limit", "3", "--offset", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == ["the sea 1", "the sea 2", "the sea 3"]
    assert all(1 <= r["length"] <= 4 for r in rows)
    assert "recorded 3 requests" in capsys.readouterr().out


@pytest.mark.parametrize("policy, options", [
    ("static", {"batch_size": 3}),
    ("sequence", {"bucket": 4, "fcr": "recompute", "vbs": False, "vbs_fixed": 4}),
    ("sequence", {"bucket": 4, "fcr": "continue"}),
    ("multibin", {"bins": 2, "batch_size": 2}),
    ("continuous-sjf", {}),
    ("fcfs", {"predictive": True}),
])
def test_every_policy_gives_the_same_greedy_outputs_through_the_engine(random_model, tmp_path, policy, options):
    prompts = [f"the river {i} " + "and the sea " * (i % 4) for i in range(8)]
    params = [SamplingParams(max_tokens=3 + 2 * (i % 5), temperature=0.0, ignore_eos=True) for i in range(8)]
    reference = LLM(random_model, dtype="float32", device="cpu").generate(prompts, params, use_tqdm=False)
    # A constant prediction of 3 tokens: with bucket 4, every longer request hits the FCR cap.
    const = ConstantPredictor(3.0, edges=[0.0, 10.0], probs=[1.0]).save(tmp_path / "c")
    llm = LLM(random_model, dtype="float32", device="cpu", policy=policy, policy_options=options,
              length_predictor=str(const))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in reference]
    collected = llm.engine.scheduler.num_collected
    if policy == "sequence":
        assert collected == sum(p.max_tokens > 4 for p in params)
    else:
        assert collected == 0
    assert llm.engine.stats.row_steps >= sum(len(o.outputs[0].token_ids) for o in outs)


def test_parse_length_reads_the_number_of_tokens():
    """An untuned model's answer may carry other numbers; the one that counts tokens wins."""
    assert parse_length("120") == 120 and parse_length("about 1,200 Tokens.") == 1200
    assert parse_length("2 sentences, ~40 tokens") == 40 and parse_length("1. 50 tokens") == 50
    assert parse_length("no idea") is None

"""Perception in Advance for served checkpoints: the differentiable forward equals transformers, a
LoRA adapter trained through it is served by the engine with the same outputs, PiA examples ask
exactly what the `self` predictor asks, and a trained PiA directory predicts through its adapter
while the requests run on the base model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    FAMILIES,
    STORIES,
    requires_cuda,
    requires_stories,
)

from lengthwise import LLM, SamplingParams
from lengthwise.cli import main
from lengthwise.config import EngineConfig
from lengthwise.engine.llm_engine import LLMEngine
from lengthwise.lora import LoRARequest
from lengthwise.lora.train import LoRAFactors, LoRATrainConfig, answer_loss, save_peft_adapter, train_lora
from lengthwise.model import load_model, trainable
from lengthwise.predict import (
    PiAPredictor,
    is_self_spec,
    load_length_data,
    load_predictor,
    make_predictor,
    train_pia,
)
from lengthwise.predict.pia import answer_eos, length_label, pia_examples
from lengthwise.predict.self_predict import QUERY, SelfPredictor


def random_examples(n: int, seed: int, vocab: int = 300) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 24, (n,), generator=g).tolist()
    return [(torch.randint(3, vocab, (k,), generator=g).tolist(), [3 + k, 2]) for k in lengths]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_differentiable_forward_equals_transformers(hf_checkpoint, family):
    """Every dense family (biases, q/k norms, GQA/MQA, sliding windows shorter than the batch,
    RoPE scalings) gives transformers' logits; a right-padded row equals the row alone."""
    hf, path = hf_checkpoint(family)
    model = load_model(path, "float32", "cpu")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 21), generator=g)
    with torch.no_grad():
        want = hf(ids).logits
        got = trainable.logits(model, trainable.hidden_states(model, ids))
        short = ids[1, :9].clone()
        padded = torch.cat([short, torch.zeros(12, dtype=torch.long)])[None]
        row_padded = trainable.logits(model, trainable.hidden_states(model, padded))[0, :9]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(row_padded, hf(short[None]).logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral-sliding"])
def test_trained_adapter_is_served_as_it_was_trained(hf_checkpoint, tmp_path, family):
    """Train q/v/o/down factors, save them as PEFT: the engine serving the adapter gives the
    training forward's log-probabilities; the base model's weights are untouched."""
    hf, path = hf_checkpoint(family)
    model = load_model(path, "float32", "cpu")
    trainable.check_trainable(model)  # (unpacks the CPU panels: what training reads)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = random_examples(48, seed=2)
    cfg = LoRATrainConfig(target_modules=("q_proj", "v_proj", "o_proj", "down_proj"), epochs=4, lr=3e-3,
                          batch_size=8)
    start = answer_loss(model, None, examples).item()
    trained = train_lora(model, examples, cfg, progress=False)
    assert trained.steps == 24 and len(trained.epoch_losses) == 4
    with torch.no_grad():
        assert answer_loss(model, trained.factors, examples).item() < start - 0.5
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    adapter = save_peft_adapter(trained, tmp_path / "adapter", base_model=str(path))
    cfg_json = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg_json["r"] == 8 and cfg_json["lora_alpha"] == 16
    assert cfg_json["target_modules"] == ["q_proj", "v_proj", "o_proj", "down_proj"]
    assert "lengthwise" not in cfg_json  # PEFT's fields only, so PEFT itself loads it

    served, base, want = served_and_trained_logprobs(path, "cpu", model, trained.factors, adapter,
                                                     examples[0][0] + examples[0][1] + [7, 9, 11])
    assert served == pytest.approx(want, abs=1e-4)
    assert base != pytest.approx(want, abs=1e-2)
    # the decode steps that write a PiA answer (the fused CPU step with the adapter) agree too
    llm = LLM(path, dtype="float32", enable_lora=True, max_lora_rank=8)
    prompt = examples[1][0]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=6, temperature=0, logprobs=0,
                                                                        ignore_eos=True),
                       lora_request=LoRARequest("pia", 1, str(adapter)), use_tqdm=False)[0].outputs[0]
    seq = prompt + list(out.token_ids)
    with torch.no_grad():
        hidden = trainable.hidden_states(model, torch.tensor([seq]), trained.factors)
        lp = torch.log_softmax(trainable.logits(model, hidden)[0], -1)
    assert [t.logprob for t in out.logprobs] == pytest.approx(
        [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)], abs=1e-4)
    assert list(out.token_ids) == [int(lp[len(prompt) - 1 + i].argmax()) for i in range(len(out.token_ids))]


def served_and_trained_logprobs(path, device, model, factors, adapter, seq):
    """Log-probabilities of `seq`'s tokens: the engine serving `adapter`, the engine without it,
    and the training forward with `factors`."""
    llm = LLM(path, dtype="float32", device=device, enable_lora=True, max_lora_rank=8)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": seq}], params, lora_request=LoRARequest("pia", 1, str(adapter)),
                       use_tqdm=False)[0]
    base = llm.generate([{"prompt_token_ids": seq}], params, use_tqdm=False)[0]
    with torch.no_grad():
        hidden = trainable.hidden_states(model, torch.tensor([seq], device=model.device), factors)
        lp = torch.log_softmax(trainable.logits(model, hidden)[0], -1).cpu()
    return ([t.logprob for t in out.prompt_logprobs[1:]], [t.logprob for t in base.prompt_logprobs[1:]],
            [lp[i, seq[i + 1]].item() for i in range(len(seq) - 1)])


@requires_cuda
def test_an_adapter_trained_on_cuda_is_served_as_it_was_trained(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint("qwen3")
    model = load_model(path, "float32", "cuda")
    examples = random_examples(32, seed=4)
    trained = train_lora(model, examples, LoRATrainConfig(epochs=3, lr=3e-3, batch_size=8), progress=False)
    assert trained.epoch_losses[-1] < trained.epoch_losses[0]
    adapter = save_peft_adapter(trained, tmp_path / "adapter")
    served, _, want = served_and_trained_logprobs(path, "cuda", model, trained.factors, adapter,
                                                  examples[1][0] + examples[1][1])
    assert served == pytest.approx(want, abs=2e-3)


def test_bfloat16_model_trains_with_float32_factors(hf_checkpoint):
    """A bfloat16 checkpoint (as a GPU loads one) gives transformers' bfloat16 logits to bfloat16
    precision, and its float32 adapter still learns."""
    hf, path = hf_checkpoint("qwen2")
    model = load_model(path, "bfloat16", "cpu")
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf.to(torch.bfloat16)(ids).logits.float()
        hf.float()
        got = trainable.logits(model, trainable.hidden_states(model, ids))
    assert (got - want).abs().max() / want.abs().max() < 2e-2
    cfg = LoRATrainConfig(epochs=4, lr=3e-3, batch_size=8)
    trained = train_lora(model, random_examples(48, seed=6), cfg, progress=False)
    assert all(p.dtype == torch.float32 for p in trained.factors.parameters())
    reference = train_lora(load_model(path, "float32", "cpu"), random_examples(48, seed=6), cfg, progress=False)
    assert trained.epoch_losses == pytest.approx(reference.epoch_losses, abs=0.05)
    assert trained.epoch_losses[-1] < trained.epoch_losses[0] - 0.3


def test_gradient_checkpointing_gives_the_same_gradients(hf_checkpoint):
    _, path = hf_checkpoint("qwen2")
    model = load_model(path, "float32", "cpu")
    examples = random_examples(6, seed=3)
    grads = []
    for ckpt in (False, True):
        factors = LoRAFactors(model, ("q_proj", "v_proj", "gate_proj"), rank=4, alpha=8, seed=0)
        with torch.no_grad():
            for p in factors.b.values():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        answer_loss(model, factors, examples, gradient_checkpointing=ckpt).backward()
        grads.append(torch.cat([p.grad.flatten() for p in factors.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_training_refuses_what_it_cannot_train(hf_checkpoint, tmp_path):
    _, moe = hf_checkpoint("mixtral")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        train_lora(load_model(moe, "float32", "cpu"), random_examples(2, 0), progress=False)
    _, path = hf_checkpoint("llama")
    model = load_model(path, "float32", "cpu")
    with pytest.raises(ValueError, match="target_modules"):
        LoRAFactors(model, ("lm_head",), 8, 16)
    with pytest.raises(ValueError, match="rank"):
        LoRAFactors(model, ("q_proj",), 0, 16)
    with pytest.raises(ValueError, match="answer need at least one token"):
        train_lora(model, [([5, 6], [])], progress=False)
    with pytest.raises(ValueError, match="exceed the model's 256 positions"):
        train_lora(model, [([5] * 300, [2])], progress=False)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        LoRATrainConfig(lr=0)
    quantized = load_model(path, "float32", "cpu", quantization="int8")
    with pytest.raises(ValueError, match="int8"):
        train_lora(quantized, random_examples(2, 0), progress=False)


def test_length_labels_round_to_the_nearest_multiple():
    assert [length_label(n, 50) for n in (0, 24, 25, 74, 75, 130)] == [0, 0, 50, 50, 100, 150]
    assert [length_label(n, 10) for n in (3, 5, 27)] == [0, 10, 30]
    assert [length_label(n, 0) for n in (3.4, 17)] == [3, 17]


@requires_stories
def test_pia_examples_ask_what_the_self_predictor_asks(tmp_path, tmp_path_factory):
    """Training questions are the self predictor's questions token for token (a plain prompt and
    a chat record with a template), answered by the rounded length's digits and EOS."""
    from conftest import stories_with_template

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    model_dir = stories_with_template(tmp_path_factory, template)
    engine = LLMEngine.from_dir(model_dir)
    asker = SelfPredictor(engine)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story."}]
    data = tmp_path / "lengths.jsonl"
    data.write_text(json.dumps({"prompt": "Once upon a time", "length": 123}) + "\n"
                    + json.dumps({"prompt": "Tell a story.", "messages": chat, "length": 7}) + "\n")
    ds = load_length_data(data, "length")
    eos = answer_eos(engine.tokenizer, engine.model.config.eos_token_ids)
    assert engine.model.config.eos_token_ids == (1, 2) and eos == 2  # generation_config lists BOS too: never it
    examples = pia_examples(engine.tokenizer, ds, eos, max_model_len=512, rounding=50)
    for (question, answer), record in zip(examples, ds.records, strict=True):
        asked = asker.query_prompt(record.query)
        assert question == (engine.tokenizer.encode(asked) if isinstance(asked, str) else asked)
        assert answer[-1] == 2
    # digits first: the median read branches on the first token, so it must carry the leading digit
    assert [engine.tokenizer.decode([t]) for t in examples[0][1][:-1]] == ["1", "0", "0"]
    assert engine.tokenizer.decode(examples[1][1][:-1]) == "0"
    assert "Be brief." in engine.tokenizer.decode(examples[1][0])
    assert engine.tokenizer.decode(examples[1][0]).count(QUERY.strip()) == 1

    # a long question is clipped from the front exactly as an engine of that max_model_len clips it
    short = SelfPredictor(LLMEngine.from_dir(model_dir, EngineConfig(max_model_len=40)))
    clipped = pia_examples(engine.tokenizer, ds, eos, max_model_len=40, rounding=50)
    assert clipped[0][0] == short._fit(short.query_prompt(ds.records[0].query), 40 - 8)
    assert len(clipped[0][0]) == 32 < len(examples[0][0])

    data.write_text(json.dumps({"prompt": "Once upon a time", "length": 12, "lora": "style"}) + "\n")
    with pytest.raises(ValueError, match="generated with a LoRA adapter"):
        pia_examples(engine.tokenizer, load_length_data(data, "length"), eos, 512)


STORY_LENGTHS = {"Once upon a time there was a cat": 40, "Once upon a time there was a big red dog": 200,
                 "Lily went to the park": 90, "Tom had a toy car": 150}


@pytest.fixture(scope="module")
def pia_dir(tmp_path_factory):
    """A PiA adapter of stories260k taught four prompts' lengths (rounded to 10)."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent (../shared not beside the repo)")
    root = tmp_path_factory.mktemp("pia")
    data = root / "lengths.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "length": n}) + "\n" for p, n in STORY_LENGTHS.items()) * 6)
    cfg = LoRATrainConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj", "o_proj"), epochs=12, lr=5e-3,
                          batch_size=4)
    return train_pia(STORIES, load_length_data(data, "length"), root / "pia", cfg, rounding=10, progress=False)


@requires_stories
def test_a_pia_adapter_predicts_what_it_was_taught_while_requests_run_on_the_base_model(pia_dir):
    manifest = json.loads((pia_dir / "manifest.json").read_text())
    assert manifest["kind"] == "pia" and manifest["config"]["rounding"] == 10
    assert manifest["metrics"]["epoch_losses"][-1] < manifest["metrics"]["epoch_losses"][0] / 4
    assert is_self_spec(str(pia_dir)) and not is_self_spec(str(pia_dir.parent))

    prompts = list(STORY_LENGTHS)
    params = SamplingParams(max_tokens=20, temperature=0)
    untuned = LLM(STORIES, dtype="float32", length_predictor="self")
    untuned_out = untuned.generate(prompts, params, use_tqdm=False)
    assert untuned.engine.length.predictor.fallback_rate == 1.0  # it cannot answer with a number

    llm = LLM(STORIES, dtype="float32", length_predictor=str(pia_dir))
    outs = llm.generate(prompts, params, use_tqdm=False)
    predictor = llm.engine.length.predictor
    assert isinstance(predictor, PiAPredictor) and predictor.fallback_rate == 0.0
    for o, want in zip(outs, STORY_LENGTHS.values(), strict=True):
        assert o.predicted_length == pytest.approx(want, abs=10), (o.prompt, predictor.last_answers)
    # the adapter only asks: the answers are the base model's
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in untuned_out]


@requires_stories
def test_a_pia_adapter_asks_through_itself_beside_served_adapters(pia_dir, tmp_path):
    """With LoRA serving on, a request with its own adapter is still asked through the PiA adapter
    (held by the asker alone: the served engine's adapters are untouched)."""
    from conftest import save_adapter
    from transformers import AutoModelForCausalLM

    served = save_adapter(tmp_path / "served", AutoModelForCausalLM.from_pretrained(STORIES), seed=3)
    llm = LLM(STORIES, dtype="float32", length_predictor=str(pia_dir), enable_lora=True, max_lora_rank=8)
    prompt = "Lily went to the park"
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0),
                       lora_request=LoRARequest("served", 1, str(served)), use_tqdm=False)[0]
    assert out.predicted_length == pytest.approx(STORY_LENGTHS[prompt], abs=10)
    assert llm.engine.loras.ids() == [1]


@requires_stories
def test_a_pia_directory_needs_the_model_it_was_trained_on(pia_dir, hf_checkpoint):
    with pytest.raises(ValueError, match="asks the served model"):
        load_predictor(pia_dir)
    with pytest.raises(ValueError, match="needs an engine"):
        make_predictor(str(pia_dir))
    with pytest.raises(ValueError, match="not a fallback"):
        make_predictor(f"self:{pia_dir}", LLMEngine.from_dir(STORIES))
    _, other = hf_checkpoint("llama")
    with pytest.raises(ValueError, match="trained on another model: num_layers 5 there, 2 here"):
        LLM(other, dtype="float32", length_predictor=str(pia_dir))


@requires_stories
def test_predictor_cli_records_chat_messages_then_trains_and_evaluates_pia(tmp_path, tmp_path_factory, capsys):
    """`predictor record --chat` keeps each request's messages (so PiA asks as chat requests are
    asked); `predictor train --kind pia --model` trains on the record and evaluates; `predictor
    eval` loads the directory with --model; mistakes are refused naming the option."""
    from conftest import stories_with_template

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    model_dir = stories_with_template(tmp_path_factory, template)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in STORY_LENGTHS))
    record = tmp_path / "record.jsonl"
    assert main(["predictor", "record", "--model", str(model_dir), "--data", str(prompts), "--out", str(record),
                 "--chat", "--max-tokens", "30"]) == 0
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(r["messages"][-1]["content"] for r in rows) == sorted(STORY_LENGTHS)
    assert load_length_data(record, "length").records[0].query.messages == rows[0]["messages"]

    out = tmp_path / "pia"
    assert main(["predictor", "train", "--kind", "pia", "--model", str(model_dir), "--data", str(record),
                 "--target", "length", "--out", str(out), "--rounding", "10", "--epochs", "1", "--batch-size", "2",
                 "--gradient-checkpointing", "--eval-data", str(record)]) == 0
    assert "saved pia predictor" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["eval"]["mae"] >= 0 and manifest["config"]["lora"]["rank"] == 8
    assert manifest["config"]["lora"]["gradient_checkpointing"] is True
    metrics = tmp_path / "eval.json"
    assert main(["predictor", "eval", "--predictor", str(out), "--model", str(model_dir), "--data", str(record),
                 "--target", "length", "--no-latency", "--json", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["kind"] == "pia"

    assert main(["predictor", "train", "--kind", "pia", "--data", str(record), "--out", str(out)]) == 2
    assert "--model" in capsys.readouterr().err
    for option in (["--model", str(model_dir)], ["--rank", "4"], ["--rounding", "10"]):
        assert main(["predictor", "train", "--kind", "constant", *option, "--data", str(record),
                     "--target", "length", "--out", str(tmp_path / "c")]) == 2
        assert f"{option[0]} is for --kind pia" in capsys.readouterr().err
    assert main(["predictor", "train", "--kind", "pia", "--model", str(model_dir), "--data", str(record),
                 "--out", str(out), "--target-modules", "q_proj,lm_head"]) == 2
    assert "--target-modules must name" in capsys.readouterr().err
    assert main(["predictor", "eval", "--predictor", str(out), "--data", str(record), "--target", "length"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "length": 3, "messages": "hi"}) + "\n")
    with pytest.raises(ValueError, match="'messages'"):
        load_length_data(bad, "length")

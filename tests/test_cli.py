"""The `lengthwise generate` command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STORIES, requires_stories

from lengthwise.cli import main


@requires_stories
def test_generate_prints_the_greedy_completion(capsys):
    assert main(["generate", str(STORIES), "--prompt", "Once upon a time, there was a little",
                 "--max-tokens", "12", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(" girl named Lily. She loved to play")  # the continuation's own leading space


@requires_stories
def test_generate_with_beam_search_prints_the_answers_best_first(capsys):
    from lengthwise import LLM, BeamSearchParams

    prompt = "Once upon a time, there was a little"
    assert main(["generate", str(STORIES), "--prompt", prompt, "--max-tokens", "12", "--device", "cpu",
                 "--beam-width", "3", "--length-penalty", "0.5"]) == 0
    out = capsys.readouterr().out
    want = LLM(STORIES, dtype="float32", device="cpu").beam_search(
        [prompt], BeamSearchParams(beam_width=3, max_tokens=12, length_penalty=0.5))[0]
    texts = re.findall(r"--- \[0\.(\d)\] .*\(score (-?[\d.]+), length, 12 tokens\)\n(.*)\n", out)
    assert [(int(k), t) for k, _, t in texts] == [(k, s.text) for k, s in enumerate(want.sequences)]
    assert main(["generate", str(STORIES), "--prompt", prompt, "--beam-width", "2", "--temperature", "1",
                 "--n", "2"]) == 2
    assert "--temperature, --n cannot be used with --beam-width" in capsys.readouterr().err
    assert main(["generate", str(STORIES), "--prompt", prompt, "--length-penalty", "2"]) == 2
    assert "--length-penalty needs --beam-width" in capsys.readouterr().err


@requires_stories
def test_generate_with_int8_weights(capsys):
    """`--quantization int8` reaches the engine (stories260k's greedy story survives it)."""
    assert main(["generate", str(STORIES), "--prompt", "Once upon a time, there was a little",
                 "--max-tokens", "12", "--device", "cpu", "--quantization", "int8"]) == 0
    assert capsys.readouterr().out.startswith(" girl named Lily. She loved to play")


@requires_stories
def test_generate_with_a_bfloat16_kv_cache(capsys, monkeypatch):
    """`--kv-cache-dtype bfloat16` reaches the engine (the story survives the cache's rounding)."""
    from lengthwise.engine.llm_engine import LLMEngine

    dtypes = []
    real = LLMEngine.__init__
    monkeypatch.setattr(LLMEngine, "__init__", lambda self, *a, **k: real(self, *a, **k) or dtypes.append(
        self.runner.cache.dtype))
    assert main(["generate", str(STORIES), "--prompt", "Once upon a time, there was a little",
                 "--max-tokens", "12", "--device", "cpu", "--kv-cache-dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith(" girl named Lily. She loved to play")
    assert dtypes == [torch.bfloat16]


@requires_stories
def test_generate_with_speculative_decoding(capsys, monkeypatch):
    """`--speculative-config` reaches the engine: the greedy story is plain decoding's, with drafts kept."""
    from lengthwise.engine.llm_engine import LLMEngine

    engines = []
    real = LLMEngine.__init__
    monkeypatch.setattr(LLMEngine, "__init__", lambda self, *a, **k: real(self, *a, **k) or engines.append(self))
    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    assert main(["generate", str(STORIES), "--prompt", "Once upon a time, there was a little", "--max-tokens", "150",
                 "--device", "cpu", "--speculative-config", spec]) == 0
    assert capsys.readouterr().out.startswith(" girl named Lily. She loved to play")
    assert engines[0].config.speculative_config.num_speculative_tokens == 3
    assert engines[0].stats.accepted_tokens > 0


@requires_stories
def test_generate_several_prompts_sampled_with_seed(capsys):
    argv = ["generate", str(STORIES), "--prompt", "Lily", "--prompt", "The cat", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--max-tokens", "10"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert "--- [0] 'Lily'" in first and "--- [1] 'The cat'" in first
    assert main(argv[:6] + ["--max-tokens", "10"]) == 0  # the same prompts, greedy
    assert capsys.readouterr().out != first
    assert main(argv[:-4] + ["--seed", "4", "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out != first


def test_generate_chat_with_a_system_prompt(capsys, random_model):
    from lengthwise import SamplingParams, Tokenizer, generate, load_model

    assert main(["generate", str(random_model), "--prompt", "hello", "--chat", "--system", "be kind",
                 "--max-tokens", "8"]) == 0
    captured = capsys.readouterr()
    tok, model = Tokenizer(random_model), load_model(random_model, "float32", "cpu")
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
    [expected] = generate(model, [tok.encode_chat(messages)], SamplingParams(max_tokens=8, temperature=0.0))
    assert captured.out == tok.decode(expected.token_ids) + "\n"


@requires_stories
def test_chat_without_template_is_an_error(capsys):
    assert main(["generate", str(STORIES), "--prompt", "hi", "--chat"]) == 2
    assert "no chat_template" in capsys.readouterr().err


def test_generation_config_defaults(tmp_path):
    from lengthwise.cli import generation_defaults

    assert generation_defaults(tmp_path) == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": null}')
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 1.0, "top_k": 50, "min_p": 0.0}
    (tmp_path / "generation_config.json").write_text('{"do_sample": true,')
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        generation_defaults(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["generate", "/no/such/dir", "--prompt", "x"], "does not exist"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
    (["generate", "--prompt", "x", "--top-p", "7"], "top_p"),
])
def test_errors_exit_2_with_message(capsys, argv, message, random_model, monkeypatch):
    monkeypatch.setenv("LENGTHWISE_CACHE", str(random_model.parent))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "lengthwise"  # installed by [project.scripts]
    result = subprocess.run([str(script), "generate", "--help"], capture_output=True, text=True, check=True)
    assert "--max-tokens" in result.stdout and "--chat" in result.stdout


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--threads", "0"], "--threads"),
    (["bench", "schedule", "--data", "x.jsonl", "--threads", "-1"], "--threads"),
    (["bench", "schedule", "--data", "x.jsonl", "--request-rate", "0"], "--request-rate"),
    (["bench", "kernels", "--dtype", "bogus"], "--dtype"),
    (["bench", "kernels", "--batch", "0"], "--batch"),
    (["bench", "serve", "--data", "x.jsonl", "--max-output-tokens", "0"], "--max-output-tokens"),
    (["generate", "--prompt", "x", "--kv-cache-memory", "inf"], "--kv-cache-memory"),
    (["generate", "--prompt", "x", "--quantization", "nf4"], "--quantization"),
    (["serve", "m", "--quantization", "fp8"], "--quantization"),
    (["serve", "m", "--kv-cache-dtype", "fp4"], "--kv-cache-dtype"),
    (["serve", "m", "--speculative-config", "{method: ngram}"], "--speculative-config"),
    (["generate", "--prompt", "x", "--speculative-config", "4"], "--speculative-config"),
    (["serve", "m", "--port", "99999"], "--port"),
    (["serve", "m", "--log-level", "bogus"], "--log-level"),
    (["predictor", "train", "--kind", "probe", "--data", "x", "--out", "y", "--epochs", "0"], "--epochs"),
    (["predictor", "record", "--data", "/no/such.jsonl", "--out", "y"], "--data"),
    (["simulate", "calibrate", "--out", "y.json", "--from-steps", "/no/such.json"], "--from-steps"),
])
def test_bad_flag_values_are_argparse_errors_naming_the_flag(capsys, argv, flag):
    """Before any work, one line naming the flag and exit status 2: not a traceback minutes in."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err, err


def test_output_folders_are_made_before_the_work(tmp_path):
    from lengthwise.argtypes import output_file

    path = output_file(str(tmp_path / "a" / "b" / "out.json"))
    assert path.parent.is_dir() and not path.exists()


def test_generate_refuses_a_system_message_without_chat(capsys, random_model, monkeypatch):
    monkeypatch.setenv("LENGTHWISE_CACHE", str(random_model.parent))
    assert main(["generate", "--prompt", "x", "--system", "be brief"]) == 2
    assert "--chat" in capsys.readouterr().err


@requires_stories
def test_generate_says_when_self_prediction_fell_back(capsys):
    """stories260k was never taught the length question: its 'prediction' is the fallback's constant."""
    assert main(["generate", str(STORIES), "--prompt", "Once", "--length-predictor", "self", "--max-tokens", "4",
                 "--device", "cpu"]) == 0
    assert "no usable length for 1 of its length queries" in capsys.readouterr().err

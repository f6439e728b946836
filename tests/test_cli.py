"""The `lengthwise generate` command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import STORIES, requires_stories

from lengthwise.cli import main


@requires_stories
def test_generate_prints_the_greedy_completion(capsys):
    assert main(["generate", str(STORIES), "--prompt", "Once upon a time, there was a little",
                 "--max-tokens", "12", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("girl named Lily. She loved to play")


@requires_stories
def test_generate_several_prompts_sampled_with_seed(capsys):
    argv = ["generate", str(STORIES), "--prompt", "Lily", "--prompt", "The cat", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--max-tokens", "10"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert "--- [0] 'Lily'" in first and "--- [1] 'The cat'" in first


def test_generate_chat_on_default_model(capsys, default_model, monkeypatch):
    monkeypatch.setenv("LENGTHWISE_CACHE", str(default_model.parent))
    assert main(["generate", "--prompt", "hello", "--chat", "--system", "be kind", "--max-tokens", "5",
                 "--seed", "0", "--temperature", "1.0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert str(default_model) in captured.err


@pytest.mark.parametrize("argv, message", [
    (["generate", "/no/such/dir", "--prompt", "x"], "does not exist"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
    (["generate", "--prompt", "x", "--top-p", "7"], "top_p"),
])
def test_errors_exit_2_with_message(capsys, argv, message, default_model, monkeypatch):
    monkeypatch.setenv("LENGTHWISE_CACHE", str(default_model.parent))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_entry_point(default_model):
    result = subprocess.run([sys.executable, "-m", "lengthwise.cli", "generate", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--max-tokens" in result.stdout and "--chat" in result.stdout

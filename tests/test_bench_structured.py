"""`lengthwise bench structured`: its report's keys and numbers, on the random test model's
tokenizer (the default trained 128k BPE is exercised on a few files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lengthwise.bench import structured
from lengthwise.cli import main


@pytest.fixture(scope="module")
def report(random_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-structured")
    assert main(["bench", "structured", "--tokenizer", str(random_model), "--answers", "4", "--rounds", "1",
                 "--requests", "2", "--max-tokens", "12", "--threads", "1", "--out-dir", str(out)]) == 0
    return json.loads((out / "structured.json").read_text()), out


def test_every_workload_is_measured_cold_and_warm(report):
    data, out = report
    masks, engine = data["masks"], data["engine"]
    assert masks["vocab_size"] > 256 and masks["vocabulary_setup_s"] >= 0
    for name in structured.workloads():
        row = masks[name]
        # The first answer meets every state; later ones find most in the cache.
        assert row["tokens"] > 4 and row["masks_built"] > 0 and 0 < row["hit_rate"] < 1
        assert row["cold_ms_per_token"] > row["warm_ms_per_token"] > 0
    assert set(engine) == {"unconstrained", "object", "any", "regex"}  # choice answers are too short to time
    assert engine["unconstrained"]["vs_unconstrained"] == 1.0
    for row in engine.values():
        assert row["output_tokens_per_s"] > 0 and row["cold_output_tokens_per_s"] > 0
        assert len(row["masks_built_per_round"]) == 2  # the cold round, then one warm
    assert engine["object"]["masks_built_per_round"][0] > 0
    table = (out / "structured.md").read_text()
    assert "| regex |" in table and "warm vs unconstrained" in table
    assert (out / "structured.png").stat().st_size > 0


def test_every_made_up_answer_meets_its_constraint():
    """The replayed answers are valid under their own constraint (else the bench would time masks
    the engine never meets): checked by the grammar itself, byte by byte."""
    import random

    from lengthwise.structured.guide import StructuredOutputs

    class Bytes:  # a tokenizer of the 256 bytes
        vocab_size, special_ids = 256, frozenset()

        def encode(self, text, add_special_tokens=False):  # noqa: ANN001, ANN201
            return list(text.encode())

        def decode(self, ids, skip_special_tokens=False):  # noqa: ANN001, ANN201
            return bytes(ids).decode(errors="replace")

        def decode_batch(self, batch, skip_special_tokens=False):  # noqa: ANN001, ANN201
            return [self.decode(ids) for ids in batch]

        def token_bytes(self, t):  # noqa: ANN001, ANN201
            return bytes([t])

    outputs = StructuredOutputs(Bytes(), 256)
    r = random.Random(0)
    for name, (spec, make) in structured.workloads().items():
        for _ in range(50):
            text = make(r)
            guide = outputs.guide(spec)
            for b in text.encode():
                assert guide.mask()[b], (name, text)
                guide.advance(b)
            assert guide.complete, (name, text)


def test_the_default_tokenizer_is_a_byte_level_bpe_of_the_asked_size(tmp_path):
    from lengthwise.tokenizer import Tokenizer

    sources = sorted(Path(structured.__file__).parent.glob("*.py"))
    out = structured.train_tokenizer(tmp_path / "bpe", 1000, files=sources)
    tok = Tokenizer(out)
    assert tok.vocab_size == 1000 and tok.decode(tok.encode("def f(x):\n    return x", add_special_tokens=False)) \
        == "def f(x):\n    return x"
    assert [tok.token_to_id(t) for t in structured.SPECIAL_TOKENS] == [0, 1, 2]  # as write_model's config says

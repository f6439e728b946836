"""Incremental detokenization (three kinds of tokenizer) and stop-string matching."""

from __future__ import annotations

import json
import random

import pytest
from conftest import STORIES, requires_stories

from lengthwise.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from lengthwise.tokenizer import Tokenizer

TEXT = ("Once upon a time, Lily said: «Café naïve résumé — Ünïcödé, ß, ø.» 你好，世界！こんにちは。"
        " The quick brown fox 🦊 jumps over the lazy dog 🐶🚀👍🏽. 東京 and 北京 are cities. 😀😃 “Done” …\n"
        "Zoë ate crème brûlée; señor Müller drank 茶.")
FFFD = "\ufffd"


def train_byte_level_bpe(path):
    """A small byte-level BPE trained here: most multi-byte characters stay split across tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "unk_token": "<unk>"}))
    return path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_byte_level_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(params=["stories260k", "byte-level-bpe", "default-model"])
def tok(request, bpe_dir, random_model) -> Tokenizer:
    if request.param == "stories260k":
        if not STORIES.is_dir():
            pytest.skip(f"{STORIES} is absent")
        return Tokenizer(STORIES)
    return Tokenizer(bpe_dir if request.param == "byte-level-bpe" else random_model)


def stream(tokenizer, ids, prompt=None, skip=True) -> tuple[list[str], str]:
    det = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    pieces = [det.add(t) for t in ids]
    tail = det.flush()
    assert det.text == "".join(pieces) + tail
    return pieces, tail


def test_random_ids_stream_to_the_full_decode(tok):
    for seed in range(150):
        rng = random.Random(seed)
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            pieces, tail = stream(tok, ids, skip=skip)
            assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), (seed, skip, ids)


def test_real_text_streams_exactly_and_never_shows_a_broken_character(tok):
    ids = tok.encode(TEXT, add_special_tokens=False) + [tok.eos_token_id]
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and tail == ""
    assert "Café" in "".join(pieces) and "東京" in "".join(pieces)
    assert not any(FFFD in p for p in pieces)
    # The default model's tokenizer knows only whole English words, so some characters are split
    # over byte tokens in every tokenizer here; while one is incomplete, add() returns "".
    assert any(FFFD in tok.decode([t]) for t in ids)
    assert pieces.count("") >= 1


def test_prompt_context_gives_the_continuation(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    full = tok.decode(ids)
    checked = 0
    for k in range(1, len(ids), 3):
        head = tok.decode(ids[:k])
        if head.endswith(FFFD) or not full.startswith(head):
            continue
        pieces, tail = stream(tok, ids[k:], prompt=ids[:k])
        assert "".join(pieces) + tail == full[len(head):], k
        checked += 1
    assert checked > 10


@requires_stories
def test_leading_space_after_a_prompt_is_kept():
    tok = Tokenizer(STORIES)
    prompt = tok.encode("Once upon a")  # with BOS
    out = tok.encode("Once upon a time", add_special_tokens=False)[-1:]
    assert tok.decode(out) == "time"  # alone, the sentencepiece decoder strips the word's space
    assert "".join(stream(tok, out, prompt=prompt)[0]) == " time"
    assert "".join(stream(tok, out)[0]) == "time"


def test_prompt_ending_inside_a_character(bpe_dir):
    tok = Tokenizer(bpe_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    full = tok.decode(ids)
    cut = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith(FFFD)]
    assert cut
    for k in cut:
        start = max(j for j in range(k) if not tok.decode(ids[:j]).endswith(FFFD))
        pieces, tail = stream(tok, ids[k:], prompt=ids[:k])
        # The character begun in the prompt is emitted whole with the output, never as U+FFFD.
        assert "".join(pieces) + tail == full[len(tok.decode(ids[:start])):]
        assert FFFD not in "".join(pieces)


def test_special_tokens(tok):
    ids = tok.encode("the dog and the cat", add_special_tokens=False)
    ids = ids[:2] + [tok.eos_token_id] + ids[2:]
    assert "</s>" not in "".join(stream(tok, ids)[0])
    assert "</s>" in "".join(stream(tok, ids, skip=False)[0])


def test_each_add_decodes_a_bounded_window(bpe_dir):
    tok = Tokenizer(bpe_dir)
    seen: list[int] = []
    decode = tok.decode

    def counting_decode(ids, skip_special_tokens=True):
        seen.append(len(ids))
        return decode(ids, skip_special_tokens)

    tok.decode = counting_decode
    ids = tok.encode(TEXT * 5, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, ids[:20])
    seen.clear()
    for t in ids[20:]:
        det.add(t)
    assert len(ids) > 500 and max(seen) <= 12


def test_detokenizer_validates():
    with pytest.raises(ValueError, match="^skip_special_tokens"):
        IncrementalDetokenizer(None, None, skip_special_tokens=1)


# --- stop strings ---------------------------------------------------------------------------------

def feed(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, int | None, int]:
    """Stream `pieces` through the matcher as the engine does; returns (text, keep, piece index)."""
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        keep = matcher.check(text, len(piece))
        if keep is not None:
            return text, keep, i
    return text, None, len(pieces)


def test_stop_string_spanning_tokens():
    m = StopStringMatcher(("STOP",), include_in_output=False)
    text, keep, i = feed(m, ["Hel", "lo wo", "rld. ST", "O", "P here", "more"])
    assert i == 4 and text[:keep] == "Hello world. " and m.matched == "STOP"
    m = StopStringMatcher(("STOP",), include_in_output=True)
    text, keep, i = feed(m, ["Hel", "lo wo", "rld. ST", "O", "P here", "more"])
    assert i == 4 and text[:keep] == "Hello world. STOP"


def test_earliest_completing_stop_wins():
    m = StopStringMatcher(("world", "lo w"), include_in_output=False)
    assert m.check("Hello world", 11) == 3 and m.matched == "lo w"
    m = StopStringMatcher(("abc", "bc"), include_in_output=True)  # both end together: the earlier start
    assert m.check("xabcd", 5) == 4 and m.matched == "abc"
    m = StopStringMatcher(("cd", "ab"), include_in_output=False)  # list order does not matter
    assert m.check("..ab..cd", 8) == 2 and m.matched == "ab"


def test_stop_result_does_not_depend_on_how_text_was_split():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(30))
        stops = tuple({"".join(rng.choice("abc") for _ in range(rng.randrange(1, 5))) for _ in range(3)})
        include = rng.random() < 0.5
        cuts = sorted(rng.sample(range(1, 30), 6))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, 30], strict=True)]
        one_by_one = feed(StopStringMatcher(stops, include), list(text))
        chunked = feed(StopStringMatcher(stops, include), pieces)
        assert one_by_one[1] == chunked[1], (text, stops, pieces)


def test_only_the_new_region_is_searched():
    m = StopStringMatcher(("STOP",), include_in_output=False)
    assert m.check("STOP and more", 5) is None  # an old match is not reported again
    assert m.check("xxSTO", 0) is None
    assert m.check("xxSTOP", 1) == 2


def test_hold_back_for_streaming():
    m = StopStringMatcher(("STOP", "bcd"), include_in_output=False)
    assert m.hold_back("Hello ST") == 2
    assert m.hold_back("Hello S") == 1
    assert m.hold_back("Hello") == 0
    assert m.hold_back("xbc") == 2
    assert m.hold_back("") == 0
    assert StopStringMatcher(("STOP",), include_in_output=True).hold_back("Hello ST") == 0
    # Streaming with hold-back never sends a character the stop string later removes.
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("abcS") for _ in range(25))
        m = StopStringMatcher(("Sab", "cc"), include_in_output=False)
        sent, final = "", None
        for i in range(len(text)):
            keep = m.check(text[:i + 1], 1)
            if keep is not None:
                final = text[:keep]
                break
            current = text[:i + 1]
            sent = current[:len(current) - m.hold_back(current)]
        final = text if final is None else final
        assert final.startswith(sent)


def test_stop_matcher_validates():
    with pytest.raises(ValueError, match="^stops"):
        StopStringMatcher(("",), False)
    with pytest.raises(ValueError, match="^stops"):
        StopStringMatcher("STOP", False)
    with pytest.raises(ValueError, match="^include_in_output"):
        StopStringMatcher(("a",), 1)


# -- the server's logprobs: a character split over tokens -------------------------------------------

def test_logprob_bytes_join_into_the_text_when_a_character_is_split(tok):
    """OpenAI's `bytes` field exists so that a character split over tokens can be put back
    together: each token's bytes must be its raw bytes (not U+FFFD's), the bytes of a choice join
    into its text, a partial token's text shows its bytes escaped, and text offsets index the
    text: a character's pieces all point at its start."""
    from lengthwise.engine.detokenizer import TokenPieces
    from lengthwise.engine.sampler import TokenLogprobs
    from lengthwise.server.api_server import _chat_logprobs, _completion_logprobs

    prompt = tok.encode("Once upon a time")
    ids = tok.encode(TEXT, add_special_tokens=False)
    text = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    lps = [TokenLogprobs(t, -0.5, 1, [(t, -0.5), (ids[0], -2.0)]) for t in ids]
    for split in (len(ids), 7):  # one response, or a stream's deltas of 7 tokens
        chat, completion = TokenPieces(tok, prompt[-1]), TokenPieces(tok, prompt[-1])
        content, tokens, offsets = [], [], []
        for start in range(0, len(ids), split):
            content += _chat_logprobs(chat, lps[start:start + split])["content"]
            part = _completion_logprobs(completion, lps[start:start + split])
            tokens += part["tokens"]
            offsets += part["text_offset"]
        raws = [bytes(c["bytes"]) for c in content]
        assert b"".join(raws) == text.encode("utf-8")
        assert [c["token"] for c in content] == tokens
        assert all(bytes(c["top_logprobs"][0]["bytes"]) == raw for c, raw in zip(content, raws, strict=True))
        broken = [c["token"] for c, raw in zip(content, raws, strict=True)
                  if raw.decode("utf-8", "replace") != raw.decode("utf-8", "ignore")]
        assert broken and all("\\x" in t and FFFD not in t for t in broken)  # partial pieces, escaped
        assert all(FFFD not in t for t in tokens)
        for k, offset in enumerate(offsets):
            before = b"".join(raws[:k]).decode("utf-8", "ignore")  # the characters complete before token k
            assert offset == len(before) and text.startswith(before), k

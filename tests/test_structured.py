"""Structured outputs: the byte grammars, the token masks made from them (against a brute-force
walk of every token), and generation held to a schema by the engine and the server."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import STORIES, requires_stories

from lengthwise.structured.grammar import choice_grammar, json_object_grammar, json_schema_grammar, regex_grammar
from lengthwise.structured.guide import TokenVocabulary
from lengthwise.structured.params import StructuredOutputsParams
from lengthwise.structured.regex import compile_regex

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer"},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    "note": {"anyOf": [{"type": "null"}, {"type": "number"}]}}, "required": ["name", "age", "pets"]}
TREE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "number"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}},
    "$ref": "#/$defs/node"}


def matches(grammar, text: str) -> bool:
    state = grammar.advance_bytes(grammar.initial(), text.encode())
    return state is not None and grammar.accepts(state)


def valid(schema: dict, value, root: dict | None = None) -> bool:
    """A small JSON Schema validator for the keywords these tests use."""
    root = root or schema
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        return valid(target, value, root)
    if "enum" in schema:
        return value in schema["enum"]
    if "anyOf" in schema:
        return any(valid(s, value, root) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and set(value) <= set(props) and set(schema.get("required", [])) <= set(value)
                and all(valid(props[k], v, root) for k, v in value.items()))
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(valid(schema.get("items", {}), v, root) for v in value))
    if kind == "string":
        return (isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
                and re.search(schema.get("pattern", ""), value, re.ASCII) is not None)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "null":
        return value is None
    return True


# -- grammars --------------------------------------------------------------------------------------

def test_json_object_grammar_reads_json_objects_only():
    g = json_object_grammar()
    for text in ['{}', '{"a": 1}', ' {"a": [1, -2.5e-3, "x\\u00e9\\n\\"", {"b": null}], "c": true}', '{"é": "日本"}']:
        assert matches(g, text), text
    for text in ['[]', '{', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '"x"', '{}x', '{"a": "\x01"}', '{"a":  1}',
                 '{\n"a": 1}', '{"a": 1.}', '{"a": "\\q"}']:
        assert not matches(g, text), text
    for raw in (b'{"a": "\xff"}', b'{"a": "\xc3"}', b'{"a": "\xa9"}'):  # not UTF-8
        assert g.advance_bytes(g.initial(), raw) is None


def test_a_schema_grammar_reads_what_matches_the_schema():
    g = json_schema_grammar(PERSON)
    for text in ['{"name": "bob", "age": 3, "pets": ["cat"]}', '{"name":"","age":-3,"pets":[],"note":null}',
                 '{"name": "x", "age": 0, "pets": ["dog", "dog", "cat"], "note": 1.5}']:
        assert matches(g, text), text
        assert valid(PERSON, json.loads(text))
    for text in ['{"name": "bobby the great", "age": 3, "pets": []}', '{"age": 3, "name": "b", "pets": []}',
                 '{"name": "b", "age": 1.5, "pets": []}', '{"name": "b", "age": 1, "pets": ["cow"]}',
                 '{"name": "b", "age": 1, "pets": ["cat", "cat", "cat", "cat"]}', '{"name": "b", "age": 1}',
                 '{"name": "b", "age": 1, "pets": [], "extra": 1}', '{"name": "b", "age": 1, "pets": [], "note": "x"}']:
        assert not matches(g, text), text
    tree = json_schema_grammar(TREE)
    assert matches(tree, '{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 4}]}]}')
    assert not matches(tree, '{"v": 1, "kids": [{"w": 2}]}')


def test_schema_corners_from_review():
    """An object closed to every key; alternatives that refer to each other (each keeps all of
    its own); a type implied by length keywords; an ambiguous recursive schema stays bounded."""
    closed = json_schema_grammar({"type": "object", "additionalProperties": False})
    assert matches(closed, "{}") and not matches(closed, '{"a": 1}')
    mutual = json_schema_grammar({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}, {"type": "integer"}]},
                                            "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "string"}]}},
                                  "type": "object", "properties": {"x": {"$ref": "#/$defs/b"}}, "required": ["x"]})
    assert matches(mutual, '{"x": 1}') and matches(mutual, '{"x": "s"}') and not matches(mutual, '{"x": true}')
    implied = json_schema_grammar({"minLength": 3})
    assert matches(implied, '"abc"') and not matches(implied, '"ab"') and not matches(implied, "5")
    twins = {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/n"}}] * 2}
    g = json_schema_grammar({"$defs": {"n": twins}, "$ref": "#/$defs/n"})
    state = g.initial()
    for _ in range(40):  # the alternatives double per "[": past MAX_STACKS a byte is refused, quickly
        state = g.advance(state, ord("[")) if state is not None else None
    assert state is None


def test_property_order_tells_schemas_apart():
    from lengthwise.structured.guide import StructuredOutputs

    ab = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
    ba = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}, "required": ["b", "a"]}
    outputs = StructuredOutputs(ByteTokenizer(), ByteTokenizer.vocab_size)
    g_ab = outputs.compile(StructuredOutputsParams(json=ab)).grammar
    g_ba = outputs.compile(StructuredOutputsParams(json=ba)).grammar
    assert matches(g_ab, '{"a": 1, "b": 2}') and matches(g_ba, '{"b": 1, "a": 2}')


def test_a_choice_is_one_of_its_strings_exactly():
    g = choice_grammar(["yes", "no", "yes please"])
    assert all(matches(g, c) for c in ("yes", "no", "yes please"))
    assert not any(matches(g, c) for c in ("ye", " yes", "nope", "yes please!", ""))


# -- regular expressions ---------------------------------------------------------------------------

REGEXES = [r"20\d\d-[01]\d-[0-3]\d (INFO|WARN)", r"a{2,4}b*", r"(ab|c)+d?", r"[^a-c]{0,3}x", r"\w+@\w+\.com",
           r"(?:x|y){3}", r"a{,2}", r"é[à-ü]+\.?", r".*z", r"(a|b)*abb", r"\d{3}-\d{4}", r"[\d-]+", r"a{0}b",
           r"(?P<n>q)+\s", r"^[A-Z][a-z]*$", r"^x|y$", r"[]a]+", r"\x41\u00e9\.", r"[\w.-]{1,3}", r"a{2}{", r"(|a)b",
           r"[^\n]*", r"(a+b)?c", r"(?:x+y){0,2}z?", r"( +])?"]  # (the last three: a loop inside an optional)
ALPHABET = "abcdxyzAB019-_ .@éàüñ\nqz]{"


def regex_matches(regex, text: str) -> bool:
    states = regex.start
    for ch in text:
        states = regex.step(states, ord(ch))
        if states is None:
            return False
    return regex.accepts(states)


@pytest.mark.parametrize("pattern", REGEXES)
def test_a_regex_automaton_matches_what_python_matches(pattern):
    """Whole-string matches against `re.fullmatch`, and JSON Schema's found-anywhere reading
    against `re.search` (anchors kept), on random strings and on strings Python's own match accepts."""
    whole = compile_regex(pattern)
    if pattern == "^x|y$":  # (anchors beside a top-level |: refused as a search pattern, see below)
        search, pattern = compile_regex("^(?:x|y)$", search=True), "^(?:x|y)$"
    else:
        search = compile_regex(pattern, search=True)
    r = random.Random(pattern)
    samples = ["".join(r.choice(ALPHABET) for _ in range(r.randint(0, 9))) for _ in range(3000)]
    samples += [s for s in ("2024-01-31 INFO", "aab", "ababcd", "zzx", "ab_1@x.com", "xyx", "éàü.", "aabb abb",
                            "123-4567", "--1", "b", "qq ", "Hello", "Aé.", "a.-", "aa{", "ab", "b") if s]
    ecma = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern  # (Python's $ also takes a final newline)
    for text in samples:
        assert regex_matches(whole, text) == bool(re.fullmatch(pattern, text, re.ASCII)), text
        assert regex_matches(search, text) == bool(re.search(ecma, text, re.ASCII)), text


@pytest.mark.parametrize("pattern, message", [
    ("a(?=b)", "lookaround"), (r"(a)\1", "backreferences"), (r"\bword", r"word boundary \(\\b\)"),
    ("a**", "cannot follow another"), ("(?i)a", "inline flag"), ("[a", "missing ']'"), ("a)", "unbalanced"),
    ("x{3,1}", "maximum is below the minimum"), (r"\p{L}", "Unicode property"), ("a^b", "only accepted at the"),
    ("a*+", "possessive"), ("*a", "nothing to repeat"), ("a{99999}", "more than 20000 automaton states"),
    (r"\q", r"unknown escape \\q"), ("a{2}{3}", "cannot follow another"), (r"\01", "octal escapes"),
    (r"a[^\s\S]", "matches no string"), ("(^a|b)", "start of the pattern or of one of its top-level"),
])
def test_a_regex_that_is_no_automaton_is_refused_by_name(pattern, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(regex=pattern)
    with pytest.raises(ValueError, match="at #/properties/s/pattern"):
        StructuredOutputsParams(json={"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}})


def test_each_top_level_alternative_has_its_own_anchors():
    """`^$|^[a-z]+$` (empty or letters) is a common schema idiom; searched, `^a|b$` is "starts
    with a or ends with b"; matched whole, the anchors say nothing more."""
    for pattern, texts in (("^$|^[a-z]+$", ["", "ab", "a1", "1"]), ("^a|b$", ["a", "ax", "xb", "x", "xa", "bx"])):
        whole, search = compile_regex(pattern), compile_regex(pattern, search=True)
        for text in texts:
            assert regex_matches(whole, text) == bool(re.fullmatch(pattern, text)), (pattern, text)
            assert regex_matches(search, text) == bool(re.search(pattern, text)), (pattern, text)


def allowed_bytes(grammar, state) -> list[int]:
    return [b for b in range(256) if grammar.advance(state, b) is not None]


@pytest.mark.parametrize("grammar", [
    json_schema_grammar({"type": "string", "pattern": "^[a-zé]+$", "maxLength": 3}),
    json_schema_grammar({"type": "string", "pattern": r"^\d+(\.\d+)?$", "maxLength": 4}),
    json_schema_grammar({"type": "string", "pattern": r"^\d+(px)?$", "minLength": 4, "maxLength": 6}),
    json_schema_grammar({"type": "string", "pattern": "(ab)+", "minLength": 3, "maxLength": 5}),
    regex_grammar(".{0,3}"), regex_grammar("[à-ü]?x|日+"), regex_grammar("a*"),
])
def test_no_allowed_byte_leads_into_a_dead_end(grammar):
    """Random walks over the bytes each state allows: every state reached can end or go on. A
    new character at maxLength, a character the pattern's length could not follow, an overlong
    UTF-8 prefix: each was once allowed and then nothing was."""
    r = random.Random(0)
    for _ in range(300):
        state = grammar.initial()
        for _ in range(40):
            options = allowed_bytes(grammar, state)
            assert options or grammar.accepts(state), state
            if not options or (grammar.accepts(state) and r.random() < 0.2):
                break
            state = grammar.advance(state, r.choice(options))


def test_length_bounds_and_pattern_are_held_together():
    g = json_schema_grammar({"type": "string", "pattern": r"^\d+(\.\d+)?$", "maxLength": 3})
    assert ord(".") not in allowed_bytes(g, g.advance_bytes(g.initial(), b'"12'))  # "12.x" would not fit
    g = json_schema_grammar({"type": "string", "pattern": r"^\d+(px)?$", "minLength": 4})
    assert g.advance_bytes(g.initial(), b'"1p') is None and matches(g, '"12px"')
    full = json_schema_grammar({"type": "string", "pattern": "^[a-zé]+$", "maxLength": 3})
    assert allowed_bytes(full, full.advance_bytes(full.initial(), b'"abc')) == [ord('"')]  # no é, no \\
    with pytest.raises(ValueError, match="no string matching its pattern has 0 to 3 characters"):
        StructuredOutputsParams(json={"type": "string", "pattern": r"^\d{5}$", "maxLength": 3})
    dot = regex_grammar(".*")
    for overlong in (b"\xe0\x80", b"\xf0\x8f"):  # (no character can complete these)
        assert dot.advance_bytes(dot.initial(), overlong) is None
    assert regex_grammar("a*").accepts(regex_grammar("a*").initial())  # a regex may match nothing at all


def test_grammars_dropped_from_the_cache_take_their_tables_with_them():
    import gc

    from lengthwise.structured.guide import GRAMMAR_CACHE, StructuredOutputs

    outputs = StructuredOutputs(ByteTokenizer(), ByteTokenizer.vocab_size)
    for i in range(GRAMMAR_CACHE + 20):
        outputs.guide(StructuredOutputsParams(regex=f"a{{{i}}}b")).mask()
    gc.collect()
    assert len(outputs.vocab._walks) <= GRAMMAR_CACHE


def test_a_pattern_string_reads_json_escapes_and_counts_characters():
    """JSON escapes are matched as the characters they stand for, maxLength counts characters
    (an escape is one), and a control byte must be escaped."""
    g = json_schema_grammar({"type": "object", "properties": {
        "zip": {"type": "string", "pattern": r"^\d{5}$"},
        "code": {"pattern": "[A-Z]{2}", "maxLength": 4},
        "line": {"type": "string", "pattern": "^a\nb\"$"}}, "required": ["zip", "code"]})
    for doc, ok in [('{"zip": "12345", "code": "xAB"}', True), ('{"zip": "1234", "code": "AB"}', False),
                    ('{"zip": "12345", "code": "ABCDE"}', False), ('{"zip": "12345", "code": "ab"}', False),
                    ('{"zip": "\\u0031\\u0032345", "code": "\\u0041B"}', True),
                    ('{"zip": "12345", "code": "é\\"AB"}', True), ('{"zip": "12345", "code": "é\\"ABC"}', False),
                    ('{"zip": "12345", "code": "AB", "line": "a\\nb\\""}', True),
                    ('{"zip": "12345", "code": "AB", "line": "a\nb\\""}', False)]:
        assert matches(g, doc) == ok, doc


def test_a_character_in_the_making_is_allowed_only_if_it_can_end_as_an_allowed_one():
    """UTF-8 lead bytes and \\u escapes are checked against the code points the regex allows
    next, so a mask never leads into a character that cannot be finished."""
    g = regex_grammar("[é-ë]x")  # U+00E9..U+00EB: C3 A9..C3 AB
    state = g.initial()
    assert g.advance(state, 0xC3) is not None and g.advance(state, 0xE2) is None and g.advance(state, 0xC2) is None
    assert g.advance(g.advance(state, 0xC3), 0xA8) is None and g.advance(g.advance(state, 0xC3), 0xAA) is not None
    s = json_schema_grammar({"type": "string", "pattern": "^[é-ë]$"})
    prefix = s.advance_bytes(s.initial(), b'"\\u00e')
    assert prefix is not None and s.advance(prefix, ord("9")) is not None and s.advance(prefix, ord("8")) is None
    assert s.advance_bytes(s.initial(), b'"\\u01') is None  # U+01xx: none of them is allowed
    assert s.advance_bytes(s.initial(), b'"\\n') is None  # a newline is not allowed either
    assert matches(regex_grammar("(é|ü)+\n[^\n]{0,3}"), "éü\nab€") and not matches(regex_grammar("a"), "a\n")


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
     r"at #/properties/n uses \['minimum'\]"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required must list"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"type": "decimal"}, "not a JSON Schema type"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "maxItems is below minItems"),
    ({"type": "object", "properties": {"a": {}}, "anyOf": [{"required": ["a"]}]},
     r"\['properties', 'type'\] beside anyOf"),
    ({"type": "object", "required": ["a"]}, "required without properties"),
])
def test_what_a_schema_grammar_cannot_enforce_is_refused_by_name(schema, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(json=schema)


def test_structured_outputs_params_check_their_fields():
    with pytest.raises(ValueError, match="exactly one of json, json_object, choice and regex"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json_object=True, choice=["a"])
    with pytest.raises(ValueError, match="structured_outputs.choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs.json is not valid JSON"):
        StructuredOutputsParams(json="{")
    assert StructuredOutputsParams(json='{"type": "integer"}').json == {"type": "integer"}
    from lengthwise import SamplingParams
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json_object": True})


# -- token masks -----------------------------------------------------------------------------------

class ByteTokenizer:
    """A tokenizer whose tokens are given byte strings (JSON pieces, partial UTF-8, a special)."""

    PIECES = [b"<s>", b"{", b"}", b'{"', b'"}', b'":', b'": ', b'",', b'", "', b" ", b'"', b"a", b"ab", b"name",
              b'"name', b"1", b"12", b"-", b".5", b"e3", b"[", b"]", b"[]", b"true", b"null", b"\\", b"\\n", b"\\u00",
              b"e9", b"\xc3", b"\xa9", b"\xc3\xa9", b"\xe6\x97\xa5", b"\n", b"{}", b"cat", b'"cat"', b'"dog"]', b",",
              b"\x01", b"\xff", b"zz\"", b"age", b'age":', b'"pets": [', b"x" * 20, b"x]{"]

    vocab_size = len(PIECES)
    special_ids = frozenset({0})

    def encode(self, text, add_special_tokens=False):  # noqa: ANN001, ANN201
        return [11]

    def decode(self, ids, skip_special_tokens=False):  # noqa: ANN001, ANN201
        return b"".join(self.PIECES[i] for i in ids).decode(errors="replace")

    def decode_batch(self, batch, skip_special_tokens=False):  # noqa: ANN001, ANN201
        return [self.decode(ids) for ids in batch]

    def token_bytes(self, t):  # noqa: ANN001, ANN201
        return self.PIECES[t] if t else None


def brute_force(vocab, grammar, state) -> torch.Tensor:
    mask = torch.zeros(vocab.vocab_size, dtype=torch.bool)
    for t, raw in enumerate(vocab.bytes):
        mask[t] = raw is not None and grammar.advance_bytes(state, raw) is not None
    return mask


@pytest.mark.parametrize("grammar, text", [
    (json_object_grammar(), ' {"name": "ab\\n\\u00e9é日", "age": [12, -1.5e3, true, null, {}], "cat": {"a": []}}'),
    (json_schema_grammar(PERSON), '{"name": "cat", "age": -12, "pets": ["cat", "dog"], "note": 1.5e3}'),
    (choice_grammar(["cat", "catalog", "name"]), "catalog"),
    (json_schema_grammar({"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-eé日]+$",
                                                                    "maxLength": 6}}}), '{"name": "ab\\u00e9é日"}'),
    (regex_grammar("(ab|[x-z]+)*é?\n(true|null)"), "abzzxé\nnull"),
])
def test_masks_match_a_brute_force_walk_at_every_byte(grammar, text):
    vocab = TokenVocabulary(ByteTokenizer(), ByteTokenizer.vocab_size + 3)  # the model's vocabulary is padded
    state = grammar.initial()
    for b in text.encode():
        assert torch.equal(vocab.mask(grammar, state), brute_force(vocab, grammar, state)), (text, b)
        state = grammar.advance(state, b)
    assert grammar.accepts(state)


def test_masks_stay_right_when_the_transition_table_starts_again(monkeypatch):
    """A grammar's interned states and byte table are dropped past MAX_STATES (here 3, so at
    almost every mask): the masks still match the brute-force walk."""
    from lengthwise.structured import guide

    monkeypatch.setattr(guide._Transitions, "MAX_STATES", 3)
    vocab = TokenVocabulary(ByteTokenizer(), ByteTokenizer.vocab_size)
    grammar = json_schema_grammar(PERSON)
    state = grammar.initial()
    for b in b'{"name": "ab\\u00e9", "age": 12, "pets": ["cat"]}':
        assert torch.equal(vocab.mask(grammar, state), brute_force(vocab, grammar, state))
        state = grammar.advance(state, b)
    assert len(vocab._walks[grammar].states) < 40


def test_a_guide_is_free_until_its_start_after_text():
    """A thinking model's answer: no mask until `start_after` (in one token, split over tokens, or
    sharing a token with the answer's first bytes), then the grammar from its start."""
    from lengthwise.structured.guide import StructuredOutputs

    tok = ByteTokenizer()
    ids = {raw: t for t, raw in enumerate(tok.PIECES)}
    outputs = StructuredOutputs(tok, tok.vocab_size)
    for tag, pieces, free in (("x]{", [b"ab", b"x]{", b"{}"], [True, False, False]),
                              ("ax]", [b"ab", b"a", b"x]{", b"}"], [True, True, False, False]),
                              ("]", [b"a", b"]", b"{}"], [True, False, False])):
        guide = outputs.guide(StructuredOutputsParams(json_object=True, start_after=tag))
        seen = []
        for raw in pieces:
            guide.advance(ids[raw])
            seen.append(guide.free)
        assert seen == free and guide.complete, (tag, pieces)
    guide = outputs.guide(StructuredOutputsParams(json_object=True, start_after="ab"))
    guide.advance(ids[b"a"])
    assert guide.free  # half the tag
    guide.advance(ids[b"{"])
    assert guide.free  # the half was not followed by the rest
    with pytest.raises(ValueError, match="start_after must be a non-empty string"):
        StructuredOutputsParams(json_object=True, start_after="")


@requires_stories
def test_a_real_vocabulary_reads_sentencepiece_spaces_and_byte_tokens():
    """stories260k: '▁the' adds ' the' mid-text, '<0x0A>' a newline byte; <s> adds nothing."""
    from lengthwise.tokenizer import Tokenizer

    tok = Tokenizer(STORIES)
    vocab = TokenVocabulary(tok, 512)
    the = tok.encode("a the", add_special_tokens=False)[-1]
    assert vocab.bytes[the] == b" the" and vocab.bytes[tok.token_to_id("<0x0A>")] == b"\n"
    assert vocab.bytes[tok.bos_token_id] is None
    g = json_object_grammar()
    state = g.advance_bytes(g.initial(), b'{"a": "')
    assert torch.equal(vocab.mask(g, state), brute_force(vocab, g, state))


# -- generation ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent (the ../shared checkout)")
    from lengthwise import LLM

    return LLM(str(STORIES))


def test_generation_keeps_to_a_schema(llm):
    """stories260k writes stories, not JSON; held to a schema, every answer that ends is valid
    (sampled, several seeds, n=4), and json_object answers parse as objects."""
    from lengthwise import SamplingParams

    ended = 0
    for spec, check in ((StructuredOutputsParams(json=PERSON), lambda v: valid(PERSON, v)),
                        (StructuredOutputsParams(json=TREE), lambda v: valid(TREE, v)),
                        (StructuredOutputsParams(json_object=True), lambda v: isinstance(v, dict))):
        params = SamplingParams(n=4, max_tokens=150, temperature=1.0, seed=random.Random(0).randrange(100),
                                structured_outputs=spec)
        for out in llm.generate(["Once upon a time", "Lily and Tom"], params, use_tqdm=False):
            for c in out.outputs:
                if c.finish_reason == "stop":
                    ended += 1
                    assert check(json.loads(c.text)), c.text
                else:  # cut by max_tokens: a prefix of valid JSON
                    assert c.finish_reason == "length" and c.text.lstrip()[:1] == "{"
    assert ended >= 8  # most answers end on their own
    # A whole answer ends the sample even where no end token may (ignore_eos) or should (min_tokens).
    for kw in (dict(ignore_eos=True), dict(min_tokens=8), dict(ignore_eos=True, min_tokens=3)):
        for temperature in (0.0, 1.0):
            params = SamplingParams(max_tokens=12, temperature=temperature, seed=1, **kw,
                                    structured_outputs=StructuredOutputsParams(choice=["happy", "sad"]))
            out = llm.generate(["Lily was"], params, use_tqdm=False)[0].outputs[0]
            assert out.text in ("happy", "sad") and out.finish_reason == "stop", (kw, out.text)
    # A regex, and a schema whose strings have patterns.
    date = r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-3]\d"
    params = SamplingParams(n=4, max_tokens=40, temperature=1.0, seed=3,
                            structured_outputs=StructuredOutputsParams(regex=f"{date}: [a-z ]{{3,20}}\\."))
    for c in llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs:
        assert c.finish_reason == "stop" and re.fullmatch(f"{date}: [a-z ]{{3,20}}\\.", c.text), c.text
    schema = {"type": "object", "properties": {"day": {"type": "string", "pattern": f"^{date}$"},
                                               "mood": {"type": "string", "pattern": "^(happy|sad)", "maxLength": 9}},
              "required": ["day", "mood"]}
    params = SamplingParams(n=4, max_tokens=60, temperature=1.0, seed=4, structured_outputs=StructuredOutputsParams(
        json=schema))
    ended = [c for c in llm.generate(["Lily was"], params, use_tqdm=False)[0].outputs if c.finish_reason == "stop"]
    assert len(ended) >= 2 and all(valid(schema, json.loads(c.text)) for c in ended), [c.text for c in ended]
    greedy = SamplingParams(max_tokens=10, temperature=0, structured_outputs=StructuredOutputsParams(
        choice=["happy", "sad", "very sad"]))
    assert {o.outputs[0].text for o in llm.generate(["Lily was", "Tom felt"], greedy, use_tqdm=False)} <= {
        "happy", "sad", "very sad"}


def test_a_request_without_a_tokenizer_is_refused(hf_checkpoint):
    from lengthwise import SamplingParams, load_model
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm_engine import LLMEngine

    engine = LLMEngine(load_model(hf_checkpoint("llama")[1]), None, EngineConfig(block_size=4))
    with pytest.raises(ValueError, match="structured_outputs needs a tokenizer"):
        engine.add_request([1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)))

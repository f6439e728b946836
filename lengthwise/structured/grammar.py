"""Byte-level grammars for structured outputs: a JSON Schema (or any JSON object, or one of a
list of strings) compiled into an automaton that reads a response one byte at a time.

The automaton is a nondeterministic pushdown machine. A state is a frozenset of stacks (so the
alternatives of `anyOf`, optional properties and type lists simply fork), a stack is a tuple of
frames with its top last, and a frame is a small tuple naming what comes next:

| frame | meaning |
|---|---|
| `("v", node)` | a value of schema node `node` |
| `("l", bytes, i)` | the literal `bytes[i:]` |
| `("w", n)` | optional whitespace (one space at most), `n` bytes of it so far |
| `("s", node, mode, count)` | inside a string: plain, after a backslash, in `\\uXXXX`, or mid UTF-8 character |
| `("n", integer, phase)` | inside a number, at a phase of JSON's number syntax |
| `("o", node, i, wrote)` | inside an object with declared properties, at property `i` |
| `("g", node, phase)` | inside an object of any keys (right after `{`, or after a member) |
| `("a", node, count)` | inside an array, after `count` items (capped where the schema stops caring) |
| `("x", node, nfa, pending, count)` | a `pattern` string or a `regex` response: regex states, a partial character |

States are hashable, so the token masks made from them can be cached (`guide.py`). Everything
here is plain Python over bytes: no torch, no tokenizer.

Supported JSON Schema: `type` (one or a list), `properties` (emitted in the schema's order;
`required` ones always, others optionally; no keys beyond them, as xgrammar's strict mode),
`additionalProperties` as the value schema of an object without `properties`, `items`,
`minItems`/`maxItems`, `minLength`/`maxLength`, `pattern` (JSON Schema's meaning: found somewhere
in the string unless anchored with `^...$`; the syntax `regex.py` reads), `enum`, `const`,
`anyOf`/`oneOf`, `allOf` of one schema, `$ref` to `#/$defs/...` or `#/definitions/...` (recursion
included). `format` is an annotation (JSON Schema lets validators ignore it). Keywords that
constrain what this cannot express (`minimum`, `multipleOf`, ...) are refused by name rather than
silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lengthwise.structured.regex import INFINITE, Regex, compile_regex

Stack = tuple[tuple[Any, ...], ...]
State = frozenset[Stack]

# Between JSON tokens: at most one space (outlines' default). JSON allows any run of whitespace,
# but a model held inside a grammar drifts into emitting it without end (newline after newline).
WHITESPACE = frozenset(b" ")
MAX_WHITESPACE = 1
# Alternatives alive at once. An ambiguous schema (two anyOf branches alike, nested) can double
# them per byte; past this a byte is refused: the answer stays valid, the engine stays responsive.
MAX_STACKS = 256
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_NUMBER_FINAL = frozenset((2, 3, 5, 8))  # phases where a number may end
_JSON_ESCAPES = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}
_UTF8_MIN = {1: 0x80, 2: 0x800, 3: 0x10000}  # the least code point of a character of 1 + n bytes (no overlongs)
_UTF8 = 10  # string modes 11..13: that many UTF-8 continuation bytes still to come
_UNICODE = 20  # string modes 21..24: that many hex digits of a \\uXXXX still to come

# Keywords that only annotate; with those we enforce, the schema keywords we read.
_NOTES = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "format",
                    "$defs", "definitions", "strict", "deprecated", "readOnly", "writeOnly"))
_ANNOTATIONS = _NOTES | {"additionalProperties", "required", "properties", "items", "type", "enum", "const",
                         "anyOf", "oneOf", "allOf", "$ref", "minItems", "maxItems", "minLength", "maxLength",
                         "pattern"}
# A type implied by the keywords of a schema that names none.
_IMPLIED = (("object", ("properties", "required", "additionalProperties")),
            ("array", ("items", "minItems", "maxItems")), ("string", ("minLength", "maxLength", "pattern")))


@dataclass
class Node:
    """One schema node. `kind`: any, object (declared `props`), map (any keys, `value` node),
    array (`item`, `lo`..`hi` items), string (`lo`..`hi` characters), pattern (a string of
    `lo`..`hi` characters matching `regex`), number, integer, literal (`literals`: the exact byte
    strings allowed), alt (`alts`: node ids), regex (the whole response matches `regex`, raw)."""

    kind: str
    props: list[tuple[bytes, int, bool]] = field(default_factory=list)  # (key as JSON, node, required)
    value: int = 0
    item: int = 0
    lo: int = 0
    hi: int | None = None
    literals: list[bytes] = field(default_factory=list)
    alts: list[int] = field(default_factory=list)
    regex: Regex | None = None


class Grammar:
    """A compiled grammar: `initial()`, then `advance(state, byte)` per byte (None: the byte is
    not allowed there), and `accepts(state)` when the response may end."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.root = 0
        self._expansions: dict[int, list[Stack]] = {}
        self._expanding: set[int] = set()  # alternatives being expanded (a cycle among them is cut)
        self._cut = False  # whether the expansion under way met such a cycle (then it is not cached)
        self._advanced: dict[tuple[State, int], State | None] = {}
        self.leading_whitespace = True  # JSON may start after whitespace; a choice may not

    # -- building --------------------------------------------------------------------------------

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # -- running ---------------------------------------------------------------------------------

    def initial(self) -> State:
        """Before the first byte: optional leading whitespace (JSON), then the root value (a raw
        regex's frame itself, so that a regex matching "" may end at once)."""
        if self.nodes[self.root].kind == "regex":
            return frozenset(self._expand(self.root))
        return frozenset({(("v", self.root), ("w", 0)) if self.leading_whitespace else (("v", self.root),)})

    def advance(self, state: State, byte: int) -> State | None:
        """The state after `byte`, or None if no stack of `state` allows it."""
        key = (state, byte)
        if key in self._advanced:
            return self._advanced[key]
        out: list[Stack] = []
        for stack in state:
            self._step(stack, byte, out, 0)
        result: State | None = frozenset(out)
        if not result or len(result) > MAX_STACKS:
            result = None
        if len(self._advanced) > 200_000:  # bounded memo: the token walk revisits the same states
            self._advanced.clear()
        self._advanced[key] = result
        return result

    def advance_bytes(self, state: State | None, data: bytes) -> State | None:
        for b in data:
            if state is None:
                return None
            state = self.advance(state, b)
        return state

    def accepts(self, state: State) -> bool:
        """Whether the response may end here: some stack needs no more bytes."""
        return any(all(self._final(f) for f in stack) for stack in state)

    def _final(self, frame: tuple[Any, ...]) -> bool:
        kind = frame[0]
        if kind == "x":  # a raw regex response, between characters, where its automaton accepts
            node = self.nodes[frame[1]]
            return node.kind == "regex" and frame[3] is None and node.regex is not None and \
                node.regex.accepts(frame[2])
        return kind == "w" or (kind == "n" and frame[2] in _NUMBER_FINAL)

    def plain_string_room(self, state: State) -> int | None | bool:
        """Inside a string, past any escape or partial character, in every stack: how many more
        characters of plain text (no quote, backslash or control byte) may follow, None for any
        number; False when not in such a string."""
        room: int | None = 0
        for stack in state:
            top = stack[-1] if stack else None
            if top is None or top[0] != "s" or top[2] != 0:
                return False
            hi = self.nodes[top[1]].hi
            if top[3] is None or hi is None:
                room = None
            elif room is not None:
                room = max(room, hi - top[3])
        return room

    def _step(self, stack: Stack, b: int, out: list[Stack], depth: int) -> None:
        if not stack:
            return  # the value is complete: nothing more may follow
        if depth > 64:
            return  # (alternatives nested without consuming input: refused, not a crash mid-step)
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind == "l":
            lit, i = top[1], top[2]
            if lit[i] == b:
                out.append(rest if i + 1 == len(lit) else (*rest, ("l", lit, i + 1)))
        elif kind == "w":
            if b in WHITESPACE and top[1] < MAX_WHITESPACE:
                out.append((*rest, ("w", top[1] + 1)))
            self._step(rest, b, out, depth + 1)  # or the whitespace is over
        elif kind == "v":
            for seq in self._expand(top[1]):
                self._step(rest + seq, b, out, depth + 1)
        elif kind == "s":
            self._string(top, rest, b, out)
        elif kind == "n":
            self._number(top, rest, b, out, depth)
        elif kind == "x":
            self._pattern(top, rest, b, out)
        else:
            for seq in self._members(top):
                self._step(rest + seq, b, out, depth + 1)

    def _expand(self, nid: int) -> list[Stack]:
        """The frame sequences (top last) a value of node `nid` may start with."""
        cached = self._expansions.get(nid)
        if cached is not None:
            return cached
        if nid in self._expanding:  # a cycle through alternatives adds nothing the outer one lacks
            self._cut = True
            return []
        self._expanding.add(nid)
        outer_cut, self._cut = self._cut, False
        seqs = self._expand_node(nid)
        self._expanding.discard(nid)
        if not self._cut:  # complete: not cut short by a cycle through a node still being expanded
            self._expansions[nid] = seqs
        self._cut = self._cut or outer_cut
        return seqs

    def _expand_node(self, nid: int) -> list[Stack]:
        node = self.nodes[nid]
        open_ = {"object": ("o", nid, 0, False), "map": ("g", nid, 0), "array": ("a", nid, 0)}
        if node.kind in open_:
            brace = b"[" if node.kind == "array" else b"{"
            seqs: list[Stack] = [(open_[node.kind], ("w", 0), ("l", brace, 0))]
        elif node.kind == "string":
            seqs = [(("s", nid, 0, 0 if node.lo or node.hi is not None else None), ("l", b'"', 0))]
        elif node.kind == "pattern":
            assert node.regex is not None
            seqs = [(("x", nid, node.regex.start, None, 0 if node.lo or node.hi is not None else None),
                     ("l", b'"', 0))]
        elif node.kind == "regex":
            assert node.regex is not None
            seqs = [(("x", nid, node.regex.start, None, None),)]
        elif node.kind in ("number", "integer"):
            seqs = [(("n", node.kind == "integer", 0),)]
        elif node.kind == "literal":
            seqs = [(("l", lit, 0),) for lit in node.literals]
        else:  # alt, any
            seqs = list(dict.fromkeys(seq for alt in node.alts for seq in self._expand(alt)))
        return seqs

    def _members(self, top: tuple[Any, ...]) -> list[Stack]:
        """What may come next inside an object or array frame."""
        kind, nid = top[0], top[1]
        node = self.nodes[nid]
        close: Stack = (("l", b"]" if kind == "a" else b"}", 0),)
        alts: list[Stack] = []
        if kind == "o":
            i, wrote = top[2], top[3]
            sep: Stack = (("w", 0), ("l", b",", 0)) if wrote else ()
            for j in range(i, len(node.props)):
                key, vid, required = node.props[j]
                alts.append((("o", nid, j + 1, True), ("w", 0), ("v", vid), ("w", 0), ("l", b":", 0), ("w", 0),
                             ("l", key, 0), *sep))
                if required:
                    break
            else:
                alts.append(close)
        elif kind == "g":
            sep = (("w", 0), ("l", b",", 0)) if top[2] else ()
            alts = [close, (("g", nid, 1), ("w", 0), ("v", node.value), ("w", 0), ("l", b":", 0), ("w", 0),
                            ("v", KEY), *sep)]
        else:  # array
            count = top[2]
            cap = node.hi if node.hi is not None else max(node.lo, 1)
            if count >= node.lo:
                alts.append(close)
            if node.hi is None or count < node.hi:
                sep = (("w", 0), ("l", b",", 0)) if count else ()
                alts.append((("a", nid, min(count + 1, cap)), ("w", 0), ("v", node.item), *sep))
        return alts

    def _string(self, top: tuple[Any, ...], rest: Stack, b: int, out: list[Stack]) -> None:
        _, nid, mode, count = top
        if mode == 0:
            if b == 0x22:  # the closing quote
                if count is None or count >= self.nodes[nid].lo:
                    out.append(rest)
                return
            if b < 0x20 or 0x80 <= b < 0xC2 or b > 0xF4:
                return  # a control byte, a stray continuation byte, or no UTF-8 lead byte
            if count is not None:  # a new character: count it against maxLength
                count += 1
                hi = self.nodes[nid].hi
                if hi is not None and count > hi:
                    return
                count = min(count, hi if hi is not None else self.nodes[nid].lo)
            mode = 1 if b == 0x5C else 0 if b < 0x80 else _UTF8 + (1 if b < 0xE0 else 2 if b < 0xF0 else 3)
        elif mode == 1:  # after a backslash
            if b == 0x75:
                mode = _UNICODE + 4
            elif b in _ESCAPES:
                mode = 0
            else:
                return
        elif mode > _UNICODE:
            if b not in _HEX:
                return
            mode = 0 if mode == _UNICODE + 1 else mode - 1
        else:  # mid UTF-8 character
            if not 0x80 <= b <= 0xBF:
                return
            mode = 0 if mode == _UTF8 + 1 else mode - 1
        out.append((*rest, ("s", nid, mode, count)))

    def _pattern(self, top: tuple[Any, ...], rest: Stack, b: int, out: list[Stack]) -> None:
        """A byte of a string held to a regex (inside JSON quotes, escapes decoded: `pattern`) or of
        a raw regex response. A partial character is allowed only if some completion of it is."""
        _, nid, states, pending, count = top
        node = self.nodes[nid]
        regex, quoted = node.regex, node.kind == "pattern"
        assert regex is not None
        if pending is None:
            if quoted and b == 0x22:  # the closing quote
                if regex.accepts(states) and (count is None or count >= node.lo):
                    out.append(rest)
                return
            if quoted and b == 0x5C:
                pending = ("esc",)
            elif b < 0x80:
                if not (quoted and b < 0x20):  # (JSON needs a control character escaped)
                    self._pattern_char(top, rest, b, out)
                return
            elif 0xC2 <= b <= 0xF4:
                n = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
                pending = ("u8", n, b & (0x1F, 0x0F, 0x07)[n - 1], _UTF8_MIN[n])
            else:
                return  # a stray continuation byte, or no UTF-8 lead byte
        elif pending[0] == "esc":
            if b == 0x75:  # \uXXXX
                pending = ("hex", 4, 0)
            else:
                if b in _JSON_ESCAPES:
                    self._pattern_char(top, rest, _JSON_ESCAPES[b], out)
                return
        elif pending[0] == "hex":
            if b not in _HEX:
                return
            left, value = pending[1] - 1, pending[2] * 16 + int(chr(b), 16)
            if not left:
                if not 0xD800 <= value <= 0xDFFF:  # (a surrogate pair's halves are not characters)
                    self._pattern_char(top, rest, value, out)
                return
            pending = ("hex", left, value)
        else:  # mid UTF-8 character
            if not 0x80 <= b <= 0xBF:
                return
            left, value, least = pending[1] - 1, pending[2] << 6 | (b & 0x3F), pending[3]
            if not left:
                if least <= value <= 0x10FFFF and not 0xD800 <= value <= 0xDFFF:
                    self._pattern_char(top, rest, value, out)
                return
            pending = ("u8", left, value, least)
        # (at maxLength the room is negative: no character may start there)
        if _completable(regex, states, pending, self._room(node, count)):
            out.append((*rest, ("x", nid, states, pending, count)))

    @staticmethod
    def _room(node: Node, count: int | None) -> tuple[float, float]:
        """After one more character: how many more a match may still need, at least and at most."""
        if count is None:
            return 0, INFINITE
        return node.lo - count - 1, INFINITE if node.hi is None else node.hi - count - 1

    def _pattern_char(self, top: tuple[Any, ...], rest: Stack, c: int, out: list[Stack]) -> None:
        _, nid, states, _, count = top
        node = self.nodes[nid]
        if count is not None:  # count it against maxLength
            count += 1
            if node.hi is not None and count > node.hi:
                return
            count = min(count, node.hi if node.hi is not None else node.lo)
        assert node.regex is not None
        nxt = node.regex.step(states, c)
        if nxt is None:
            return
        if count is not None:  # a match must still fit between minLength and maxLength
            fewest, most = node.regex.lengths(nxt)
            if (node.hi is not None and count + fewest > node.hi) or count + most < node.lo:
                return
        out.append((*rest, ("x", nid, nxt, None, count)))

    def _number(self, top: tuple[Any, ...], rest: Stack, b: int, out: list[Stack], depth: int) -> None:
        _, integer, phase = top
        nxt = None
        digit = b in _DIGITS
        if phase in (0, 1):  # at the start, or after a minus
            nxt = 1 if (b == 0x2D and phase == 0) else 2 if b == 0x30 else 3 if digit else None
        elif phase in (3, 5, 8) and digit:
            nxt = phase
        elif phase in (4, 6, 7) and digit:
            nxt = {4: 5, 6: 8, 7: 8}[phase]
        elif phase == 6 and b in (0x2B, 0x2D):
            nxt = 7
        elif phase in (2, 3) and b == 0x2E and not integer:
            nxt = 4
        elif phase in (2, 3, 5) and b in (0x65, 0x45) and not integer:
            nxt = 6
        if nxt is not None:
            out.append((*rest, ("n", integer, nxt)))
        if phase in _NUMBER_FINAL:
            self._step(rest, b, out, depth + 1)  # or the number is over


def _completable(regex: Regex, states: frozenset[int], pending: tuple[Any, ...],
                 room: tuple[float, float]) -> bool:
    """Whether a character in the making can still end as one the regex allows next, with a match
    still possible in `room` (`Grammar._room`)."""
    if pending[0] == "esc":  # a short escape's character, or any \\u code point
        return any(regex.allows_some(states, c, c, room) for c in _JSON_ESCAPES.values()) or \
            _completable(regex, states, ("hex", 4, 0), room)
    if pending[0] == "hex":
        lo = pending[2] << (4 * pending[1])
        hi = lo | ((1 << (4 * pending[1])) - 1)
    else:
        lo = max(pending[2] << (6 * pending[1]), pending[3])
        hi = min((pending[2] << (6 * pending[1])) | ((1 << (6 * pending[1])) - 1), 0x10FFFF)
    return (lo < 0xD800 and regex.allows_some(states, lo, min(hi, 0xD7FF), room)) or \
        (hi > 0xDFFF and regex.allows_some(states, max(lo, 0xE000), hi, room))


KEY = 0  # every grammar's node 0: an object key (a string of any length)


def _base(grammar: Grammar) -> dict[str, int]:
    """Node 0 (KEY) and the nodes of an untyped JSON value, shared by every schema."""
    grammar.add(Node("string"))  # KEY
    any_id = grammar.add(Node("any"))
    parts = {
        "string": KEY,
        "number": grammar.add(Node("number")),
        "integer": grammar.add(Node("integer")),
        "boolean": grammar.add(Node("literal", literals=[b"true", b"false"])),
        "null": grammar.add(Node("literal", literals=[b"null"])),
        "object": grammar.add(Node("map", value=any_id)),
        "array": grammar.add(Node("array", item=any_id)),
    }
    grammar.nodes[any_id].alts = [parts[k] for k in ("object", "array", "string", "number", "boolean", "null")]
    return {"any": any_id, **parts}


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    grammar = Grammar()
    grammar.root = _base(grammar)["object"]
    return grammar


def choice_grammar(choices: list[str]) -> Grammar:
    """Exactly one of `choices`, as written (vLLM's `guided_choice`)."""
    grammar = Grammar()
    _base(grammar)
    grammar.root = grammar.add(Node("literal", literals=[c.encode() for c in choices]))
    grammar.leading_whitespace = False
    return grammar


def regex_grammar(pattern: str) -> Grammar:
    """A response that matches `pattern` as a whole (vLLM's `regex`); a pattern `regex.py`
    cannot compile is a `ValueError` naming why."""
    grammar = Grammar()
    _base(grammar)
    grammar.root = grammar.add(Node("regex", regex=compile_regex(pattern)))
    grammar.leading_whitespace = False
    return grammar


def json_schema_grammar(schema: dict[str, Any]) -> Grammar:
    """A JSON value matching `schema` (the subset in this module's docstring); a schema using
    what this cannot enforce is a `ValueError` naming the keyword and where it is."""
    grammar = Grammar()
    base = _base(grammar)
    compiler = _SchemaCompiler(grammar, base, schema)
    grammar.root = compiler.compile(schema, "#")
    return grammar


class _SchemaCompiler:
    def __init__(self, grammar: Grammar, base: dict[str, int], root: dict[str, Any]) -> None:
        self.grammar, self.base, self.root = grammar, base, root
        self.refs: dict[str, int] = {}

    def compile(self, schema: Any, where: str) -> int:
        g = self.grammar
        if schema is True or schema == {}:
            return self.base["any"]
        if not isinstance(schema, dict):
            raise ValueError(f"json schema at {where} must be an object, got {json.dumps(schema)[:60]}")
        unknown = sorted(set(schema) - _ANNOTATIONS)
        if unknown:
            raise ValueError(f"json schema at {where} uses {unknown}, which structured outputs here cannot "
                             f"enforce (supported: type, properties, required, items, enum, const, anyOf/oneOf, "
                             f"$ref, minItems/maxItems, minLength/maxLength, pattern)")
        combinators = [k for k in ("$ref", "const", "enum", "anyOf", "oneOf", "allOf") if k in schema]
        if combinators:
            beside = sorted(set(schema) - _NOTES - {combinators[0]} - ({"type"} if combinators[0] in ("enum", "const")
                                                                        else set()))
            if beside:
                raise ValueError(f"json schema at {where} has {beside} beside {combinators[0]}, which structured "
                                 f"outputs here cannot combine: put them inside its alternatives")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "const" in schema:
            return g.add(Node("literal", literals=[_json_bytes(schema["const"])]))
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise ValueError(f"json schema at {where}: enum must be a non-empty list")
            return g.add(Node("literal", literals=[_json_bytes(v) for v in schema["enum"]]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise ValueError(f"json schema at {where}: {key} must be a non-empty list")
                return g.add(Node("alt", alts=[self.compile(s, f"{where}/{key}/{i}") for i, s in enumerate(options)]))
        if "allOf" in schema:
            if not isinstance(schema["allOf"], list) or len(schema["allOf"]) != 1:
                raise ValueError(f"json schema at {where}: allOf is supported with one schema only")
            return self.compile(schema["allOf"][0], f"{where}/allOf/0")
        kind = schema.get("type")
        if kind is None:
            kind = next((k for k, keys in _IMPLIED if any(key in schema for key in keys)), None)
            if kind is None:
                return self.base["any"]
        if isinstance(kind, list):
            if not kind:
                raise ValueError(f"json schema at {where}: type must not be an empty list")
            return g.add(Node("alt", alts=[self._typed(dict(schema, type=k), k, where) for k in kind]))
        return self._typed(schema, kind, where)

    def _typed(self, schema: dict[str, Any], kind: Any, where: str) -> int:
        g = self.grammar
        if kind in ("boolean", "null", "number", "integer"):
            return self.base[kind]
        if kind == "string":
            lo, hi = _bounds(schema, "minLength", "maxLength", where)
            if "pattern" in schema:
                try:
                    regex = compile_regex(schema["pattern"], search=True)
                except ValueError as e:
                    raise ValueError(f"json schema at {where}/pattern: {e}") from None
                fewest, most = regex.lengths(regex.start)
                if (hi is not None and fewest > hi) or most < lo:
                    raise ValueError(f"json schema at {where}: no string matching its pattern has "
                                     f"{lo} to {hi if hi is not None else 'any number of'} characters")
                return g.add(Node("pattern", lo=lo, hi=hi, regex=regex))
            return self.base["string"] if (lo, hi) == (0, None) else g.add(Node("string", lo=lo, hi=hi))
        if kind == "array":
            lo, hi = _bounds(schema, "minItems", "maxItems", where)
            nid = g.add(Node("array", lo=lo, hi=hi))
            g.nodes[nid].item = self.compile(schema.get("items", True), f"{where}/items")
            return nid
        if kind == "object":
            props = schema.get("properties")
            if props is None:
                if schema.get("required"):
                    raise ValueError(f"json schema at {where}: required without properties cannot be enforced "
                                     f"here: declare the required properties")
                extra = schema.get("additionalProperties", True)
                if extra is False:
                    return g.add(Node("literal", literals=[b"{}"]))
                nid = g.add(Node("map"))
                g.nodes[nid].value = self.compile(extra, f"{where}/additionalProperties")
                return nid
            if not isinstance(props, dict):
                raise ValueError(f"json schema at {where}: properties must be an object")
            required = schema.get("required", [])
            if not isinstance(required, list) or any(r not in props for r in required):
                raise ValueError(f"json schema at {where}: required must list names among its properties")
            nid = g.add(Node("object"))
            g.nodes[nid].props = [(_json_bytes(name), self.compile(sub, f"{where}/properties/{name}"),
                                   name in required) for name, sub in props.items()]
            return nid
        raise ValueError(f"json schema at {where}: type {kind!r} is not a JSON Schema type")

    def _ref(self, ref: Any, where: str) -> int:
        if ref in self.refs:
            return self.refs[ref]
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(f"json schema at {where}: $ref {ref!r} must point inside the schema (#/$defs/...)")
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"json schema at {where}: $ref {ref!r} points at nothing")
            target = target[part]
        nid = self.grammar.add(Node("alt"))  # filled below, so a recursive $ref finds it
        self.refs[ref] = nid
        self.grammar.nodes[nid].alts = [self.compile(target, ref)]
        return nid


def _bounds(schema: dict[str, Any], lo_key: str, hi_key: str, where: str) -> tuple[int, int | None]:
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
    for key, value in ((lo_key, lo), (hi_key, hi)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"json schema at {where}: {key} must be an integer >= 0")
    if hi is not None and hi < lo:
        raise ValueError(f"json schema at {where}: {hi_key} is below {lo_key}")
    return lo, hi


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode()

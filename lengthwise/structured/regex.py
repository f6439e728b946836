"""Regular expressions as character automata, for structured outputs (vLLM's `regex`, JSON Schema's
`pattern`).

`compile_regex(pattern)` parses the common regex syntax (Python's and ECMA-262's shared core)
into a Thompson NFA over Unicode code points: literals and escapes, `.`, classes `[...]` with
ranges and negation, `\\d \\w \\s` (ASCII, as ECMA-262 defines `\\d` and `\\w`) and their negations,
groups (capturing, `(?:...)`, named), alternation, and the quantifiers `* + ? {n} {n,} {n,m}`
(a lazy `?` after one changes what a search finds, not which strings match, so it is accepted).
`^` at the start and `$` at the end are accepted and mean what a whole-string match means anyway.
What cannot be an automaton over one string (backreferences, lookaround, word boundaries) and
what this does not model (inline flags, Unicode property classes, possessive quantifiers) is a
`ValueError` naming the construct and where it is.

A state is a frozenset of NFA states (closed under empty moves), hashable so that the grammar
states holding it can key the token-mask cache. Plain Python, no torch.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

MAX_STATES = 20_000  # NFA states: {n,m} copies its operand, so a large count is refused, not built
MAX_CODEPOINT = 0x10FFFF
INFINITE = float("inf")
Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges

_DIGITS = re.compile("[0-9]+")
_DIGIT: Ranges = ((0x30, 0x39),)
_WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                  (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
_SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
_REFUSED_ESCAPES = {"b": "a word boundary (\\b)", "B": "a non-boundary (\\B)", "A": "\\A", "Z": "\\Z",
                    "z": "\\z", "G": "\\G", "p": "a Unicode property class (\\p)",
                    "P": "a Unicode property class (\\P)", "k": "a named backreference (\\k)"}


def _normalise(ranges: list[tuple[int, int]]) -> Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _negate(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODEPOINT:
        out.append((nxt, MAX_CODEPOINT))
    return tuple(out)


def _contains(ranges: Ranges, c: int) -> bool:
    i = bisect.bisect_right(ranges, (c, MAX_CODEPOINT + 1)) - 1
    return i >= 0 and ranges[i][0] <= c <= ranges[i][1]


def _overlaps(ranges: Ranges, lo: int, hi: int) -> bool:
    i = bisect.bisect_right(ranges, (lo, MAX_CODEPOINT + 1)) - 1
    if i >= 0 and ranges[i][1] >= lo:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] <= hi


@dataclass
class _NState:
    eps: list[int] = field(default_factory=list)
    edges: list[tuple[Ranges, int]] = field(default_factory=list)


class Regex:
    """A compiled pattern: `start`, `step(states, codepoint)` (None: not allowed, or no match can
    follow), `accepts(states)`, `allows_some(states, lo, hi)` (some code point in [lo, hi] is
    allowed next; the grammar asks it mid UTF-8 character and mid `\\uXXXX` escape), and
    `lengths(states)`: the fewest and the most characters still needed to reach a match (the
    grammar keeps a `maxLength`/`minLength` reachable with them)."""

    def __init__(self, pattern: str, states: list[_NState], start: int, final: int) -> None:
        self.pattern = pattern
        self._states, self._final = states, final
        self._closures: dict[int, frozenset[int]] = {}
        self._steps: dict[tuple[frozenset[int], int], frozenset[int] | None] = {}
        self._fewest, self._most = self._distances()
        self.start = self._close((start,))
        if self.lengths(self.start)[0] == INFINITE:
            raise ValueError(f"regex {pattern!r} matches no string")

    def _distances(self) -> tuple[list[float], list[float]]:
        """Per NFA state, the fewest and the most characters to a match (INFINITE: none, or no
        bound): breadth first back from the final state, then longest paths over what is left
        once every state on or before a cycle is set aside."""
        n = len(self._states)
        succ: list[set[int]] = [set() for _ in range(n)]
        for s, st in enumerate(self._states):
            for ranges, t in st.edges:
                if ranges:  # (an empty class, as [^\\s\\S], leads nowhere)
                    succ[s] |= self._closure(t)
        pred: list[list[int]] = [[] for _ in range(n)]
        for s in range(n):
            for t in succ[s]:
                pred[t].append(s)
        fewest = [INFINITE] * n
        fewest[self._final] = 0
        queue = [self._final]
        for u in queue:
            for s in pred[u]:
                if fewest[s] == INFINITE:
                    fewest[s] = fewest[u] + 1
                    queue.append(s)
        useful = [f != INFINITE for f in fewest]
        pending = [sum(useful[t] for t in succ[s]) for s in range(n)]
        most = [INFINITE] * n
        ready = [s for s in range(n) if useful[s] and not pending[s]]
        for u in ready:  # (a state leaves `pending` once all its successors have their longest path)
            most[u] = max([0.0] * (u == self._final) + [1 + most[t] for t in succ[u] if useful[t]])
            for s in pred[u]:
                if useful[s]:
                    pending[s] -= 1
                    if not pending[s]:
                        ready.append(s)
        return fewest, most

    def lengths(self, states: frozenset[int]) -> tuple[float, float]:
        """(fewest, most) characters from `states` to a match; INFINITE most: no bound."""
        return min(self._fewest[s] for s in states), max(self._most[s] for s in states)

    def _closure(self, s: int) -> frozenset[int]:
        cached = self._closures.get(s)
        if cached is None:
            seen, todo = {s}, [s]
            while todo:
                for t in self._states[todo.pop()].eps:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            # Only states with edges (and the final one) matter once closed: smaller sets, more sharing.
            cached = self._closures[s] = frozenset(t for t in seen if self._states[t].edges or t == self._final)
        return cached

    def _close(self, states: tuple[int, ...] | list[int]) -> frozenset[int]:
        out: set[int] = set()
        for s in states:
            out |= self._closure(s)
        return frozenset(out)

    def step(self, states: frozenset[int], c: int) -> frozenset[int] | None:
        key = (states, c)
        if key in self._steps:
            return self._steps[key]
        targets = [t for s in states for ranges, t in self._states[s].edges if _contains(ranges, c)]
        result = self._close(targets) if targets else None
        if result is not None and self.lengths(result)[0] == INFINITE:
            result = None  # a state no match can follow from
        if len(self._steps) > 100_000:
            self._steps.clear()
        self._steps[key] = result
        return result

    def accepts(self, states: frozenset[int]) -> bool:
        return self._final in states

    def allows_some(self, states: frozenset[int], lo: int, hi: int, room: tuple[float, float] = (0, INFINITE)) -> bool:
        """Whether some code point in [lo, hi] is allowed next, to states from which a match can
        end within `room` more characters: (at least, at most)."""
        least, at_most = room
        for s in states:
            for ranges, t in self._states[s].edges:
                if lo <= hi and _overlaps(ranges, lo, hi):
                    fewest, most = self.lengths(self._closure(t))
                    if fewest <= at_most and most >= least:
                        return True
        return False


def compile_regex(pattern: str, search: bool = False) -> Regex:
    """The automaton of the strings `pattern` matches as a whole (vLLM's `regex`), or with
    `search`, of those it is found in (JSON Schema's `pattern`: `^` and `$` anchor it). A
    `ValueError` names what cannot be compiled, and where."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a string, got {type(pattern).__name__}")
    return _Parser(pattern).compile(search)


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0
        self.states: list[_NState] = []
        self.depth = 0  # groups open

    # -- NFA fragments: (start, end) ----------------------------------------------------------------

    def _new(self) -> int:
        if len(self.states) >= MAX_STATES:
            raise ValueError(f"regex {self.p!r} needs more than {MAX_STATES} automaton states (a large "
                             f"{{n,m}} count?): write it with fewer repetitions")
        self.states.append(_NState())
        return len(self.states) - 1

    def _chars(self, ranges: Ranges) -> tuple[int, int]:
        a, b = self._new(), self._new()
        self.states[a].edges.append((ranges, b))
        return a, b

    def _empty(self) -> tuple[int, int]:
        a, b = self._new(), self._new()
        self.states[a].eps.append(b)
        return a, b

    def _concat(self, frags: list[tuple[int, int]]) -> tuple[int, int]:
        if not frags:
            return self._empty()
        for (_, end), (start, _) in zip(frags, frags[1:], strict=False):
            self.states[end].eps.append(start)
        return frags[0][0], frags[-1][1]

    # -- parsing ------------------------------------------------------------------------------------

    def error(self, what: str) -> ValueError:
        return ValueError(f"regex {self.p!r} at position {self.i}: {what}")

    def compile(self, search: bool) -> Regex:
        """The top level: branches, each with its own `^` and `$` (`^$|^[a-z]+$`); searched, an
        unanchored side of a branch may have any text beside it."""
        branches = []
        while True:
            head = self._peek() == "^"
            self.i += head
            frag = self._sequence()
            tail = self._peek() == "$"
            self.i += tail
            if search:
                parts = [self._anywhere()] if not head else []
                parts.append(frag)
                if not tail:
                    parts.append(self._anywhere())
                frag = self._concat(parts)
            branches.append(frag)
            if self._peek() != "|":
                break
            self.i += 1
        if self.i < len(self.p):
            raise self.error("unbalanced ')'" if self.p[self.i] == ")" else f"unexpected {self.p[self.i]!r}")
        return Regex(self.p, self.states, *self._either(branches))

    def _anywhere(self) -> tuple[int, int]:
        s = self._new()
        self.states[s].edges.append((((0, MAX_CODEPOINT),), s))
        return s, s

    def _either(self, branches: list[tuple[int, int]]) -> tuple[int, int]:
        if len(branches) == 1:
            return branches[0]
        a, b = self._new(), self._new()
        for s, e in branches:
            self.states[a].eps.append(s)
            self.states[e].eps.append(b)
        return a, b

    def _peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def _alternation(self) -> tuple[int, int]:
        branches = [self._sequence()]
        while self._peek() == "|":
            self.i += 1
            branches.append(self._sequence())
        return self._either(branches)

    def _sequence(self) -> tuple[int, int]:
        frags = []
        while True:
            ch = self._peek()
            top_end = ch == "$" and not self.depth and self.p[self.i + 1:self.i + 2] in ("", "|")
            if ch is None or ch in "|)" or top_end:  # (the $ ending a top-level branch)
                break
            # An atom is parsed again for each copy a counted quantifier needs (fresh states each time).
            at = self.i
            frag = self._atom()
            frags.append(self._quantified(frag, at))
        return self._concat(frags)

    def _quantified(self, frag: tuple[int, int], at: int) -> tuple[int, int]:
        ch = self._peek()
        if ch is None or ch not in "*+?{":
            return frag
        if ch == "{":
            bounds = self._counts()
            if bounds is None:
                return frag  # a literal "{" (as Python reads one that starts no count)
            lo, hi = bounds
        else:
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        after = self.i
        if self._peek() == "?":
            self.i += 1  # lazy: the same strings match
            after = self.i
        elif self._peek() == "+":
            raise self.error("possessive quantifiers are not supported")
        if (self._peek() is not None and self._peek() in "*+?") or (self._peek() == "{" and self._is_count()):
            raise self.error("a quantifier cannot follow another")
        copies = [frag] + [self._reparse(at) for _ in range(max(lo, 1 if hi is None else hi) - 1)]
        self.i = after
        parts = copies[:lo]
        if hi is None:
            loop = copies[lo - 1] if lo else copies[0]
            if lo:  # the last required copy repeats
                self.states[loop[1]].eps.append(loop[0])
                return self._concat(parts)
            a, b = self._new(), self._new()
            self.states[a].eps += [loop[0], b]
            self.states[loop[1]].eps += [loop[0], b]
            return a, b
        # lo required copies, then hi - lo optional ones, each entered through a state of its own
        # that may skip to the end (not the copy's start: a loop inside the copy, as in (a+b)?,
        # returns there mid-copy, and must not find the way out)
        end = self._new()
        optional = []
        for s, e in copies[lo:hi]:
            entry = self._new()
            self.states[entry].eps += [s, end]
            optional.append((entry, e))
        chain = parts + optional
        if not chain:
            return self._empty()
        start, last = self._concat(chain)
        self.states[last].eps.append(end)
        return start, end

    def _reparse(self, at: int) -> tuple[int, int]:
        self.i = at
        return self._atom()

    def _is_count(self) -> bool:
        at = self.i
        try:
            return self._counts() is not None
        finally:
            self.i = at

    def _counts(self) -> tuple[int, int | None] | None:
        j = self.p.find("}", self.i)
        body = self.p[self.i + 1:j] if j != -1 else ""
        lo_s, comma, hi_s = body.partition(",")
        if j == -1 or not (_DIGITS.fullmatch(lo_s) or (comma and _DIGITS.fullmatch(hi_s) and not lo_s)) or \
                (hi_s and not _DIGITS.fullmatch(hi_s)):
            return None
        lo = int(lo_s) if lo_s else 0
        hi = (int(hi_s) if hi_s else None) if comma else lo
        if hi is not None and hi < lo:
            raise self.error(f"{{{body}}}: the maximum is below the minimum")
        self.i = j + 1
        return lo, hi

    def _atom(self) -> tuple[int, int]:
        ch = self.p[self.i]
        if ch == "(":
            return self._group()
        if ch == "[":
            return self._chars(self._class())
        if ch == ".":
            self.i += 1
            return self._chars(_negate(((0x0A, 0x0A),)))
        if ch == "\\":
            return self._chars(self._escape(in_class=False))
        if ch in "*+?":
            raise self.error(f"{ch!r} has nothing to repeat")
        if ch in "^$":
            raise self.error(f"{ch!r} is only accepted at the {'start' if ch == '^' else 'end'} of the pattern "
                             f"or of one of its top-level alternatives")
        self.i += 1
        return self._chars(((ord(ch), ord(ch)),))

    def _group(self) -> tuple[int, int]:
        self.i += 1
        if self.p.startswith("?", self.i):
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or (self.p.startswith("?<", self.i)
                                                      and not self.p.startswith(("?<=", "?<!"), self.i)):
                j = self.p.find(">", self.i)
                if j == -1:
                    raise self.error("unterminated group name")
                self.i = j + 1
            else:
                what = ("lookaround" if self.p.startswith(("?=", "?!", "?<=", "?<!"), self.i)
                        else "a backreference" if self.p.startswith("?P=", self.i) else "an inline flag or extension")
                raise self.error(f"{what} is not supported (structured outputs need a plain regular language)")
        self.depth += 1
        frag = self._alternation()
        self.depth -= 1
        if self._peek() != ")":
            raise self.error("missing ')'")
        self.i += 1
        return frag

    def _escape(self, in_class: bool) -> Ranges:
        """After a backslash at self.i: the characters it stands for."""
        self.i += 1
        if self.i >= len(self.p):
            raise self.error("the pattern ends in a backslash")
        ch = self.p[self.i]
        self.i += 1
        classes = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if ch.lower() in classes:
            ranges = classes[ch.lower()]
            return _negate(ranges) if ch.isupper() else ranges
        if ch in _SIMPLE_ESCAPES and not (ch == "0" and self._peek() is not None and self._peek().isdigit()):
            c = _SIMPLE_ESCAPES[ch]
        elif ch in "xu":
            n = 2 if ch == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{ch} needs {n} hex digits")
            self.i += n
            c = int(digits, 16)
        elif ch == "b" and in_class:
            c = 0x08
        elif ch in _REFUSED_ESCAPES:
            raise self.error(f"{_REFUSED_ESCAPES[ch]} is not supported (structured outputs need a plain regular "
                             f"language)")
        elif ch == "0":
            raise self.error("octal escapes are not supported: write \\xHH")
        elif ch.isdigit():
            raise self.error("backreferences are not supported (structured outputs need a plain regular language)")
        elif ch.isalnum():
            raise self.error(f"unknown escape \\{ch}")
        else:
            c = ord(ch)  # an escaped punctuation character or space stands for itself
        return ((c, c),)

    def _class(self) -> Ranges:
        self.i += 1
        negated = self._peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            ch = self._peek()
            if ch is None:
                raise self.error("missing ']'")
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            lo_set = self._class_item()
            if len(lo_set) == 1 and lo_set[0][0] == lo_set[0][1] and self.p.startswith("-", self.i) and \
                    self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                hi_set = self._class_item()
                if len(hi_set) != 1 or hi_set[0][0] != hi_set[0][1]:
                    raise self.error("a class range must end in one character")
                lo, hi = lo_set[0][0], hi_set[0][0]
                if hi < lo:
                    raise self.error(f"bad character range {chr(lo)!r}-{chr(hi)!r}")
                ranges.append((lo, hi))
            else:
                ranges.extend(lo_set)
        result = _normalise(ranges)
        return _negate(result) if negated else result

    def _class_item(self) -> Ranges:
        ch = self.p[self.i]
        if ch == "\\":
            return self._escape(in_class=True)
        if ch == "[" and self.p.startswith(("[:", "[=", "[."), self.i):
            raise self.error("POSIX character classes are not supported")
        self.i += 1
        return ((ord(ch), ord(ch)),)

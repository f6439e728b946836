"""Synthetic instruction tasks for the built-in tiny model: plain-English instructions whose
answers run from one word to a few hundred tokens, with lengths that follow from the instruction
(count from 3 to 90, repeat a phrase 12 times, describe a fox in 5 sentences), so that a small
model can learn both to answer and to perceive its answer's length in advance.

Every family has a generator (a `random.Random` in, an `Example` out) and a checker that decides
whether a candidate answer is correct: exact (after whitespace normalisation) where the answer is
determined by the instruction, structural where the family draws its content at random (list N
animals: any N distinct animals; describe a fox in 3 sentences: 3 sentences of the grammar, about
the fox). `generate(n, seed)` is deterministic for a seed. Stdlib only.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# -- vocabularies ----------------------------------------------------------------------------------

KINDS: dict[str, list[str]] = {
    "animals": ["cat", "dog", "fox", "owl", "bear", "wolf", "deer", "frog", "duck", "goat", "lion", "tiger",
                "horse", "mouse", "rabbit", "sheep", "whale", "eagle", "snake", "zebra"],
    "colours": ["red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey",
                "gold", "silver"],
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "orange", "peach", "pear", "plum",
               "lime", "kiwi", "fig"],
    "tools": ["hammer", "saw", "drill", "wrench", "spade", "rake", "axe", "knife", "ruler", "brush"],
    "places": ["forest", "river", "mountain", "village", "city", "beach", "desert", "island", "valley", "lake",
               "garden", "castle"],
    "foods": ["bread", "soup", "rice", "cheese", "cake", "pie", "salad", "pasta", "honey", "egg", "milk", "tea"],
}
WORDS = ["cat", "dog", "sun", "moon", "tree", "river", "apple", "house", "green", "happy", "little", "garden",
         "window", "yellow", "button", "planet", "rocket", "castle", "dragon", "pencil", "summer", "winter",
         "orange", "purple", "silver", "bright", "gentle", "forest", "island", "morning"]
NAMES = ["Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Lena", "Max", "Nora", "Omar",
         "Pia", "Sam", "Tom", "Zoe"]
ADJECTIVES = ["big", "small", "quick", "slow", "quiet", "loud", "brave", "shy", "happy", "sleepy", "clever", "gentle",
              "bright", "strong", "old", "young"]
VERBS = ["runs", "sleeps", "sings", "jumps", "walks", "plays", "hides", "eats", "swims", "looks around", "waits",
         "rests"]
ADVERBS = ["slowly", "quickly", "quietly", "happily", "all day", "at night", "in the morning", "near the river",
           "under a tree", "with a friend"]
PHRASES = ["hello world", "the cat sat", "good morning", "one more time", "blue sky", "keep going", "red apple",
           "the end", "yes we can", "step by step"]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0 to 9999 in British English words: 342 -> "three hundred and forty-two"."""
    if not 0 <= n <= 9999:
        raise ValueError(f"number_words covers 0 to 9999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    head = ONES[n // 1000] + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


# -- examples and families -------------------------------------------------------------------------

@dataclass
class Example:
    """One instruction with its reference answer; `params` is what the checker needs."""

    family: str
    instruction: str
    answer: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[random.Random], Example]
    check: Callable[[Example, str], bool]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _exact(example: Example, answer: str) -> bool:
    return _norm(answer) == _norm(example.answer)


FAMILIES: dict[str, Family] = {}


def _family(check: Callable[[Example, str], bool] = _exact) -> Callable:
    def register(make: Callable[[random.Random], Example]) -> Callable[[random.Random], Example]:
        name = make.__name__.removeprefix("_")
        FAMILIES[name] = Family(name, make, check)
        return make
    return register


def _ex(make: Callable, instruction: str, answer: str, **params: Any) -> Example:
    return Example(make.__name__.removeprefix("_"), instruction, answer, params)


@_family()
def _count_up(r: random.Random) -> Example:
    a = r.randint(0, 60)
    b = a + r.randint(1, r.choice([10, 30, 120]))
    return _ex(_count_up, f"Count from {a} to {b}.", ", ".join(map(str, range(a, b + 1))) + ".")


@_family()
def _count_down(r: random.Random) -> Example:
    b = r.randint(5, 150)
    a = max(0, b - r.randint(3, r.choice([10, 40, 100])))
    return _ex(_count_down, f"Count down from {b} to {a}.", ", ".join(map(str, range(b, a - 1, -1))) + ".")


@_family()
def _count_by(r: random.Random) -> Example:
    step = r.choice([2, 3, 5, 10])
    n = r.randint(3, 40)
    return _ex(_count_by, f"Count in steps of {step} from {step}, {n} numbers in all.",
               ", ".join(str(step * i) for i in range(1, n + 1)) + ".")


@_family()
def _repeat_phrase(r: random.Random) -> Example:
    phrase, n = r.choice(PHRASES), r.randint(1, r.choice([5, 20, 60]))
    return _ex(_repeat_phrase, f'Repeat the phrase "{phrase}" {n} times.', "\n".join([phrase] * n))


@_family()
def _spell_word(r: random.Random) -> Example:
    w = r.choice(WORDS)
    return _ex(_spell_word, f'Spell the word "{w}".', "-".join(w.upper()))


@_family()
def _count_letters(r: random.Random) -> Example:
    w = r.choice(WORDS)
    return _ex(_count_letters, f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.')


def _sum_working(a: int, b: int) -> str:
    """Column addition, one line per digit, then the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    places = ["ones", "tens", "hundreds", "thousands", "ten thousands"]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        extra = f" + {carry}" if carry else ""
        lines.append(f"{places[i]}: {x} + {y}{extra} = {s}, write {s % 10}" + (", carry 1." if s >= 10 else "."))
        carry = s // 10
    if carry:
        lines.append("the last carry 1 goes in front.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines)


@_family()
def _add_with_working(r: random.Random) -> Example:
    a, b = r.randint(10, 9999), r.randint(10, 9999)
    return _ex(_add_with_working, f"Add {a} and {b}. Show your working.", _sum_working(a, b))


@_family()
def _multiply(r: random.Random) -> Example:
    a, b = r.randint(2, 12), r.randint(2, 12)
    return _ex(_multiply, f"What is {a} times {b}?", f"{a} times {b} is {a * b}.")


@_family()
def _times_table(r: random.Random) -> Example:
    k, m = r.randint(2, 12), r.randint(3, 12)
    return _ex(_times_table, f"Write the {k} times table up to {k} x {m}.",
               "\n".join(f"{k} x {i} = {k * i}" for i in range(1, m + 1)))


def _num_list(r: random.Random, n: int, hi: int = 99) -> list[int]:
    return [r.randint(0, hi) for _ in range(n)]


def _sort_example(xs: list[int]) -> Example:
    return _ex(_sort_numbers, f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}.",
               ", ".join(map(str, sorted(xs))) + ".")


@_family()
def _sort_numbers(r: random.Random) -> Example:
    return _sort_example(_num_list(r, r.randint(2, 10)))


def sort_numbers_with_repeats(r: random.Random) -> Example:
    """A `sort_numbers` example whose list holds at least one number twice or more: the family's
    own draws repeat a number in about a quarter of their nine-number lists, and the built-in
    model (run 34) sorted 1 of 21 such lists right against 58% of those without a repeat
    (`benchmarks/tiny_accuracy.py`). Not a family of its own, so that `generate`'s draws stay as
    they were."""
    n = r.randint(3, 10)
    xs = _num_list(r, n)
    for _ in range(r.randint(1, max(1, n // 3))):  # copy a drawn number over another position
        i, j = r.sample(range(n), 2)
        xs[j] = xs[i]
    return _sort_example(xs)


@_family()
def _reverse_list(r: random.Random) -> Example:
    ws = [r.choice(WORDS) for _ in range(r.randint(2, 10))]
    return _ex(_reverse_list, f"Reverse this list: {', '.join(ws)}.", ", ".join(reversed(ws)) + ".")


@_family()
def _deduplicate(r: random.Random) -> Example:
    pool = r.sample(WORDS, r.randint(2, 6))
    ws = [r.choice(pool) for _ in range(r.randint(3, 10))]
    seen = list(dict.fromkeys(ws))
    return _ex(_deduplicate, f"Remove the repeated words from this list, keeping the first of each: {', '.join(ws)}.",
               ", ".join(seen) + ".")


@_family()
def _largest(r: random.Random) -> Example:
    xs = _num_list(r, r.randint(2, 8), 999)
    return _ex(_largest, f"What is the largest number in this list: {', '.join(map(str, xs))}?",
               f"The largest number is {max(xs)}.")


@_family()
def _number_in_words(r: random.Random) -> Example:
    n = r.choice([r.randint(0, 20), r.randint(21, 999), r.randint(1000, 9999)])
    return _ex(_number_in_words, f"Write the number {n} in words.", number_words(n).capitalize() + ".")


@_family()
def _numbers_in_words(r: random.Random) -> Example:
    a = r.randint(1, 200)
    b = a + r.randint(1, r.choice([5, 15, 40]))
    return _ex(_numbers_in_words, f"Write the numbers from {a} to {b} in words.",
               "\n".join(number_words(i) for i in range(a, b + 1)))


@_family()
def _is_even(r: random.Random) -> Example:
    n = r.randint(0, 999)
    return _ex(_is_even, f"Is {n} an even number? Answer yes or no.", "Yes." if n % 2 == 0 else "No.")


@_family()
def _is_greater(r: random.Random) -> Example:
    a, b = r.randint(0, 999), r.randint(0, 999)
    return _ex(_is_greater, f"Is {a} greater than {b}? Answer yes or no.", "Yes." if a > b else "No.")


@_family()
def _alphabet_range(r: random.Random) -> Example:
    i = r.randint(0, 20)
    j = r.randint(i + 1, 25)
    letters = [chr(ord("A") + k) for k in range(i, j + 1)]
    return _ex(_alphabet_range, f"Write the letters of the alphabet from {letters[0]} to {letters[-1]}.",
               " ".join(letters))


@_family()
def _even_numbers(r: random.Random) -> Example:
    a = r.randint(0, 100)
    b = a + r.randint(4, r.choice([20, 60, 150]))
    evens = [i for i in range(a, b + 1) if i % 2 == 0]
    return _ex(_even_numbers, f"List the even numbers from {a} to {b}.", ", ".join(map(str, evens)) + ".")


def _fizz(i: int) -> str:
    return "FizzBuzz" if i % 15 == 0 else "Fizz" if i % 3 == 0 else "Buzz" if i % 5 == 0 else str(i)


@_family()
def _fizzbuzz(r: random.Random) -> Example:
    n = r.randint(3, r.choice([20, 100]))
    return _ex(_fizzbuzz, f"Play FizzBuzz from 1 to {n}.", "\n".join(_fizz(i) for i in range(1, n + 1)))


@_family()
def _uppercase(r: random.Random) -> Example:
    ws = [r.choice(WORDS) for _ in range(r.randint(1, 6))]
    text = " ".join(ws)
    return _ex(_uppercase, f'Write "{text}" in capital letters.', text.upper())


@_family()
def _first_letters(r: random.Random) -> Example:
    ws = [r.choice(WORDS) for _ in range(r.randint(2, 8))]
    return _ex(_first_letters, f"Write the first letter of each word: {' '.join(ws)}.",
               " ".join(w[0] for w in ws))


def _check_list_kind(example: Example, answer: str) -> bool:
    """Numbered lines "1. item", exactly n of them, all distinct members of the kind."""
    lines = [_norm(ln) for ln in answer.splitlines() if ln.strip()]
    n, kind = example.params["n"], example.params["kind"]
    if len(lines) != n:
        return False
    items = []
    for i, ln in enumerate(lines, 1):
        m = re.fullmatch(rf"{i}\. ([a-z ]+)", ln)
        if m is None:
            return False
        items.append(m.group(1))
    return len(set(items)) == n and all(it in KINDS[kind] for it in items)


@_family(_check_list_kind)
def _list_things(r: random.Random) -> Example:
    kind = r.choice(sorted(KINDS))
    n = r.randint(1, min(12, len(KINDS[kind])))
    # A random n of the kind, in the kind's own order: any n distinct members are correct, and
    # keeping that order gives a model that has not learned "not one I already said" a way to
    # list without repeats (always name a member further along the list).
    chosen = set(r.sample(KINDS[kind], n))
    items = [x for x in KINDS[kind] if x in chosen]
    return _ex(_list_things, f"List {n} {kind}.", "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1)),
               n=n, kind=kind)


def _describe_sentence(r: random.Random, thing: str, first: bool) -> str:
    if first or r.random() < 0.4:
        return f"The {thing} is {r.choice(ADJECTIVES)}."
    return f"It {r.choice(VERBS)} {r.choice(ADVERBS)}."


def _check_description(example: Example, answer: str) -> bool:
    """k sentences of the grammar, the first naming the subject; every word from the grammar."""
    thing, k = example.params["thing"], example.params["k"]
    sentences = re.findall(r"[^.]+\.", _norm(answer))
    if len(sentences) != k or "".join(sentences).replace(" ", "") != _norm(answer).replace(" ", ""):
        return False
    for i, s in enumerate(s.strip() for s in sentences):
        m = re.fullmatch(r"The (\w+) is (\w+)\.", s)
        if m:
            if m.group(1) != thing or m.group(2) not in ADJECTIVES:
                return False
            continue
        if i == 0:
            return False
        if not any(s == f"It {v} {a}." for v in VERBS for a in ADVERBS):
            return False
    return True


@_family(_check_description)
def _describe(r: random.Random) -> Example:
    thing = r.choice(KINDS["animals"])
    k = r.choice([1, 1, 2, 3, 5, 8, 12, 20])
    text = " ".join(_describe_sentence(r, thing, i == 0) for i in range(k))
    what = "in one sentence" if k == 1 else f"in {k} sentences"
    return _ex(_describe, f"Describe a {thing} {what}.", text, thing=thing, k=k)


def _check_story(example: Example, answer: str) -> bool:
    """k lines "Then NAME VERB ADVERB." after the opening "Once there was NAME.", ending "The end."."""
    name, k = example.params["name"], example.params["k"]
    lines = [_norm(ln) for ln in answer.splitlines() if ln.strip()]
    if len(lines) != k + 2 or lines[0] != f"Once there was {name}." or lines[-1] != "The end.":
        return False
    return all(any(ln == f"Then {name} {v} {a}." for v in VERBS for a in ADVERBS) for ln in lines[1:-1])


@_family(_check_story)
def _story(r: random.Random) -> Example:
    name = r.choice(NAMES)
    k = r.randint(1, r.choice([3, 10, 30]))
    body = [f"Then {name} {r.choice(VERBS)} {r.choice(ADVERBS)}." for _ in range(k)]
    return _ex(_story, f"Tell a story about {name} in {k} steps.",
               "\n".join([f"Once there was {name}.", *body, "The end."]), name=name, k=k)


# Ten instructions, one per family, short answers to long ones, that the built-in model's acceptance
# test asks (tests/test_builtin_model.py): drawn from seed 777, a seed training never uses, and
# pinned, so that retuning the generator cannot change them. "Held out" means a seed apart: the
# families with small instruction spaces (30 words to spell, 1,000 numbers to call even or odd)
# do draw 8 of the 10 somewhere in the 300,000 training examples; only the sort and reverse
# instructions are new to the model (`benchmarks/tiny_acceptance.py --training-overlap`).
FIXED_HELD_OUT = [
    Example("count_up", "Count from 28 to 40.", "28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40."),
    Example("repeat_phrase", 'Repeat the phrase "the end" 12 times.', "\n".join(["the end"] * 12)),
    Example("spell_word", 'Spell the word "button".', "B-U-T-T-O-N"),
    Example("times_table", "Write the 9 times table up to 9 x 10.",
            "9 x 1 = 9\n9 x 2 = 18\n9 x 3 = 27\n9 x 4 = 36\n9 x 5 = 45\n9 x 6 = 54\n9 x 7 = 63\n9 x 8 = 72\n"
            "9 x 9 = 81\n9 x 10 = 90"),
    Example("sort_numbers", "Sort these numbers from smallest to largest: 57, 47, 73, 34, 43, 68, 96, 5, 57.",
            "5, 34, 43, 47, 57, 57, 68, 73, 96."),
    Example("reverse_list",
            "Reverse this list: button, garden, dragon, green, gentle, little, castle, silver, dog.",
            "dog, silver, castle, little, gentle, green, dragon, garden, button."),
    Example("is_even", "Is 456 an even number? Answer yes or no.", "Yes."),
    Example("number_in_words", "Write the number 7039 in words.", "Seven thousand and thirty-nine."),
    # structural checkers: any 8 distinct fruits, any 6 steps of the grammar about Pia
    Example("list_things", "List 8 fruits.", "", {"n": 8, "kind": "fruits"}),
    Example("story", "Tell a story about Pia in 6 steps.", "", {"name": "Pia", "k": 6}),
]


# -- the dataset -----------------------------------------------------------------------------------

def check(example: Example, answer: str) -> bool:
    """Whether `answer` is a correct answer to `example`'s instruction."""
    return FAMILIES[example.family].check(example, answer)


def generate(n: int, seed: int, families: list[str] | None = None,
             weights: dict[str, float] | None = None) -> list[Example]:
    """`n` examples; the same `seed` gives the same examples. Families are drawn uniformly, or in
    proportion to `weights` (family -> relative weight, 1 for a family it does not name)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = sorted(FAMILIES) if families is None else list(families)
    unknown = [f for f in [*names, *(weights or {})] if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; known: {sorted(FAMILIES)}")
    r = random.Random(seed)
    if not weights:  # the uniform draw, kept as it was so that seeds give the data they always gave
        return [FAMILIES[r.choice(names)].make(r) for _ in range(n)]
    bad = {f: w for f, w in weights.items() if not w >= 0}
    if bad:
        raise ValueError(f"weights must be >= 0, got {bad}")
    w = [weights.get(f, 1.0) for f in names]
    if sum(w) <= 0:
        raise ValueError("weights leave no family to draw")
    return [FAMILIES[r.choices(names, w)[0]].make(r) for _ in range(n)]


def parse_weights(spec: str) -> dict[str, float]:
    """`"count_down:3,story:2"` as `{"count_down": 3.0, "story": 2.0}` (`generate`'s `weights`);
    the empty string is no weights."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition(":")
        try:
            out[name.strip()] = float(value)  # no ":" leaves value "", which float refuses too
        except ValueError:
            raise ValueError(f"family_weights takes FAMILY:WEIGHT items separated by commas, got {item!r}") from None
    unknown = [f for f in out if f not in FAMILIES]
    if unknown:
        raise ValueError(f"family_weights names unknown task families {unknown}; known: {sorted(FAMILIES)}")
    return out

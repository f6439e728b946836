"""The tiny model's synthetic instruction tasks: deterministic, checkable, lengths that follow the
instruction."""

from __future__ import annotations

import re

import pytest

from lengthwise.tiny import tasks


def _tokens(text: str) -> int:  # words and punctuation: a stand-in for BPE tokens
    return len(re.findall(r"\w+|[^\w\s]", text))


def test_at_least_twenty_families_and_deterministic_for_a_seed():
    assert len(tasks.FAMILIES) >= 20
    a = tasks.generate(500, seed=0)
    assert a == tasks.generate(500, seed=0)
    assert a != tasks.generate(500, seed=1)
    assert {e.family for e in a} == set(tasks.FAMILIES)


@pytest.mark.parametrize("family", sorted(tasks.FAMILIES))
def test_checkers_accept_the_reference_and_reject_wrong_answers(family):
    examples = tasks.generate(60, seed=3, families=[family])
    for e in examples:
        assert tasks.check(e, e.answer), e
        assert tasks.check(e, "  " + e.answer.replace(" ", "  ") + "\n")  # whitespace is not an error
        assert not tasks.check(e, e.answer + " and more"), e
        assert not tasks.check(e, e.answer[:-1]), e
        assert not tasks.check(e, ""), e


def test_the_fixed_held_out_instructions_are_well_formed():
    assert len({e.family for e in tasks.FIXED_HELD_OUT}) == 10
    for e in tasks.FIXED_HELD_OUT:
        assert e.family in tasks.FAMILIES
        if e.answer:  # the two structural families carry their parameters instead
            assert tasks.check(e, e.answer), e
    story = tasks.FIXED_HELD_OUT[-1]
    assert tasks.check(story, "Once there was Pia.\n" + "Then Pia sings slowly.\n" * 6 + "The end.")
    assert not tasks.check(story, "Once there was Pia.\n" + "Then Pia sings slowly.\n" * 5 + "The end.")


def test_structural_checkers_accept_other_correct_answers():
    e = tasks.Example("list_things", "List 3 colours.", "1. red\n2. blue\n3. green", {"n": 3, "kind": "colours"})
    assert tasks.check(e, "1. gold\n2. pink\n3. red")
    assert not tasks.check(e, "1. gold\n2. gold\n3. red")  # not distinct
    assert not tasks.check(e, "1. gold\n2. cat\n3. red")   # not a colour
    d = tasks.Example("describe", "Describe a fox in 2 sentences.", "", {"thing": "fox", "k": 2})
    assert tasks.check(d, "The fox is quick. It sleeps under a tree.")
    assert not tasks.check(d, "The cat is quick. It sleeps under a tree.")  # the wrong animal
    assert not tasks.check(d, "The fox is quick.")                          # one sentence short


def test_lengths_run_from_one_word_to_hundreds_and_follow_the_instruction():
    examples = tasks.generate(3000, seed=0)
    lengths = [_tokens(e.answer) for e in examples]
    assert min(lengths) <= 2 and max(lengths) >= 200
    counts = [e for e in examples if e.family == "count_up"]
    for e in counts:  # the instruction says how long: b - a + 1 numbers
        a, b = map(int, re.findall(r"\d+", e.instruction))
        assert len(e.answer.split(",")) == b - a + 1


@pytest.mark.parametrize("n, words", [(0, "zero"), (15, "fifteen"), (42, "forty-two"), (100, "one hundred"),
                                      (342, "three hundred and forty-two"), (1005, "one thousand and five"),
                                      (2300, "two thousand three hundred")])
def test_number_words(n, words):
    assert tasks.number_words(n) == words


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown task families"):
        tasks.generate(3, seed=0, families=["juggling"])
    with pytest.raises(ValueError, match="n must be"):
        tasks.generate(-1, seed=0)


def test_family_weights_shift_the_mix_deterministically():
    from collections import Counter

    uniform = Counter(e.family for e in tasks.generate(6000, seed=4))
    weighted = tasks.generate(6000, seed=4, weights={"count_down": 5.0, "is_even": 0.0})
    assert weighted == tasks.generate(6000, seed=4, weights={"count_down": 5.0, "is_even": 0.0})
    mix = Counter(e.family for e in weighted)
    assert mix["is_even"] == 0 and uniform["is_even"] > 0
    # 5 of 5 + 24 weight units against 1 of 26: about four times the uniform share
    assert mix["count_down"] > 3 * uniform["count_down"]
    assert tasks.generate(50, seed=4, weights={}) == tasks.generate(50, seed=4)  # no weights: the old draw
    assert tasks.parse_weights(" count_down:3, story:2.5 ") == {"count_down": 3.0, "story": 2.5}
    assert tasks.parse_weights("") == {}


def test_sorts_with_repeats_always_repeat_a_number_and_are_sort_numbers_examples():
    import random

    r = random.Random(5)
    examples = [tasks.sort_numbers_with_repeats(r) for _ in range(300)]
    sizes = set()
    for e in examples:
        xs = [int(x) for x in e.instruction.split(": ")[1].rstrip(".").split(", ")]
        assert e.family == "sort_numbers" and len(set(xs)) < len(xs)
        assert e.answer == ", ".join(map(str, sorted(xs))) + "." and tasks.check(e, e.answer)
        assert not tasks.check(e, ", ".join(map(str, sorted(set(xs)))) + ".")  # a repeat dropped is wrong
        sizes.add(len(xs))
    assert sizes == set(range(3, 11))
    r2 = random.Random(5)
    assert [tasks.sort_numbers_with_repeats(r2) for _ in range(300)] == examples


@pytest.mark.parametrize("spec, match", [("count_down=3", "FAMILY:WEIGHT"), ("count_down:many", "FAMILY:WEIGHT"),
                                         ("juggling:2", "unknown task families")])
def test_bad_family_weights_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        tasks.parse_weights(spec)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        tasks.generate(3, seed=0, weights={"story": -1.0})
    with pytest.raises(ValueError, match="unknown task families"):
        tasks.generate(3, seed=0, weights={"juggling": 1.0})

"""SELF-GUIDE's filters, self-consistency vote and label balancing on hand-built cases."""
import math

import pytest

from tunesmith.synth.filters import (NOISE, check_input, check_output, duplicate, empty, first_failure, length,
                                     length_bounds, noise)
from tunesmith.synth.vote import balance, map_label, normalise, vote


# ---- filters


def test_empty():
    assert not empty("").passed and not empty("  \n\t").passed
    assert empty(" x ").passed
    assert empty("").filter == "empty" and empty("").reason


def test_length_bounds_are_mean_plus_minus_two_population_sigmas():
    gold = ["a" * 10, "a" * 20, "a" * 30]  # mean 20, population σ = sqrt(200/3)
    low, high = length_bounds(gold)
    sd = math.sqrt(200 / 3)
    assert low == pytest.approx(20 - 2 * sd) and high == pytest.approx(20 + 2 * sd)  # ≈ 3.67, 36.33
    assert length_bounds(gold, sigmas=1.0) == pytest.approx((20 - sd, 20 + sd))


def test_length_inside_and_outside_bounds():
    bounds = length_bounds(["a" * 10, "a" * 20, "a" * 30])
    assert length("b" * 36, bounds).passed and length("b" * 4, bounds).passed
    assert not length("b" * 37, bounds).passed
    assert not length("b" * 3, bounds).passed
    assert "37 characters" in length("b" * 37, bounds).reason
    assert length("  " + "b" * 36 + "\n", bounds).passed  # surrounding whitespace does not count


def test_length_of_equal_gold_lengths_allows_only_that_length():
    bounds = length_bounds(["abc", "xyz"])
    assert length("123", bounds).passed and not length("1234", bounds).passed


@pytest.mark.parametrize("text", ["Input: a new order", "the OUTPUT is", "one\n\ntwo", "fill __ in", "[x] marker"])
def test_noise_drops_template_tokens(text):
    v = noise(text, NOISE + ("[x]",))
    assert not v.passed and "template token" in v.reason


def test_noise_passes_clean_text():
    assert noise("Anna ordered 3 desk lamps.\nDeliver on Monday.").passed  # one newline is fine
    assert noise("tea kettle", ("",)).passed  # an empty marker matches nothing


def test_duplicate_of_gold_or_earlier():
    seen = {"Ship 3 lamps to Oslo.", "hello"}
    assert not duplicate("Ship 3 lamps to Oslo.", seen).passed
    assert not duplicate("  hello\n", seen).passed  # stripped before comparing
    assert duplicate("Ship 4 lamps to Oslo.", seen).passed
    assert duplicate("Hello", seen).passed  # exact: case matters


def test_check_input_order_and_first_failure():
    bounds = (5, 30)
    vs = check_input("an input here", bounds=bounds, tokens=NOISE, seen=set())
    assert [v.filter for v in vs] == ["empty", "length", "noise", "duplicate"]
    assert first_failure(vs) == "noise"
    vs = check_input("x" * 40, bounds=bounds, tokens=NOISE, seen={"x" * 40})
    assert [v.passed for v in vs] == [True, False, True, False] and first_failure(vs) == "length"
    vs = check_input("a fine one", bounds=None, tokens=NOISE, seen=set())
    assert [v.filter for v in vs] == ["empty", "noise", "duplicate"] and first_failure(vs) is None


def test_check_output_length_only_for_generation():
    assert [v.filter for v in check_output("yes", bounds=None, tokens=NOISE)] == ["empty", "noise"]
    vs = check_output("far too long an answer", bounds=(1, 5), tokens=NOISE)
    assert first_failure(vs) == "length"


# ---- vote


def test_vote_majority_kept():
    c = [("a", "a")] * 3 + [("b", "b")] * 2 + [("c", "c")] * 5
    v = vote(c, threshold=0.2)
    assert v.passed and v.answer == "c" and v.count == 5 and v.counted == 10 and v.share == 0.5


def test_vote_exactly_at_threshold_is_kept_below_is_dropped():
    at = [("a", "a"), ("a", "a")] + [(str(i), str(i)) for i in range(8)]  # top share 2/10 = 20%
    assert vote(at, threshold=0.2).passed
    below = [("a", "a"), ("a", "a")] + [(f"x{i}", f"x{i}") for i in range(9)]  # 2/11 < 20%
    v = vote(below, threshold=0.2)
    assert not v.passed and v.answer is None and "below 20%" in v.reason


def test_vote_ties_go_to_the_shortest():
    c = [("a long answer", "a long answer"), ("short", "short"), ("a long answer", "a long answer"), ("short", "short")]
    assert vote(c).answer == "short"
    # equal lengths: the first seen
    assert vote([("bb", "bb"), ("aa", "aa")]).answer == "bb"


def test_vote_groups_by_key_and_returns_the_shortest_text_of_the_group():
    texts = ["{ \"a\": 1 }", "{ \"a\":   1 }\n", "{\"a\": 2}"]
    c = [(normalise(t), t) for t in texts]
    v = vote(c)
    assert v.passed and v.count == 2 and v.answer == "{ \"a\": 1 }"


def test_vote_nothing_to_count():
    v = vote([])
    assert not v.passed and v.counted == 0 and "no sample" in v.reason


def test_normalise():
    assert normalise("  a\n b\t\tc ") == "a b c"


@pytest.mark.parametrize("text,label", [
    ("positive", "positive"), (" Positive.", "positive"), ('"negative"', "negative"),
    ("The sentiment is negative, not positive.", "negative"), ("I think it is POSITIVE overall", "positive"),
    ("positively", None), ("no idea", None), ("not spam", "not spam"), ("this is spam", "spam"),
])
def test_map_label(text, label):
    assert map_label(text, ["positive", "negative", "spam", "not spam"]) == label


# ---- balance


def test_balance_down_samples_to_the_smallest_class():
    items = [("x1", "a"), ("x2", "b"), ("x3", "a"), ("x4", "a"), ("x5", "b"), ("x6", "c")]
    kept, dropped = balance(items, lambda it: it[1], seed=0)
    labels = [lab for _, lab in kept]
    assert sorted(labels) == ["a", "b", "c"]
    assert len(kept) + len(dropped) == len(items) and not set(kept) & set(dropped)
    assert kept == [it for it in items if it in kept]  # input order kept
    kept2, _ = balance(items, lambda it: it[1], seed=0)
    assert kept2 == kept  # seeded


def test_balance_two_even_classes_keeps_everything():
    items = [("a", 1), ("b", 2), ("c", 1), ("d", 2)]
    kept, dropped = balance(items, lambda it: str(it[1]))
    assert kept == items and dropped == []
    assert balance([], lambda it: it) == ([], [])

"""benchmarks/mqar_errors.py sorts MQAR answers exactly: the oracle is always right, another pair's value is found
with its offset, a number in no pair and a non-number are told apart."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from nha_convert.corpora.synthetic import mqar_items
from nha_convert.corpora import synthetic
from tests.helpers.scripts import load_benchmark

errors_mod = load_benchmark("mqar_errors")


@pytest.fixture(scope="module")
def items(smollm2_path):
    return mqar_items(AutoTokenizer.from_pretrained(smollm2_path), 512, 3, n_pairs=4, n_queries=2)


def test_oracle_answers_are_all_right(items):
    e = errors_mod.classify(items, synthetic.oracle_predictions(items))
    assert e.fractions()["right"] == 1.0 and not e.offsets
    right, other = e.digit_accuracy()
    assert right == 1.0 and 0.0 <= other < 1.0


def test_digit_match_counts_places():
    assert errors_mod.digit_match("295", "290") == 2 / 3
    assert errors_mod.digit_match("295", "95") == 0.0  # shifted digits are not at their places
    assert errors_mod.digit_match("295", "") == 0.0


def test_each_kind_of_miss_is_named(items):
    item = items[0]
    pairs = synthetic.MQAR_RE.findall(item.context)
    keys, values = [k for k, _ in pairs], [v for _, v in pairs]
    asked = keys.index(synthetic._query_key(item.queries[0]))
    other = (asked + 1) % len(values)
    absent = next(str(n) for n in range(100, 1000) if str(n) not in values)
    e = errors_mod.classify(items, [[values[other], " " + absent]] + synthetic.oracle_predictions(items[1:]))
    assert e.kinds["another value"] == 1 and e.offsets == {other - asked: 1}
    assert e.kinds["number not in item"] == 1 and e.kinds["right"] == 4

    e = errors_mod.classify(items, [["ten", "?"]] + synthetic.oracle_predictions(items[1:]))
    assert e.kinds["not a number"] == 2

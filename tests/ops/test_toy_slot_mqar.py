"""benchmarks/toy_slot_mqar.py's data: every row states the queried key once, followed by the value it must predict,
and every pair lies more than the window back from the query (so only a memory can answer)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.scripts import load_benchmark


@pytest.fixture(scope="module")
def toy():
    return load_benchmark("toy_slot_mqar")


@pytest.mark.parametrize("pairs", [1, 4, 8])
def test_rows_state_the_queried_pair_beyond_the_window(toy, pairs):
    length = 48
    x, y = toy.batch(64, pairs, length, torch.Generator().manual_seed(pairs))
    assert x.shape == (64, length) and y.shape == (64,)
    for row, want in zip(x.tolist(), y.tolist()):
        key = row[-1]
        assert 0 <= key < toy.KEYS and toy.KEYS <= want < toy.KEYS + toy.VALUES
        at = [i for i, t in enumerate(row[:-1]) if t == key]
        assert len(at) == 1 and row[at[0] + 1] == want  # stated once, value right after
        assert length - 1 - (at[0] + 1) > toy.WINDOW  # beyond the window at the query
        keys = [t for t in row[:-1] if t < toy.KEYS]
        assert len(keys) == pairs == len(set(keys))  # distinct keys, no filler token is a key

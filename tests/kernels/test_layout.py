"""prep.make_layout: the per-position sequence bounds the backward reads agree with the host list of sequences."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from nha_kernels.prep import make_layout  # noqa: E402


@pytest.mark.parametrize("packed", [False, True])
def test_layout_bounds_per_position_match_the_sequences(packed):
    if packed:
        cu, batch, t_len = torch.tensor([0, 5, 6, 19, 32], dtype=torch.int32), 1, 32
    else:
        cu, batch, t_len = None, 3, 20
    lay = make_layout(None, cu, batch, t_len, num_sinks=2, span=8, device=torch.device("cpu"))
    assert lay.seq_rows.tolist() == [r for r, _, _ in lay.seq_bounds]
    for _, a, e in lay.seq_bounds:
        assert (lay.seq_start_at[a:e] == a).all() and (lay.seq_end_at[a:e] == e).all()
    assert lay.seq_start_at.shape == lay.seq_end_at.shape == (t_len,)


def test_layout_is_shared_for_the_same_boundaries_and_rebuilt_for_new_ones():
    cu = torch.tensor([0, 4, 16], dtype=torch.int32)
    a = make_layout(None, cu, 1, 16, 0, 8, torch.device("cpu"))
    assert make_layout(None, cu, 1, 16, 0, 8, torch.device("cpu")) is a
    other = torch.tensor([0, 4, 16], dtype=torch.int32)
    assert make_layout(None, other, 1, 16, 0, 8, torch.device("cpu")) is not a

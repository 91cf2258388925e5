"""The slots are a trainable memory: gradient descent through the NHA op learns to recall a token that left the window.

A one-layer toy: a key token (one of 16) sits somewhere in the first half of 16 filler tokens, a query token comes
last and must predict the key. The window (w = 4) never holds the key at the query, so only the slots can carry it:
with m = 4 slots the model learns the task; with m = 0 (the same layer as sliding-window attention) it stays at
chance. This separates "the slot path cannot learn" from "a conversion did not train long enough" when a converted
model shows no recall (docs/results.md, issue 11): the op, its gates and its gradients do learn retrieval.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nha_convert.ops import nha_chunk
from nha_convert.ops.common import gate_log_alpha

KEYS, FILLERS = 16, 32
QUERY = KEYS + FILLERS  # the last token id
WINDOW, FILL = 4, 16


def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, FILL + 1) tokens and the key each row must recall at its last (query) position."""
    key = torch.randint(0, KEYS, (n,), generator=g)
    x = torch.randint(KEYS, KEYS + FILLERS, (n, FILL), generator=g)
    x[torch.arange(n), torch.randint(0, FILL // 2, (n,), generator=g)] = key  # >= FILL / 2 + 1 > WINDOW tokens back
    return torch.cat([x, torch.full((n, 1), QUERY)], 1), key


class OneLayer(nn.Module):
    """Embedding -> one NHA head (no RoPE: q_rot = q) -> residual -> vocabulary."""

    def __init__(self, slots: int, d: int = 16):
        super().__init__()
        self.slots = slots
        self.emb = nn.Embedding(QUERY + 1, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate = nn.Linear(d, max(slots, 1))
        self.head = nn.Linear(d, QUERY + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, d = h.shape
        q, k, v = (f(h).view(b, t, 1, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        la = gate_log_alpha(self.gate(h).view(b, 1, t, -1)[..., : self.slots], 8.0)  # tau = 8, the default
        o, _ = nha_chunk(q, q, k, k, v, la, window=WINDOW, scale=d**-0.5, chunk_size=16)
        return self.head(h + self.o(o.transpose(1, 2).reshape(b, t, d)))


def recall_after_training(slots: int, seed: int, steps: int = 300) -> float:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = OneLayer(slots)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        x, y = batch(64, g)
        loss = F.cross_entropy(model(x)[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(512, torch.Generator().manual_seed(1000 + seed))  # fresh rows
    with torch.no_grad():
        return (model(x)[:, -1].argmax(-1) == y).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_slots_learn_to_recall_what_left_the_window(seed):
    # Measured (6 seeds, 300 steps): 1.00 with 4 slots every time; 0.05-0.07 without (chance is 1/16).
    assert recall_after_training(slots=4, seed=seed) >= 0.9
    assert recall_after_training(slots=0, seed=seed) <= 0.2

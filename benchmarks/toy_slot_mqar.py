"""How many optimizer steps do the slots need to learn associative recall, by number of pairs? A CPU toy (issue 11).

    python benchmarks/toy_slot_mqar.py --pairs 1,2,4,8 --slots 16 --seeds 0,1 --steps 2000

The all-NHA SmolLM2 learned passkeys (one salient item) but not MQAR (16 word-number pairs) in 8.25 minutes
(docs/results.md, session 10). This toy asks whether the slot path can learn associations at all, and how the steps
it needs grow with the pairs: n (key, value) token pairs lie among filler tokens, all more than the window back;
the last token repeats one key and the model must predict its value. Two layers (the first window attention moves
each key into its value's position, as an induction head does; the second layer's slots must keep key -> value), each
an NHA head with window 4 and m slots; `--slots 0` is sliding-window attention, which cannot answer (chance 1/16);
`--full` gives the second layer full attention, the reference for how fast the association itself is learned.
Prints the first step at which a fresh batch scores >= 90 % (evaluated every --every steps), and the final accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nha_convert.ops import nha_chunk  # noqa: E402
from nha_convert.ops.common import gate_log_alpha  # noqa: E402

KEYS, VALUES, FILLERS = 16, 16, 32
VOCAB = KEYS + VALUES + FILLERS
WINDOW = 4


def batch(n: int, pairs: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, length) tokens: `pairs` adjacent (key, value) pairs in the first half among filler, a queried key last;
    and the value each row must predict."""
    x = torch.randint(KEYS + VALUES, VOCAB, (n, length), generator=g)
    keys = torch.stack([torch.randperm(KEYS, generator=g)[:pairs] for _ in range(n)])
    values = torch.randint(KEYS, KEYS + VALUES, (n, pairs), generator=g)
    places = length // 2 // 2  # non-overlapping 2-token places in the first half
    for i in range(n):
        at = torch.randperm(places, generator=g)[:pairs] * 2
        x[i, at], x[i, at + 1] = keys[i], values[i]
    asked = torch.randint(0, pairs, (n,), generator=g)
    x[:, -1] = keys[torch.arange(n), asked]
    return x, values[torch.arange(n), asked]


class Block(nn.Module):
    def __init__(self, d: int, slots: int, window: int | None = WINDOW, tau: float = 8.0):
        super().__init__()
        self.slots, self.window, self.tau = slots, window, tau
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate = nn.Linear(d, max(slots, 1))
        # The same decay at the start for every tau: alpha_0 = sigmoid(0) ** (1 / 8), what tau 8 gets from a zero bias
        # (otherwise tau 1 would start with alpha 0.5: a memory of one token, and test the start, not the write)
        nn.init.constant_(self.gate.bias, torch.logit(torch.tensor(0.5 ** (tau / 8.0))).item())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, 1, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        la = gate_log_alpha(self.gate(x).view(b, 1, t, -1)[..., : self.slots], self.tau)
        o, _ = nha_chunk(q, q, k, k, v, la, window=self.window, scale=d**-0.5, chunk_size=16)
        return h + self.o(o.transpose(1, 2).reshape(b, t, d))


class Toy(nn.Module):
    def __init__(self, slots: int, d: int = 32, length: int = 48, full: bool = False, tau: float = 8.0):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(length, d)
        # The first layer only mixes within its window; `full`: the second layer attends to everything (the reference)
        self.blocks = nn.ModuleList([Block(d, 0), Block(d, slots, None if full else WINDOW, tau)])
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        for blk in self.blocks:
            h = blk(h)
        return self.head(h[:, -1])


def run(pairs: int, slots: int, seed: int, steps: int, lr: float, rows: int, length: int, every: int,
        full: bool = False, tau: float = 8.0) -> dict:
    torch.manual_seed(seed)
    g, ge = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000 + seed)
    xe, ye = batch(512, pairs, length, ge)
    model = Toy(slots, length=length, full=full, tau=tau)
    opt = torch.optim.Adam(model.parameters(), lr)
    first = None
    acc = 0.0
    for step in range(1, steps + 1):
        x, y = batch(rows, pairs, length, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                acc = (model(xe).argmax(-1) == ye).float().mean().item()
            if acc >= 0.9:
                first = step
                break
    return {"pairs": pairs, "slots": slots, "seed": seed, "tau": tau, "steps_to_90": first, "final_acc": round(acc, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="1,2,4,8")
    ap.add_argument("--slots", default="16", help="comma-separated slot counts (0 = sliding window)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--full", action="store_true", help="the second layer with full attention: the reference")
    ap.add_argument("--tau", default="8", help="comma-separated gate temperatures (NHA.md: log alpha = "
                    "logsigmoid / tau; the layer's default 8 makes soft writes, 1 lets one token overwrite a slot)")
    a = ap.parse_args()
    second = "full attention" if a.full else f"window {WINDOW} + slots"
    print(f"second layer: {second}; lr {a.lr}, {a.rows} rows a step")
    print("| pairs | slots | tau | seed | steps to 90 % | accuracy at the end | seconds |")
    print("|---|---|---|---|---|---|---|")
    for m in map(int, a.slots.split(",")):
        for tau in map(float, a.tau.split(",")):
            for p in map(int, a.pairs.split(",")):
                for s in map(int, a.seeds.split(",")):
                    t0 = time.time()
                    r = run(p, m, s, a.steps, a.lr, a.rows, a.length, a.every, a.full, tau)
                    print(f"| {p} | {m} | {tau:g} | {s} | {r['steps_to_90'] or f'> {a.steps}'} | {r['final_acc']} | "
                          f"{time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()

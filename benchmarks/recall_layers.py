"""Which layers must stay fully attentive for recall? Scores every layer three ways and measures the untrained
hybrid's recall for each choice (issue 11).

    python benchmarks/recall_layers.py --ks 2,4,6 --lengths 1024,2048,4096 --items 20 --json out/recall_layers.json

Scores (all on the embedded SmolLM2 unless --model says otherwise):
- `heads`: the base model's retrieval heads. On passkey and MQAR probes, the attention mass that each head puts,
  from the positions that predict an answer, on the tokens of that answer where the context states it; a layer
  scores its best head. One eager forward per probe item, no conversion.
- `gain`: session 4's auto:K score: the gap to the base closed when ONLY that layer is full.
- `ablation`: the gap opened when only that layer is converted (every other layer full): auto:K since session 5.
- `greedy`: layers added one at a time, each the one that lowers the answer loss of the hybrid most (K x L passes).
For each score and K: passkey / MQAR accuracy of the untrained hybrid, with 0 slots (sliding window + sinks) and
with the slots. The base and the all-windowed model frame the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nha_convert import convert  # noqa: E402
from nha_convert.eval import recall  # noqa: E402
from nha_convert.layer_selection import _measure, calibration_set  # noqa: E402
from nha_convert.settings import NHASettings  # noqa: E402


def head_scores(base, tok, length: int, items: int, device) -> list[float]:
    """Per layer: the largest mean attention mass of one head on the answer's earlier occurrence."""
    layers = base.model.layers
    n_layers, n_heads = len(layers), base.config.num_attention_heads
    score = torch.zeros(n_layers, n_heads)
    probe_items = [it for p in ("passkey", "mqar") for it in recall.make_items(p, tok, length, items, seed=7)]
    for it in probe_items:
        q_pos, k_pos = [], []
        first_answer = min(s for s, _ in it.answer_spans)
        for s, e in it.answer_spans:
            ans = set(it.ids[s:e])
            q_pos += list(range(s - 1, e - 1))
            k_pos += [p for p in range(first_answer) if it.ids[p] in ans]
        k_pos = sorted(set(k_pos))
        if not k_pos:
            continue
        out = base(input_ids=torch.tensor([it.ids], device=device), output_attentions=True, use_cache=False)
        for i, a in enumerate(out.attentions):
            score[i] += a[0][:, q_pos][:, :, k_pos].sum(-1).mean(-1).float().cpu()
        del out
    score /= len(probe_items)
    return score.max(-1).values.tolist()


def recall_of(model, tok, lengths, items) -> dict:
    with torch.no_grad():
        r = recall.run_recall(model, tok, lengths, n=items, batch_size=4)
    return {p: [round(100 * r[p][str(L)]) for L in lengths] for p in recall.PROBES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    ap.add_argument("--ks", default="2,4,6")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--calibration-len", type=int, default=2048)
    ap.add_argument("--calibration-seqs", type=int, default=8)
    ap.add_argument("--head-items", type=int, default=8, help="probe items per task for the head scores (1K tokens)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from nha_convert.hub import load_base_model, resolve_source

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ks = [int(x) for x in a.ks.split(",")]
    lengths = [int(x) for x in a.lengths.split(",")]
    t0 = time.time()
    res: dict = {"args": vars(a), "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}

    model, tok = load_base_model(a.model, dtype=dtype, device=device)
    base = AutoModelForCausalLM.from_pretrained(resolve_source(a.model), dtype=dtype, attn_implementation="eager")
    base = base.to(device).eval()
    with torch.no_grad():
        res["base_recall"] = recall_of(base, tok, lengths, a.items)
        scores = {"heads": head_scores(base, tok, 1024, a.head_items, device)}
    print("base", res["base_recall"], f"{time.time() - t0:.0f}s", flush=True)
    del base

    model = convert(model, NHASettings(window=a.window, slots=a.slots, sinks=a.sinks)).eval()
    attns = [layer.self_attn for layer in model.model.layers]
    n = len(attns)

    def set_full(full) -> None:
        for i, at in enumerate(attns):
            at.window = None if i in full else a.window

    def set_slots(on: bool) -> None:  # a -1e4 slot bias = sliding window + sinks (exp underflows to exactly 0)
        for at in attns:
            at.slot_bias = None if on else torch.full((model.config.num_attention_heads,), -1e4, device=device)

    cal = calibration_set(tok, seq_len=a.calibration_len, window=a.window, text_seqs=a.calibration_seqs,
                          retrieval_docs=a.calibration_seqs)
    with torch.no_grad():
        set_full(range(n))
        _, ce_base, teacher = _measure(model, cal, 8, None, device)
        set_full(())
        kl_nha, ce_nha, _ = _measure(model, cal, 8, teacher, device)

        def gap(full) -> tuple[float, float]:
            set_full(full)
            kl, ce, _ = _measure(model, cal, 8, teacher, device)
            return kl, ce

        gain, abl = [], []
        for i in range(n):
            kl, ce = gap({i})
            gain.append(0.5 * (kl_nha - kl) / kl_nha + 0.5 * (ce_nha - ce) / max(ce_nha - ce_base, 1e-6))
            kl, ce = gap(set(range(n)) - {i})
            abl.append(0.5 * kl / kl_nha + 0.5 * (ce - ce_base) / max(ce_nha - ce_base, 1e-6))
        scores["gain"], scores["ablation"] = gain, abl
        chosen: list[int] = []
        greedy_ce = []
        for _ in range(max(ks)):
            best = min((i for i in range(n) if i not in chosen), key=lambda i: gap(set(chosen) | {i})[1])
            chosen.append(best)
            greedy_ce.append(gap(set(chosen))[1])
        res["greedy_order"], res["greedy_answer_ce"] = chosen, greedy_ce
    res["scores"] = scores
    res["answer_ce"] = {"base": ce_base, "all_nha": ce_nha}
    print("scores done", f"{time.time() - t0:.0f}s", "greedy", chosen, flush=True)

    sets = {"none": []}
    for k in ks:
        for name, s in scores.items():
            sets[f"{name}:{k}"] = sorted(sorted(range(n), key=lambda i: -s[i])[:k])
        sets[f"greedy:{k}"] = sorted(chosen[:k])
    rows = []
    for name, full in sets.items():
        set_full(set(full))
        row = {"set": name, "layers": full}
        for slots_on in (False, True):
            set_slots(slots_on)
            row["nha" if slots_on else "swa"] = recall_of(model, tok, lengths, a.items)
        rows.append(row)
        print(row, f"{time.time() - t0:.0f}s", flush=True)
    res["rows"] = rows
    print("\n| full layers | set | SWA+sinks passkey | SWA MQAR | NHA passkey | NHA MQAR |\n|---|---|---|---|---|---|")
    print(f"| base | all | {res['base_recall']['passkey']} | {res['base_recall']['mqar']} | | |")
    for r in rows:
        swa = r.get("swa", {"passkey": "-", "mqar": "-"})
        print(f"| {r['set']} | {r['layers']} | {swa['passkey']} | {swa['mqar']} | {r['nha']['passkey']} | "
              f"{r['nha']['mqar']} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

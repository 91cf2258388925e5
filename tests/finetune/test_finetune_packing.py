"""Packed rows: several document pieces per row, kept apart by position ids alone.

A packed batch must give the loss and the gradients of the same pieces run one per row (fp32, 1e-5), for every
stage kind, with NHA layers, with full-attention layers inside an NHA model, and for a plain transformers model
(the teacher, and the base model as its own student); and rows must be almost free of padding.
"""

from __future__ import annotations

import json

import pytest
import torch

import nha_convert
from nha_convert import NHASettings
from nha_convert.finetune.data import Rows, make_rows, pack_pieces
from nha_convert.losses import next_token_targets
from nha_convert.finetune.recipe import StageSpec, parse_recipe
from nha_convert.finetune.objectives import teacher_pass
from nha_convert.finetune.trainer import StageLoss, Trainer
from nha_convert.ops import nha_chunk
from nha_convert.ops.packed import cu_seqlens_of, flatten_rows, nha_chunk_varlen, sequence_starts, unflatten_rows
from tests.helpers.finetune import byte_tokenizer, recipe_text, save_tiny_base, tiny_llama, write_corpus
from tests.helpers.scripts import load_benchmark

# --- rows --------------------------------------------------------------------------------------------


def test_pack_pieces_is_best_fit_decreasing():
    # longest first; each piece goes to the open row it fills most tightly (ties: the earlier row)
    assert pack_pieces([3, 7, 5, 2, 5, 1], 10) == [[1, 0], [2, 4], [3, 5]]
    assert pack_pieces([10, 10], 10) == [[0], [1]]


def test_packed_rows_hold_whole_pieces_with_restarting_positions():
    docs = [[d * 1000 + t for t in range(n)] for d, n in enumerate((5, 23, 5, 40, 3, 17))]
    rows = make_rows(docs, seq_len=10, pad_id=-1, min_chunk=4)
    pieces = []
    for ids, mask, pos in zip(rows.input_ids.tolist(), rows.attention_mask.tolist(), rows.position_ids.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (10 - n)  # real tokens first, padding only at the end of a row
        assert ids[n:] == [-1] * (10 - n)
        starts = [t for t in range(n) if pos[t] == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [n]):
            piece = ids[a:b]
            assert pos[a:b] == list(range(b - a))  # positions restart at every piece
            assert len({t // 1000 for t in piece}) == 1 and piece == list(range(piece[0], piece[0] + b - a))
            pieces.append(piece)
        if n < 10:  # padding continues the last piece's positions (no new sequence, after all its real tokens)
            assert pos[n:] == list(range(pos[n - 1] + 1, pos[n - 1] + 1 + 10 - n))
    # the pieces are exactly the one-piece-per-row cut: seq_len slices of each document, minus those under 4 tokens
    expect = [d[i:i + 10] for d in docs for i in range(0, len(d), 10)]
    expect = [p for p in expect if len(p) >= 4]
    assert sorted(pieces) == sorted(expect)
    assert rows.tokens == sum(map(len, expect)) == 87
    assert len(rows) == 9 and rows.padding_frac == pytest.approx(3 / 90)  # seven full pieces, then 7 | 5 + 5


def test_unpacked_rows_hold_one_piece_each_in_document_order():
    # data.pack: false, the layout before packing (kept for loss-at-the-same-tokens comparisons)
    docs = [[d * 1000 + t for t in range(n)] for d, n in enumerate((5, 23, 5, 40, 3, 17))]
    rows = make_rows(docs, seq_len=10, pad_id=-1, min_chunk=4, pack=False)
    expect = [p for d in docs for i in range(0, len(d), 10) if len(p := d[i:i + 10]) >= 4]
    assert len(rows) == len(expect) == 10
    for p, ids, mask, pos in zip(expect, rows.input_ids.tolist(), rows.attention_mask.tolist(),
                                 rows.position_ids.tolist()):
        assert ids == p + [-1] * (10 - len(p)) and mask == [1] * len(p) + [0] * (10 - len(p))
        assert pos == list(range(10))  # one sequence; padding continues its positions
    assert rows.tokens == 87 and rows.padding_frac == pytest.approx(13 / 100)


def test_sequence_starts_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert sequence_starts(pos).tolist() == [[True, False, False, True, False, True],
                                             [True, False, False, False, False, False]]
    assert cu_seqlens_of(pos, 2).tolist() == [0, 3, 5, 6, 12]
    assert cu_seqlens_of(torch.arange(6)[None], 3) is None  # one sequence per row: the dense path
    assert cu_seqlens_of(None, 2) is None
    cu = cu_seqlens_of(pos, 2)
    assert cu.device.type == "cpu" and cu_seqlens_of(pos, 2) is cu  # kept for the tensor: one sync per forward
    pos[1, 3:] = torch.arange(3)  # changed in place: computed again
    assert cu_seqlens_of(pos, 2).tolist() == [0, 3, 5, 6, 9, 12]
    x = torch.randn(2, 3, 6, 4)
    assert flatten_rows(x).shape == (1, 3, 12, 4) and torch.equal(unflatten_rows(flatten_rows(x), 2), x)


def test_targets_stop_at_piece_boundaries():
    ids = torch.tensor([[5, 6, 7, 8, 9, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    pos = torch.tensor([[0, 1, 0, 1, 2, 3]])
    assert next_token_targets(ids, mask, pos).tolist() == [[6, -100, 8, 9, -100, -100]]


def test_varlen_reference_equals_each_sequence_alone():
    torch.manual_seed(0)
    hq, hkv, d, m = 4, 2, 8, 3
    lens = [7, 1, 12, 5]
    t = sum(lens)
    q, q_rot = torch.randn(1, hq, t, d), torch.randn(1, hq, t, d)
    k, k_rot, v = torch.randn(1, hkv, t, d), torch.randn(1, hkv, t, d), torch.randn(1, hkv, t, d)
    la = torch.nn.functional.logsigmoid(torch.randn(1, hkv, t, m))
    cu = torch.tensor([0, 7, 8, 20, 25], dtype=torch.int32)
    kw = dict(window=3, num_sinks=1, scale=d**-0.5)
    out, _ = nha_chunk_varlen(q, q_rot, k, k_rot, v, la, cu_seqlens=cu, **kw)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        sl = (slice(None), slice(None), slice(a, b))
        alone, _ = nha_chunk(q[sl], q_rot[sl], k[sl], k_rot[sl], v[sl], la[sl], **kw)
        torch.testing.assert_close(out[sl], alone, rtol=0, atol=0)


# --- packed == unpacked: loss and gradients ----------------------------------------------------------

LENS = [(9, 14, 5), (20, 8), (11,)]  # pieces per packed row (row 3 has 17 padding positions)
SEQ = 28


def _packed_batch() -> tuple[Rows, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    pieces = [[torch.randint(0, 256, (n,), generator=g) for n in row] for row in LENS]
    ids = torch.full((len(LENS), SEQ), 257)
    mask = torch.zeros(len(LENS), SEQ, dtype=torch.long)
    pos = torch.zeros(len(LENS), SEQ, dtype=torch.long)
    for r, row in enumerate(pieces):
        at = 0
        for p in row:
            ids[r, at:at + len(p)], mask[r, at:at + len(p)], pos[r, at:at + len(p)] = p, 1, torch.arange(len(p))
            at += len(p)
        pos[r, at:] = torch.arange(int(pos[r, at - 1]) + 1, int(pos[r, at - 1]) + 1 + SEQ - at)
    return Rows(ids, mask, pos), [p for row in pieces for p in row]


def _models(student_kind: str):
    teacher = tiny_llama(0, layers=3).float()
    student = tiny_llama(0, layers=3).float()
    if student_kind != "base":
        full = [1] if student_kind == "nha+full" else []
        student = nha_convert.convert(student, NHASettings(window=4, slots=3, sinks=1, full_layers=full,
                                                           gate_init="pooled-k"))
        with torch.no_grad():  # make the slots matter: a strong, input-dependent write
            for layer in student.model.layers:
                layer.self_attn.g_proj.weight.mul_(4)
    with torch.no_grad():  # students differ from the teacher (non-zero KL, MSE and gradients)
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train(), teacher.eval()


def _loss_and_grads(module: StageLoss, teacher, stage: StageSpec, ids, mask, pos):
    extra = teacher_pass(teacher, stage, ids, pos, lambda: torch.autocast("cpu", enabled=False))
    loss, stats = module(ids, mask, pos, **extra)
    params = [p for p in module.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), stats, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("student_kind", ["nha", "nha+full", "base"])
@pytest.mark.parametrize("kind", ["attention_transfer", "distill", "finetune"])
def test_packed_batch_equals_the_pieces_one_per_row(kind, student_kind):
    if kind == "attention_transfer" and student_kind == "base":
        pytest.skip("attention transfer trains NHA layers")
    student, teacher = _models(student_kind)
    stage = StageSpec(kind=kind, ce_weight=0.3, temperature=2.0, loss_chunk=16)
    module = StageLoss(student, stage, teacher)
    rows, pieces = _packed_batch()
    assert cu_seqlens_of(rows.position_ids, len(rows)).tolist() == [0, 9, 23, 28, 48, 56, 84]  # padding stays in its piece
    loss, stats, grads = _loss_and_grads(module, teacher, stage, rows.input_ids, rows.attention_mask,
                                         rows.position_ids)
    ref_loss, ref_stats, ref_grads = 0.0, 0.0, [torch.zeros_like(g) for g in grads]
    for p in pieces:
        one = p[None]
        ones, pos = torch.ones_like(one), torch.arange(len(p))[None]
        l, st, gr = _loss_and_grads(module, teacher, stage, one, ones, pos)
        ref_loss, ref_stats = ref_loss + l, ref_stats + st
        ref_grads = [a + b for a, b in zip(ref_grads, gr)]
    assert float(loss) > 1e-3
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-5)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_nha_layer_keeps_packed_pieces_apart_on_the_hidden_states():
    # The strongest form of the property: every real position's last hidden state equals the piece run alone.
    student, _ = _models("nha+full")
    rows, pieces = _packed_batch()
    with torch.no_grad():
        packed = student.model(input_ids=rows.input_ids, position_ids=rows.position_ids,
                               use_cache=False).last_hidden_state
        real = packed[rows.attention_mask.bool()]
        alone = torch.cat([student.model(input_ids=p[None], use_cache=False).last_hidden_state[0] for p in pieces])
    torch.testing.assert_close(real, alone, rtol=1e-5, atol=1e-5)


# --- the trainer logs padding ------------------------------------------------------------------------


def test_every_log_line_has_the_padding_frac_of_its_rows(tmp_path):
    from nha_convert.finetune.data import build_corpus, step_rows

    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "data")
    stages = """
    stages:
      - kind: distill
        trains: gates
        steps: 3
        batch_size: 2
        seq_len: 96
        eval_rows: 2
    """
    recipe = parse_recipe(recipe_text(base, data, tmp_path / "run", stages), "t.yaml")
    Trainer(recipe).run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    corpus = build_corpus(recipe.data, byte_tokenizer(), seed=recipe.seed)
    train, held = corpus.rows(96), corpus.rows(96, "held_out")

    def frac(rows: Rows, sel: list[int]) -> float:
        return round(1 - float(rows.attention_mask[sel].sum()) / (len(sel) * 96), 4)

    steps = [x for x in lines if "loss" in x and "event" not in x]
    assert [x["step"] for x in steps] == [1, 2, 3]  # log_every 1: each line covers one step
    assert [x["padding_frac"] for x in steps] == [frac(train, step_rows(len(train), 2, s, recipe.seed * 1009))
                                                  for s in range(3)]
    start = next(x for x in lines if x.get("event") == "stage_start")
    assert start["padding_frac"] == round(train.padding_frac, 4) <= 0.05  # the rows as a whole: little padding
    evals = [x for x in lines if x.get("event") == "eval"]
    assert len(evals) == 2 and all(x["padding_frac"] == frac(held, [0, 1]) for x in evals)


@pytest.mark.slow
def test_cpu_budget_of_the_default_recipe_pads_at_most_5_percent():
    """The rows the default recipe's CPU budget trains on (real tokenizer, real corpus): <= 5% padding overall
    and in the steps it takes (the padding_frac its metrics.jsonl logs)."""
    from pathlib import Path

    from nha_convert.finetune.data import build_corpus, step_rows
    from nha_convert.finetune.recipe import read_recipe
    from transformers import AutoTokenizer

    from nha_convert.hub import resolve_source

    recipe = read_recipe(Path(__file__).parents[2] / "recipes" / "smollm2-135m.yaml", budget="cpu")
    corpus = build_corpus(recipe.data, AutoTokenizer.from_pretrained(resolve_source(recipe.model.base)), seed=recipe.seed)
    for idx, stage in enumerate(recipe.stages):
        rows = corpus.rows(stage.seq_len)
        assert rows.padding_frac <= 0.05
        assert recipe.output.log_every == 1  # one metrics line per step: each step's rows are one padding_frac
        g = stage.batch_size * stage.grad_accum
        for step in range(stage.steps):
            taken = step_rows(len(rows), g, step, recipe.seed * 1009 + idx)
            frac = 1 - float(rows.attention_mask[taken].sum()) / (len(taken) * stage.seq_len)
            assert frac <= 0.05, (stage.name, step, frac)


def test_benchmark_counts_real_tokens_after_the_warmup():
    bench = load_benchmark("bench_finetune")
    rows = [{"step": i + 1, "tokens": 1000 * (i + 1) - 10 * i, "time_s": 3.0 + 2.0 * i, "padding_frac": 0.01 * i,
             "loss": 1.0 / (i + 1)} for i in range(6)]
    r = bench.summarise("distill", "distill", rows, warmup=2, global_batch=1, seq_len=1000)
    # steps 3..6 timed: tokens 5950 - 1990 = 3960 in 13 - 5 = 8 s; 4 x 1000 positions
    assert r["steps_timed"] == 4 and r["real_tokens_per_s"] == 495.0 and r["s_per_step"] == 2.0
    assert r["positions_per_s"] == 500.0 and r["padding_frac"] == 0.035 and r["final_loss"] == 1 / 6
    with pytest.raises(SystemExit, match="raise --steps"):
        bench.summarise("distill", "distill", rows[:2], warmup=2, global_batch=1, seq_len=1000)


def test_answer_weight_reaches_the_training_loss_but_not_the_held_out_one(tmp_path):
    """A retrieval source with answer_weight: the first step's logged loss exceeds the unweighted run's (the same
    rows, init and model; the answer terms count more), while the held-out loss before training is the same."""
    base = save_tiny_base(tmp_path / "base")
    stages = """
    stages:
      - kind: finetune
        trains: gates
        steps: 1
        batch_size: 2
        seq_len: 512
        eval_rows: 2
    """
    runs = {}
    for weight in (1, 6):
        source = ("data:\n  sources:\n    - {kind: retrieval, samples: 6, min_tokens: 400, max_tokens: 500, "
                  f"min_distance: 64, formats: [passkey], answer_weight: {weight}}}\n  held_out: 0.34\n")
        text = recipe_text(base, tmp_path, tmp_path / f"run{weight}", stages)
        text = text[:text.index("data:")] + source + text[text.index("output:"):]
        Trainer(parse_recipe(text, "t.yaml")).run()
        lines = [json.loads(x) for x in (tmp_path / f"run{weight}" / "metrics.jsonl").read_text().splitlines()]
        runs[weight] = ([x["loss"] for x in lines if "loss" in x and "event" not in x],
                        [x["val_loss"] for x in lines if x.get("event") == "eval"])
    (plain, plain_eval), (weighted, weighted_eval) = runs[1], runs[6]
    assert weighted[0] > plain[0]
    assert weighted_eval[0] == plain_eval[0]


def test_benchmark_keeps_one_students_figures_when_the_other_fails(tmp_path, monkeypatch, capsys):
    """A crash of one student (session 7: the base under liger) prints the other's table, writes the JSON with the
    failure named, and exits non-zero with one line."""
    bench = load_benchmark("bench_finetune")
    record = {"stage": "distill", "kind": "distill", "global_batch": 2, "seq_len": 8, "real_tokens_per_s": 10.0,
              "s_per_step": 1.0, "padding_frac": 0.0, "peak_mem_gib": 1.0}

    def fake_run(recipe, budget, steps, warmup, out, student, extra, at):
        if student == "base":
            raise RuntimeError("guard crash\nsecond line")
        return [record]

    monkeypatch.setattr(bench, "run", fake_run)
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit, match="the base student failed"):
        bench.main(["--budget", "cpu", "--json", str(out), "--out", str(tmp_path / "runs")])
    printed = capsys.readouterr().out
    assert "| distill | distill | 2 x 8 | 10.0 | - |" in printed and "base student failed: RuntimeError: guard crash" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["nha"] == [record] and saved["failed"] == {"base": "RuntimeError: guard crash"}

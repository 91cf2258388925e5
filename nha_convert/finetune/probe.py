"""A short recall probe at the end of every training stage, so metrics.jsonl shows whether recall is trending up.

Recall is what a sliding window cannot fake: passkey and multi-query associative recall (corpora/synthetic.py,
the project's own formats, the same items and grading as `nha-eval`), the teacher-forced natural-recall probes a
recipe lists (code, restated: corpora/natural.py) and the held-out split of the retrieval
documents (corpora/retrieval.py: formats, keys, answers and filler passages the training split never holds), each at
the recipe's `probe.lengths`. Scored by greedy decoding under teacher forcing (one forward per item,
corpora/items.py). Runs on the main process only.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..corpora import natural
from ..corpora.items import accuracy, check_lengths, context_length, model_predictions, score
from ..corpora.retrieval import formats_for, probe_items, retrieval_documents
from ..corpora.synthetic import PROBES, make_items
from ..settings import ResolvedNHA
from .schema import ProbeSpec


def _normalised_equal(want: str, got: str) -> bool:
    return natural.normalize(want) == natural.normalize(got)


def retrieval_accuracy(model: Any, tokenizer: Any, length: int, n: int, seed: int = 0) -> float:
    """Exact-match accuracy on n held-out retrieval documents of about `length` tokens, every question more than
    max(2 windows, 64) tokens (at most half the length) after its fact."""
    window = ResolvedNHA.from_config(model.config).window if getattr(model.config, "nha", None) else 0
    docs = retrieval_documents(tokenizer, n, split="eval", seed=seed, min_tokens=length, max_tokens=length,
                               min_distance=min(max(2 * window, 64), length // 2), formats=formats_for(length))
    return accuracy(model, tokenizer, probe_items(docs, tokenizer))


@torch.no_grad()
def recall_probe(model: Any, tokenizer: Any, spec: ProbeSpec, seed: int = 0) -> dict[str, dict[str, float]]:
    """{probe: {length: accuracy}} for the probes of `spec`."""
    out: dict[str, dict[str, float]] = {}
    own = [p for p in spec.probes if p in PROBES]
    if own:  # what `nha-eval --recall` measures for these probes (eval/recall.py runs the same items)
        check_lengths(spec.lengths, context_length(model), type(model).__name__)
    for p in own:
        out[p] = {str(L): accuracy(model, tokenizer, make_items(p, tokenizer, L, spec.items, seed))
                  for L in spec.lengths}
    for p in (p for p in spec.probes if p in natural.TEACHER_FORCED):  # graded as nha-eval grades them (normalised)
        out[p] = {str(L): score(items := natural.BUILDERS[p](tokenizer, L, spec.items, seed),
                                model_predictions(model, tokenizer, items), lambda _: _normalised_equal)
                  for L in spec.lengths}
    if "retrieval" in spec.probes:
        out["retrieval"] = {str(L): retrieval_accuracy(model, tokenizer, L, spec.items, seed) for L in spec.lengths}
    return out


def stage_end_probe(trainer: Any, student: Any, tokenizer: Any, stage: str, global_step: int) -> dict | None:
    """The recipe's probe on the student after a stage: a "recall" record in metrics.jsonl and one printed line."""
    spec = trainer.recipe.probe
    if spec is None:
        return None
    from .trainables import causal_lm

    result = None
    if trainer.main:
        model = causal_lm(student)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            result = recall_probe(model, tokenizer, spec, seed=trainer.recipe.seed)
        finally:
            model.train(was_training)
        seconds = round(time.perf_counter() - t0, 1)
        trainer.metrics.write(event="recall", stage=stage, global_step=global_step, seconds=seconds, **result)
        shown = "; ".join(f"{p} " + ", ".join(f"{k}: {v:.2f}" for k, v in r.items()) for p, r in result.items())
        trainer.console.print(f"  recall after {stage}: {shown} ({seconds} s)", highlight=False)
    trainer.accelerator.wait_for_everyone()
    return result

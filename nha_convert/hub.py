"""Which base model a name means, and loading it: the embedded default, short aliases, local folders,
Hugging Face hub ids.

Hub ids go straight to `from_pretrained`, so online users get downloads and the HF cache as usual.
Offline (HF_HUB_OFFLINE=1, or no network), a hub id works only from the local HF cache; otherwise the
user gets one line naming the fix instead of a retry loop and a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from . import assets
from .errors import NHAError
from .random_models import TOKENIZED, is_random, random_base, random_config

DEFAULT = "smollm2-135m"

# Short names for the models this project is meant for. smollm2-135m is embedded (see assets.py).
ALIASES: dict[str, str] = {
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",  # the released (post-trained) model; qwen3-8b-base is the pretrained one
    "qwen3-8b-base": "Qwen/Qwen3-8B-Base",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
}
# Embedded real models besides the default (assets.py): alias -> the function that builds their folder once.
EMBEDDED = {"qwen2.5-coder-0.5b": assets.qwen_coder_folder}

# "org/name" as the hub spells repo ids (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def resolve_source(name: str | Path | None) -> str | Path:
    """Turn a user's model name into a local folder (Path) or a hub id (str).

    None / "smollm2-135m": the embedded SmolLM2 folder; another embedded model's alias: its folder; an alias: its
    hub id; a random-weight shape (random_models.py): its name, unchanged; an existing folder: that folder (it must
    hold a valid config.json); a path-like name that does not exist: an error; anything else: a hub id.
    """
    if name is None or str(name).strip().lower() == DEFAULT:
        return assets.smollm2_folder()
    text = str(name).strip()
    if text.lower() in EMBEDDED:
        return EMBEDDED[text.lower()]()
    if text.lower() in TOKENIZED:
        return text.lower()
    if text.lower() in ALIASES:
        return ALIASES[text.lower()]
    path = Path(text).expanduser()
    if path.exists():
        return _checked_folder(path)
    if isinstance(name, Path) or _looks_like_path(text):
        raise NHAError(f"no such folder: {path}")
    return text


def check_source(name: str | Path | None) -> None:
    """`resolve_source`'s checks without building or downloading anything: an existing folder must be a model
    folder, and a path-like name must exist. Embedded models, aliases, random shapes and hub ids pass (they load
    later)."""
    if name is None or str(name).strip().lower() in (DEFAULT, *ALIASES, *EMBEDDED, *TOKENIZED):
        return
    resolve_source(name)


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "/", "~")) or (os.altsep and text.startswith(os.altsep)):
        return True
    has_sep = os.sep in text or bool(os.altsep and os.altsep in text)
    return has_sep and not _REPO_ID.match(text)


def _checked_folder(path: Path) -> Path:
    path = path.resolve()
    if not path.is_dir():
        raise NHAError(f"{path} is a file; pass a Hugging Face model folder (with config.json) or a hub id")
    config = path / "config.json"
    if not config.is_file():
        raise NHAError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NHAError(f"{config} is not valid JSON ({exc}); re-save or re-download the model") from None
    return path


def load_config(name: str | Path | None) -> Any:
    """The model's `PretrainedConfig` (AutoConfig), from the same sources as load_base_model."""
    from transformers import AutoConfig

    if is_random(name):
        return random_config(name)
    source = resolve_source(name)
    return _from_pretrained(AutoConfig, source)


def load_base_model(
    name: str | Path | None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """(model, tokenizer) of a base model: AutoModelForCausalLM + AutoTokenizer, or a random-weight shape built
    on `device` (random_models.py).

    The model is in eval mode, on `device`, in `dtype`. A tokenizer without a pad token gets its eos
    token as pad (batching needs one); padding side is left to the caller.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_random(name):
        return random_base(str(name), dtype=dtype, device=device)
    source = resolve_source(name)
    if isinstance(source, Path) and not any((source / f).is_file() for f in _TOKENIZER_FILES):
        raise NHAError(f"{source} has no tokenizer files (tokenizer.json, tokenizer.model, ...); save the tokenizer there too")
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype, device_map=torch.device(device))
    model.eval()
    tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise NHAError(f"the tokenizer of {source} has neither a pad nor an eos token; add one and save it")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now: huggingface_hub reads them only at import time."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in flags)


def _from_pretrained(cls: Any, source: str | Path, **kwargs: Any) -> Any:
    if isinstance(source, Path):
        return cls.from_pretrained(source, **kwargs)
    try:
        if not _offline():
            return cls.from_pretrained(source, **kwargs)
        # Offline: load the cached snapshot folder itself. Passing local_files_only is not enough, as
        # not every lookup honours it (AutoModel's PEFT-adapter probe retries the hub for ~20 s).
        from huggingface_hub import snapshot_download

        loaded = cls.from_pretrained(snapshot_download(source, local_files_only=True), **kwargs)
    except OSError as exc:
        explained = hub_error(source, exc)
        if explained is None:
            raise
        raise explained from None
    _name_as(loaded, source)
    return loaded


def _name_as(obj: Any, repo_id: str) -> None:
    """Name a model/config/tokenizer loaded from a cached snapshot by its hub id, as an online load does."""
    config = getattr(obj, "config", obj)
    if hasattr(config, "_name_or_path"):
        config._name_or_path = repo_id
    if hasattr(obj, "name_or_path"):
        obj.name_or_path = repo_id


def hub_error(repo_id: str, exc: BaseException) -> NHAError | None:
    """The one-line NHAError for a failed hub load, or None when the failure is not about the hub."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return NHAError(f"'{repo_id}' is gated on the Hugging Face hub: accept its licence on the model page, "
                        "then run `hf auth login`")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return NHAError(f"no model '{repo_id}' on the Hugging Face hub (or it is private: run `hf auth login`); "
                        "check the name or pass a local folder")
    offline_words = ("couldn't connect", "outgoing traffic has been disabled", "offline mode")
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain) or any(
        w in str(e).lower() for e in chain for w in offline_words
    ):
        return NHAError(f"cannot download '{repo_id}': offline and not in the local Hugging Face cache; "
                        "run once online or pass a local folder")
    return None

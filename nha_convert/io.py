"""Files, written atomically: NHA checkpoints as standard Hugging Face folders, single files (`atomic_write`), and
checks that a folder or a checkpoint's weights are usable before any work starts. Loading is in loading.py.

A full disk is one NHAError (`OutOfSpace`) naming the folder and the bytes needed, with the partial files removed;
writes whose size is known check the free space first.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import NHAError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# --- free space -----------------------------------------------------------------------------------------

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) reports a full disk as its own error whose text carries the OS error
_NO_SPACE_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")


class OutOfSpace(NHAError):
    """The disk (or quota) of `folder` is full; partial files are already removed."""

    def __init__(self, folder: Path, needed: int | None, what: str):
        self.folder, self.needed = Path(folder), needed
        need = f"; {what} needs about {needed:,} bytes" if needed else f" while writing {what}"
        try:
            free = f", {shutil.disk_usage(_existing(self.folder)).free:,} bytes free"
        except OSError:
            free = ""
        super().__init__(f"out of disk space in {self.folder}{need}{free}; free some space or choose another folder")


def is_no_space(error: BaseException) -> bool:
    """True for a full disk or quota, as an OSError or as a library's own error that wraps one (any cause)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, OutOfSpace):
            return True
        if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
            return True
        if not isinstance(e, NHAError) and any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """OutOfSpace now, before writing, when `folder`'s disk has less than `needed` bytes free."""
    folder = Path(folder)
    if shutil.disk_usage(_existing(folder)).free < needed:
        raise OutOfSpace(folder, needed, what)


@contextmanager
def no_space_is_one_line(folder: str | os.PathLike, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into OutOfSpace (the block removes its own partial files)."""
    try:
        yield
    except NHAError:
        raise
    except Exception as e:
        if is_no_space(e):
            raise OutOfSpace(Path(folder), needed, what) from None
        raise


def tensor_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers (tied weights once): what its safetensors file holds."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def check_replaceable(folder: str | os.PathLike, option: str = "--overwrite") -> None:
    """Fail now if an existing `folder` cannot be moved aside (immutable, a mount point, a busy folder): --overwrite
    replaces it by renaming, and finding that out after the work would waste the work. Renames it and back."""
    folder = Path(folder)
    if not folder.exists():
        return
    probe = folder.with_name(f".{folder.name}.move-probe")
    try:
        os.rename(folder, probe)
    except OSError as e:
        raise NHAError(f"{option}: {folder} cannot be replaced ({e.strerror or e}: it cannot be moved; a mount "
                       "point or immutable folder?); choose another output folder or remove it yourself") from None
    os.rename(probe, folder)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NHAError(f"output path {out} exists and is not a folder; choose another output folder")
    if out.exists() and not overwrite:
        raise NHAError(f"output folder {out} already exists; pass --overwrite to replace it")
    check_writable(out.parent if out.exists() else out)  # save() writes beside `out`, then renames
    if out.exists():
        check_replaceable(out)
    return out


def check_writable(target: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, before any work, if `target` (a folder to create or fill) cannot be written.

    Probes by creating and removing a file in `target` or, when it does not exist yet, in its nearest existing
    parent (os.access is no answer for root or read-only mounts). Creates nothing that stays.
    """
    out = Path(target).expanduser()
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise NHAError(f"{what} {out} cannot be created: {probe_dir} is a file; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nha-write-probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NHAError(f"{what} {out} is not writable ({e.strerror or e} in {probe_dir}); "
                       "choose another path or fix its permissions") from None
    return out


def umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions(path: str | os.PathLike) -> Path:
    """Give a file or folder (and all inside it) made through tempfile (0600 / 0700; transformers' safetensors
    writer does the same) the permissions open() / mkdir() would give: others sharing a cache or results folder
    can then read it, as the umask intends."""
    p, mask = Path(path), umask()
    for q in [p, *(p.rglob("*") if p.is_dir() else ())]:
        if not q.is_symlink():
            os.chmod(q, (0o777 if q.is_dir() else 0o666) & ~mask)
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place: readers see the old file or
    the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with no_space_is_one_line(path.parent, path.name):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            default_permissions(tmp)  # mkstemp made it 0600; others may read a results folder, as the umask says
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


# --- weights --------------------------------------------------------------------------------------------


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file is damaged (missing, truncated, bad header), or None when its header and length
    agree. Reads the header only: cheap for a 16 GB file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{p.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{p.name} is truncated (header of {n} bytes, file of {size})"
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        return f"{p.name} is missing"
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{p.name} has an unreadable header ({type(e).__name__})"
    if not isinstance(header, dict):
        return f"{p.name} has an unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets") or ()) == 2]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{p.name} is {size:,} bytes, its header says {expected:,} (truncated or overwritten)"
    return None


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """Why a torch.save file (zip format: .bin, .pt) is damaged, or None. A truncated zip loses its directory."""
    p = Path(path)
    if not p.is_file():
        return f"{p.name} is missing"
    return None if zipfile.is_zipfile(p) else f"{p.name} is truncated or not a torch.save file"


def weights_problem(folder: str | os.PathLike) -> str | None:
    """Why a local Hugging Face model folder's weights are unusable (none, a shard missing, truncated), or None."""
    f = Path(folder)
    index = next((f / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (f / n).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a valid weight index"
        files = [f / s for s in shards]
    else:
        files = [f / n for n in ("model.safetensors", "pytorch_model.bin") if (f / n).is_file()][:1]
        if not files:
            return "it holds no weights (model.safetensors or pytorch_model.bin)"
    for file in files:
        problem = safetensors_problem(file) if file.suffix == ".safetensors" else torch_file_problem(file)
        if problem:
            return problem
    return None


def check_weights(folder: str | os.PathLike) -> None:
    """NHAError naming the damaged file of a local model folder, before anything is loaded from it."""
    problem = weights_problem(folder)
    if problem:
        raise NHAError(f"model folder {folder}: {problem}; re-save or re-download the model")


def save(model: PreTrainedModel, tokenizer: Any, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write model (safetensors), config, generation config and tokenizer to `out_dir`.

    Everything goes to a temporary folder beside `out_dir`, which is renamed into place only once complete:
    an interrupted save never leaves a folder that looks like a checkpoint.
    """
    out = check_output_dir(out_dir, overwrite)
    needed = tensor_bytes(model)
    check_free_space(out.parent, needed, f"the model ({out.name})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        with no_space_is_one_line(out.parent, f"the model ({out.name})", needed):
            _save_into(model, tokenizer, tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_into(model: PreTrainedModel, tokenizer: Any, tmp: Path) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    default_permissions(tmp)


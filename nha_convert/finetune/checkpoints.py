"""Training checkpoints on disk: where they are, writing one atomically, checking one is intact, loading one.

A checkpoint (run_dir/checkpoints/step-XXXXXXXX-stageS) holds accelerate's save_state (weights of the model being
trained, optimizer, the RNG of every process), the scheduler and the position (stage, step). trainer_state.json is
written last and lists every other file with its size and SHA-256, so a later loss (a file deleted, a copy cut
short, a full disk, bytes overwritten in place) is found before loading: `--resume` then continues from the newest
intact checkpoint and says so. Rotation keeps the newest `keep` intact checkpoints: a damaged one never pushes a
good one out. A full disk while saving removes the partial folder and is one line (io.OutOfSpace).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import NHAError
from ..io import (check_free_space, check_replaceable, no_space_is_one_line, safetensors_problem,
                  torch_file_problem)
from ..run_folder import STATE_FILE, checkpoint_dirs  # the layout evaluation reads too

SCHEDULER_FILE = "scheduler_state.pt"


@dataclass
class Position:
    stage: int = 0
    step: int = 0  # optimizer steps completed in `stage`
    global_step: int = 0
    tokens: int = 0
    total: int | None = None  # the stage's step count (fixed after timing when the stage has a time budget)


def checkpoint_name(pos: Position) -> str:
    return f"step-{pos.global_step:08d}-stage{pos.stage}"


def read_position(ckpt: Path) -> Position:
    d = json.loads((ckpt / STATE_FILE).read_text())
    return Position(**{k: d.get(k) for k in ("stage", "step", "global_step", "tokens", "total")})


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STATE_FILE}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


# (checkpoint, the (size, mtime) of its files) whose checksums matched: rotation asks at every save, and files
# that did not change since need no second read.
_verified: dict[Path, tuple[tuple[str, int, int], ...]] = {}


def _stamp(ckpt: Path) -> tuple[tuple[str, int, int], ...]:
    stats = [(p, p.stat()) for p in sorted(ckpt.rglob("*")) if p.is_file()]
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p, st in stats)


def _checksum_problem(ckpt: Path, sums: dict[str, str]) -> str | None:
    stamp = _stamp(ckpt)
    if _verified.get(ckpt.resolve()) == stamp:
        return None
    for rel, want in sums.items():
        if sha256(ckpt / rel) != want:
            return f"{rel} does not match its checksum (damaged since it was saved)"
    _verified[ckpt.resolve()] = stamp
    return None


def problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, truncated or damaged), or None when intact."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
        read_position(ckpt)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError, TypeError, AttributeError):
        return f"{STATE_FILE} is unreadable"
    listed = state.get("files")
    if isinstance(listed, dict):
        for rel, size in listed.items():
            f = ckpt / rel
            if not f.is_file():
                return f"{rel} is missing"
            now = f.stat().st_size
            if now != size:
                return f"{rel} is {now:,} bytes, {size:,} when saved ({'truncated' if now < size else 'changed'})"
    else:  # written before checkpoints listed their files: the files one process's save always has
        for want in (SCHEDULER_FILE, "optimizer", "model"):
            if not any(p.name.startswith(want) for p in ckpt.iterdir()):
                return f"no {want}* file"
    for f in sorted(ckpt.rglob("*")):
        if f.suffix == ".safetensors":
            bad = safetensors_problem(f)
        elif f.suffix in (".bin", ".pt") and f.is_file():
            bad = torch_file_problem(f)
        else:
            continue
        if bad:
            return bad
    sums = state.get("sha256")
    return _checksum_problem(ckpt, sums) if isinstance(sums, dict) else None


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


def newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest intact checkpoint or None, [(newer damaged checkpoint, why)], newest first)."""
    damaged = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        why = problem(ckpt)
        if why is None:
            return ckpt, damaged
        damaged.append((ckpt, why))
    return None, damaged


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint a run starts from (None: a fresh run), or the NHAError that stops it; reads only, so the
    CLI asks it before loading any model and the trainer asks it again."""
    run_dir = Path(run_dir)
    if resume:
        if (run_dir / "model").is_dir() and (run_dir / "DONE").is_file():
            raise NHAError(f"{run_dir} holds a finished run (model/); nothing to resume")
        if not checkpoint_dirs(run_dir):
            raise NHAError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}; run without --resume")
        ckpt, damaged = newest_intact(run_dir)
        if ckpt is None:
            raise NHAError(f"no intact checkpoint in {run_dir / 'checkpoints'} ({damaged[0][0].name}: "
                           f"{damaged[0][1]}); start over with --overwrite")
        return ckpt
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise NHAError(f"run folder {run_dir} is not empty; pass --resume to continue it or --overwrite to "
                           "start over")
        check_replaceable(run_dir)
    return None


def save_checkpoint(accelerator: Any, run_dir: Path, pos: Position, scheduler: Any, extra: dict[str, Any],
                    keep: int) -> Path:
    """Write a checkpoint into a hidden temporary folder and rename it into place (all processes call this);
    then drop all but the newest `keep` intact ones. The free space is checked first against the size of the
    previous checkpoint; a full disk removes the partial folder and raises io.OutOfSpace."""
    acc, main = accelerator, accelerator.is_main_process
    root = Path(run_dir) / "checkpoints"
    name = checkpoint_name(pos)
    tmp, final = root / f".{name}.partial", root / name
    previous = checkpoint_dirs(run_dir)
    needed = checkpoint_bytes(previous[-1]) if previous else None
    try:
        with no_space_is_one_line(root, f"checkpoint {name}", needed):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                if needed:
                    check_free_space(root, needed, f"checkpoint {name}")
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()  # every process has written its part (shards, RNG state) before the rename
            if main:
                torch.save({"scheduler": scheduler.state_dict()}, tmp / SCHEDULER_FILE)
                files = _files(tmp)
                state = {**asdict(pos), **extra, "files": files, "sha256": {f: sha256(tmp / f) for f in files}}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _verified[final.resolve()] = _stamp(final)  # its checksums were just taken from these files
        rotate(run_dir, keep)
    acc.wait_for_everyone()
    return final


def rotate(run_dir: Path, keep: int) -> list[Path]:
    """Delete the checkpoints older than the `keep` newest intact ones (none while fewer are intact); damaged ones
    newer than those stay for the user to look at. Returns what was deleted."""
    if keep <= 0:
        return []
    intact = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        if problem(ckpt) is None:
            intact.append(ckpt)
            if len(intact) == keep:
                break
    if len(intact) < keep:
        return []
    dirs = checkpoint_dirs(run_dir)
    older = dirs[:dirs.index(intact[-1])]
    for old in older:
        shutil.rmtree(old, ignore_errors=True)
    return older


def load_checkpoint(accelerator: Any, ckpt: Path, scheduler: Any) -> Position:
    """Restore model, optimizer, RNG and scheduler state; a checkpoint that still fails to load is an NHAError
    naming the folder to delete."""
    try:
        accelerator.load_state(str(ckpt))
        scheduler.load_state_dict(torch.load(ckpt / SCHEDULER_FILE, weights_only=False)["scheduler"])
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise NHAError(f"checkpoint {ckpt} does not load ({type(e).__name__}: {first}); it was written by "
                       "another recipe or is damaged: delete it to resume from an earlier one") from None
    return read_position(ckpt)


def start_run_dir(accelerator: Any, run_dir: Path, *, resume: bool,
                  overwrite: bool) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(checkpoint to resume from or None, newer damaged checkpoints skipped); a fresh run empties the folder
    (main process, the others wait)."""
    ckpt = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        return ckpt, newest_intact(run_dir)[1]
    if run_dir.exists() and any(run_dir.iterdir()):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    return None, []


def forget_optimizer_state(optimizer: Any) -> None:
    """Empty the state of an optimizer that has not stepped yet.

    Under FSDP, saving the optimizer goes through torch.distributed.checkpoint, which fills an empty optimizer by
    running one step with zero gradients at lr 0. AdamW's step counter then starts at 1 and its bias correction
    makes the first real update 0.74x as large (the FSDP2 loss curve left the 1-GPU one at step 2). The same state
    comes back when resuming from a stage-start checkpoint, so both paths call this before the stage's first step.
    """
    getattr(optimizer, "optimizer", optimizer).state.clear()

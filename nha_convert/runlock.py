"""One process at a time per run folder: an flock held for the whole run, its holder named inside.

The lock file sits beside the run folder (`.<name>.lock` in its parent), not inside it: `--overwrite` deletes the
run folder, which would delete a lock inside it while it is held, and an empty run folder must not look used.
The kernel drops an flock when its process dies (even by SIGKILL), so a stale lock file never blocks a new run;
its text (pid, host, start, command) only serves to name a live holder in the refusal.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from .errors import NHAError


def lock_path(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir).expanduser().absolute()
    return run.parent / f".{run.name}.lock"


def holder(run_dir: str | os.PathLike) -> dict | None:
    """What the lock file says about its (last) holder, or None."""
    try:
        return json.loads(lock_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (since {started}: {info.get('command', '?')})"


class RunLock:
    """`with RunLock(run_dir):` holds the run folder's lock or raises NHAError naming the process that holds it."""

    def __init__(self, run_dir: str | os.PathLike, what: str = "run folder"):
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise NHAError(f"cannot create the lock file {self.path} ({e.strerror}); "
                               "choose a writable output folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise NHAError(f"{self.what} {self.run_dir} is in use by {describe(holder(self.run_dir))}; wait "
                               "for it to finish or stop it, or choose another -o") from None
            # The file may have been unlinked by a holder releasing it between our open and flock: then retry on
            # the new file, so that two processes never both hold "the" lock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: see acquire's inode check
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

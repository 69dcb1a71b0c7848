"""Crash-safe commit of a checkpoint directory.

Protocol (coordinator): data files of a save never reuse a name that the committed
checkpoint references; the manifest is written and made durable; then ``.metadata`` is
replaced with one atomic ``rename`` - that rename is the commit point for dcpx and stock
torch alike; finally the previous checkpoint's files are removed.  A crash before the rename
leaves the previous checkpoint untouched; a crash after it leaves the new one complete.  The
next save removes what a crashed one left behind.  An ``flock`` on ``.dcpx.lock`` keeps two
saves to one path from interleaving.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import threading
from typing import Iterable

from .errors import CommitError

METADATA = ".metadata"
LOCK = ".dcpx.lock"
# Files a dcpx save may create; only these are ever removed by cleanup.
_OWNED = re.compile(r"^(__\d+_\d+(\.[0-9a-f]{8,32})?(\.st)?\.distcp|\.dcpx-manifest-[0-9a-f]{32}\.json|\.metadata\.tmp-[0-9a-f]{32}|\.dcpx-manifest-[0-9a-f]{32}\.json\.tmp)$")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(directory: str, name: str, data: bytes, tmp_name: str, sync: bool) -> None:
    """Write ``data`` to ``directory/name`` via a temporary file and one rename."""
    tmp = os.path.join(directory, tmp_name)
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, name))
    if sync:
        fsync_dir(directory)


class BackgroundFlush:
    """Keep the disk busy while a data file is still being written.

    With plenty of memory the kernel holds a whole save in the page cache and starts
    writing it out only at the final ``fsync``, so encoding and the disk take turns.  Once
    a file passes ``START`` bytes, a thread calls ``fdatasync`` on it every ``INTERVAL``
    seconds until the file is complete; the final ``fsync`` then finds little left to do.
    (Measured on the 1 GiB benchmark with zstd: saves 0.34-0.38 GB/s without, 0.46-0.54
    with.)  An error the thread sees is raised by ``check``: on Linux a write-back error is
    reported once per open file, so the final ``fsync`` might not see it again.
    """

    START = 16 << 20
    INTERVAL = 0.05

    def __init__(self, f: io.BufferedWriter, enabled: bool) -> None:
        self._f, self._enabled = f, enabled
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: OSError | None = None

    def wrote(self) -> None:
        """Call after each write; starts the thread once the file is large enough."""
        if self._enabled and self._thread is None and self._f.tell() >= self.START:
            self._thread = threading.Thread(target=self._run, args=(self._f.fileno(),), name="dcpx-flush", daemon=True)
            self._thread.start()

    def _run(self, fd: int) -> None:
        while not self._done.wait(self.INTERVAL):
            try:
                os.fdatasync(fd)
            except OSError as exc:
                self._error = exc
                return

    def stop(self) -> None:
        """Stop flushing (before the file is closed); never raises."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def check(self) -> None:
        """Raise the error a background flush saw, if any, naming the file."""
        if self._error is not None:
            exc = self._error
            raise OSError(exc.errno, f"writing {self._f.name} to disk failed: {exc.strerror}") from exc


class SaveLock:
    """Exclusive advisory lock on a checkpoint directory for the duration of one save."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise CommitError(
                    f"{self.directory}: another save to this checkpoint path is in progress; "
                    "wait for it or save to another path"
                ) from exc
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def try_acquire(self) -> bool:
        try:
            self.acquire()
            return True
        except CommitError:
            return False

    def __del__(self) -> None:
        self.release()


def owned_leftovers(directory: str, keep: Iterable[str]) -> list[str]:
    """Files a dcpx save created in ``directory`` that the committed checkpoint does not use."""
    keep = set(keep)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _OWNED.match(n) and n not in keep)


def remove_files(directory: str, names: Iterable[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass

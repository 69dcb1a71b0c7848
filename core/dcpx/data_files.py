"""The data files one load or verify reads: opened on demand, a bounded number at a time.

A checkpoint saved by a thousand ranks has a thousand data files, and a load may need items
from all of them; keeping every file open from planning to the end ran out of descriptors
under the common limit of 1024 per process (stock torch opens one file at a time).  Here a
file stays open while any of its items is being read and is closed again, oldest first,
once more than ``MAX_OPEN`` are open and idle.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

from .checkpoint_files import confine, open_regular
from .errors import CheckpointFormatError

MAX_OPEN = 64


class DataFile:
    """One data file: its size, checked when it was first opened, and a descriptor that is
    valid inside ``use()``."""

    def __init__(self, files: DataFiles, path: str, fd: int, size: int) -> None:
        self._files, self.path, self.size = files, path, size
        self._fd: int | None = fd
        self._users = 0

    @property
    def fd(self) -> int:
        if self._fd is None or self._users == 0:
            raise RuntimeError(f"{self.path}: read outside DataFile.use()")
        return self._fd

    @contextmanager
    def use(self) -> Iterator[int]:
        """Keep the file open for the block (reopening it if it was closed meanwhile)."""
        fd = self._files.acquire(self)
        try:
            yield fd
        finally:
            self._files.release(self)


class DataFiles:
    """The data files of one checkpoint directory, by relative path."""

    def __init__(self, directory: str, max_open: int | None = None) -> None:
        self.directory, self.max_open = directory, max_open or MAX_OPEN
        self._files: dict[str, DataFile] = {}
        self._idle: OrderedDict[DataFile, None] = OrderedDict()  # open, unused; oldest first
        self._open = 0
        self._lock = threading.Lock()

    def get(self, rel: str, where: str) -> DataFile:
        """The file ``rel`` names, confined to the directory; opened to check it is a regular
        file and to learn its size the first time."""
        with self._lock:
            found = self._files.get(rel)
            if found is not None:
                return found
            path = confine(self.directory, rel, where)
            try:
                fd, size = open_regular(path, where)
            except FileNotFoundError as exc:
                raise CheckpointFormatError(f"{where}: data file is missing") from exc
            found = self._files[rel] = DataFile(self, path, fd, size)
            self._open += 1
            self._idle[found] = None
            self._trim()
            return found

    def acquire(self, f: DataFile) -> int:
        with self._lock:
            if f._fd is None:
                fd, size = open_regular(f.path, f.path)
                if size != f.size:
                    os.close(fd)
                    raise CheckpointFormatError(f"{f.path}: the file changed size while the checkpoint was read")
                f._fd = fd
                self._open += 1
            self._idle.pop(f, None)
            f._users += 1
            return f._fd

    def release(self, f: DataFile) -> None:
        with self._lock:
            f._users -= 1
            if f._users == 0:
                self._idle[f] = None
                self._trim()

    def _trim(self) -> None:
        while self._open > self.max_open and self._idle:
            f, _ = self._idle.popitem(last=False)
            self._close(f)

    def _close(self, f: DataFile) -> None:
        if f._fd is not None:
            os.close(f._fd)
            f._fd = None
            self._open -= 1

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                self._close(f)
            self._idle.clear()

"""Where a conversion writes before its copy is checked.

A new destination is written into a staging directory next to it (``.<name>.dcpx-convert``)
and renamed into place only once every item has read back equal to the source, so a
destination that exists is a checked one, and an existing file is replaced only by a
checked copy.  The staging directory is locked while a conversion uses it; whatever a
conversion killed half-way left there is removed by the next one to the same destination.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from types import TracebackType

from .commit import fsync_dir
from .errors import ConfigError


class Staging:
    """``with Staging(dst) as stage``: write and check ``stage.path``, then ``publish()``;
    leaving the block removes whatever was not published."""

    def __init__(self, dst: str) -> None:
        parent, name = os.path.split(os.path.abspath(dst))
        self.dst, self.parent = dst, parent
        self.root = os.path.join(parent, f".{name}.dcpx-convert")
        self.path = os.path.join(self.root, name)  # same name: formats are told by suffix
        self._fd = -1

    def __enter__(self) -> "Staging":
        try:
            os.makedirs(self.root, exist_ok=True)
            self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConfigError(f"{self.dst}: cannot use {self.root} to stage the conversion: {exc}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ConfigError(f"{self.dst}: another conversion to this destination is running (it writes {self.root})") from None
        self._clear()  # left by a conversion that was killed
        return self

    def publish(self) -> None:
        """Move the checked copy to the destination (a missing path, an empty directory or,
        for a single file, a file it replaces) with one rename."""
        os.replace(self.path, self.dst)
        fsync_dir(self.parent)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._clear()
            os.rmdir(self.root)
        except OSError:
            pass  # removed by the next conversion to this destination
        finally:
            os.close(self._fd)

    def _clear(self) -> None:
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

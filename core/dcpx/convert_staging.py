"""Where a conversion writes before its copy is checked.

A destination that does not exist yet, and a single file a conversion replaces, is written
into a staging directory next to it (``.<name>.dcpx-convert``) and renamed into place only
once every item has read back equal to the source, so such a destination appears (or is
replaced) only by a checked copy.  The staging directory is locked while a conversion uses
it; whatever a conversion killed half-way left there is removed by the next one to the same
destination.  (An existing directory is written in place: see ``convert``.)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from types import TracebackType

from .commit import fsync_dir
from .errors import ConfigError

SUFFIX = ".dcpx-convert"
NAME_MAX = 255


def staging_name(name: str) -> str:
    """``.<name>.dcpx-convert``, or a digest of ``name`` where that is too long a file name."""
    full = f".{name}{SUFFIX}"
    if len(os.fsencode(full)) <= NAME_MAX:
        return full
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}{SUFFIX}"


class Staging:
    """``with Staging(dst) as stage``: write and check ``stage.path``, then ``publish()``;
    leaving the block removes whatever was not published."""

    def __init__(self, dst: str, replace: bool) -> None:
        parent, name = os.path.split(os.path.abspath(dst))
        self.dst, self.parent, self.replace = dst, parent, replace
        self.final = os.path.join(parent, name)  # where it goes: ``out/.`` is ``out``
        self.root = os.path.join(parent, staging_name(name))
        self.path = os.path.join(self.root, name)  # the same name: formats are told by suffix
        self._fd = -1

    def __enter__(self) -> "Staging":
        try:
            self._fd = self._lock()
            self._clear()  # left by a conversion that was killed
        except OSError as exc:
            self._close()
            raise ConfigError(f"{self.dst}: cannot use {self.root} to stage the conversion: {exc}") from exc
        return self

    def _lock(self) -> int:
        """Lock the staging directory, retrying while the one locked is not (any longer) the
        one at its path: a conversion that finishes removes it, then unlocks."""
        for _ in range(100):
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = os.fstat(fd)
                try:
                    current = os.stat(self.root, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
            except BaseException as exc:
                os.close(fd)
                if isinstance(exc, BlockingIOError):
                    raise ConfigError(f"{self.dst}: another conversion to this destination is running "
                                      f"(it writes {self.root})") from None
                raise
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)
        raise ConfigError(f"{self.dst}: could not lock {self.root}: it keeps being replaced")

    def publish(self) -> None:
        """Move the checked copy to the destination with one rename: over a file only with
        ``replace``; otherwise whatever appeared there meanwhile is left as it is."""
        try:
            if self.replace and not os.path.isdir(self.path):
                os.replace(self.path, self.final)
            elif os.path.isdir(self.path):
                os.rename(self.path, self.final)  # onto nothing (or an empty directory); never a checkpoint
            else:
                os.link(self.path, self.final)  # refused where a file exists, unlike a rename
                os.unlink(self.path)
        except OSError as exc:
            raise ConfigError(f"{self.dst}: the checked copy cannot be put in place ({exc}); something else "
                              "created it during the conversion, and it was left as it is") from exc
        fsync_dir(self.parent)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._clear()
            os.rmdir(self.root)  # while still locked: see _lock
        except OSError:
            pass  # removed by the next conversion to this destination
        finally:
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _clear(self) -> None:
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

"""The small files of a checkpoint directory, read as untrusted input.

``.metadata`` goes through the restricted unpickler and a structural check, the manifest
through a strict JSON check bound to the metadata bytes, and every file must be a regular
file of bounded size; data-file names from metadata are confined to the directory.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata

from . import commit, manifest
from .errors import CheckpointFormatError, DcpxError, UnsafeCheckpointError
from .metadata_check import check_metadata
from .safe_pickle import plugin_safe_globals, safe_loads
from .transform import read_bounded

MAX_METADATA_BYTES = 4 << 30


def directory(path: str | os.PathLike) -> str:
    """A checkpoint path as the string dcpx keeps; an empty one is the current directory,
    as stock torch's ``Path(path)`` makes it."""
    return os.fspath(path) or "."


class CheckpointDirectory:
    """The ``path`` of a writer or reader: a ``Path`` to callers, as stock torch's classes give
    it (also as ``checkpoint_id``), and inside dcpx the string ``directory()`` makes of it."""

    _dir: str

    @property
    def path(self) -> Path:
        return Path(self._dir)

    @path.setter
    def path(self, value: str | os.PathLike) -> None:
        self._dir = directory(value)

    @property
    def checkpoint_id(self) -> str | os.PathLike:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)


def _encodable(name: str) -> bool:
    """Whether ``name`` is a file name the system can be asked for (a lone surrogate is not)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def confine(root: str, relative: Any, where: str) -> str:
    """Resolve ``relative`` inside ``root`` or raise; symlinks may not lead outside."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or not _encodable(relative):
        raise UnsafeCheckpointError(f"{where}: invalid data file name {relative!r}")
    parts = relative.replace("\\", "/").split("/")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise UnsafeCheckpointError(f"{where}: data file name {relative!r} points outside the checkpoint directory")
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, relative))
    if os.path.commonpath([full, root_real]) != root_real:
        raise UnsafeCheckpointError(f"{where}: data file {relative!r} resolves outside the checkpoint directory")
    return full


def load_metadata(directory: str, name: str = commit.METADATA) -> tuple[Metadata, bytes]:
    """Read and validate ``.metadata`` with the restricted unpickler."""
    path = os.path.join(directory, name)
    where = f"{directory}/{name}"
    try:
        data = read_regular_file(path, MAX_METADATA_BYTES, where)
    except FileNotFoundError as exc:
        raise CheckpointFormatError(f"{directory}: not a checkpoint (no {name} file)") from exc
    with unforeseen_failures(where):
        metadata = safe_loads(data, where, plugin_safe_globals())
        check_metadata(metadata, where, len(data))
    return metadata, data


def load_manifest(directory: str, metadata: Metadata, metadata_bytes: bytes, covers: bool = True) -> dict[str, Any] | None:
    """The manifest belonging to ``metadata`` (verified against its bytes), or None if the
    checkpoint has none (written by stock torch).  With ``covers``, also check that it has
    an entry for every stored item; a reader holding keys checks the HMAC first instead, so
    that any edit of a keyed manifest reads as the forgery it is."""
    save_id = metadata.storage_meta.save_id if metadata.storage_meta is not None else None
    if not isinstance(save_id, str) or len(save_id) != 32 or not all(c in "0123456789abcdef" for c in save_id):
        return None
    path = manifest.path_in(directory, save_id)
    items = len(metadata.storage_data or {})
    try:
        data = read_regular_file(path, manifest.size_limit(items), f"{path} (manifest of {items} stored items)")
    except FileNotFoundError:
        return None
    with unforeseen_failures(path):
        body = manifest.loads(data, path, items)
        manifest.verify(body, metadata_bytes, path)
        if covers:
            manifest.check_covers(body, metadata.storage_data, path)
    return body


@contextmanager
def unforeseen_failures(where: str) -> Iterator[None]:
    """Turn any non-dcpx exception raised while checking ``where`` into a
    ``CheckpointFormatError`` naming it: damage no check foresaw (an integer too long to
    format in a message, a size no float holds) must still read as a damaged file, also
    for the tools (``inspect``, ``verify``) that call the loaders without the reader."""
    try:
        yield
    except DcpxError:
        raise
    except Exception as exc:
        raise CheckpointFormatError(f"{where}: cannot be read ({type(exc).__name__}: {_message(exc)})") from exc


def _message(exc: BaseException) -> str:
    """``str(exc)``, which itself fails for e.g. ``ValueError(10**5000)``."""
    try:
        return str(exc)
    except Exception:
        return "its message cannot be shown"


def open_regular(path: str, where: str) -> tuple[int, int]:
    """Open a file of the checkpoint for reading: (fd, size).  Regular files only, so a FIFO
    or device planted in the directory cannot hang or flood the reader; symlinks are
    followed only where the caller has confined the resolved path.  Raises
    ``FileNotFoundError`` unchanged so callers can say what is missing."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointFormatError(f"{where}: cannot open: {exc}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeCheckpointError(f"{where}: {os.path.basename(path)!r} is not a regular file")
    return fd, st.st_size


def read_regular_file(path: str, limit: int, where: str) -> bytes:
    """Read a small file of the checkpoint (metadata, manifest): at most ``limit`` bytes."""
    fd, size = open_regular(path, where)
    with os.fdopen(fd, "rb") as f:
        if size > limit:
            raise CheckpointFormatError(f"{where}: {size} bytes is more than the limit of {limit}")
        return read_bounded(f, limit)


def metadata_files(directory: str) -> list[str]:
    """The committed metadata files in ``directory``: ``.metadata`` and any rank-local
    ``__<rank>.metadata`` (saves with ``use_collectives=False``)."""
    try:
        return sorted(n for n in os.listdir(directory) if commit.METADATA_FILE.match(n))
    except FileNotFoundError:
        return []


def referenced_files(directory: str, names: Iterable[str] | None = None) -> set[str] | None:
    """Files the committed metadata files ``names`` (default: all of them) use, manifests
    included; None if one cannot be read safely (then nothing may be cleaned up)."""
    keep: set[str] = set()
    for name in metadata_files(directory) if names is None else names:
        if not os.path.exists(os.path.join(directory, name)):
            continue
        try:
            metadata, _ = load_metadata(directory, name)
        except DcpxError:
            return None
        keep.update(info.relative_path for info in (metadata.storage_data or {}).values() if isinstance(info, _StorageInfo))
        save_id = metadata.storage_meta.save_id if metadata.storage_meta is not None else None
        if isinstance(save_id, str):
            keep.add(manifest.manifest_name(save_id))
    return keep

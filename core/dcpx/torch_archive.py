"""``torch.save`` archives read from a checkpoint: stock torch's tensor items, non-tensor
entries, ``dcpx convert`` sources.

Two zip readers look at each archive: Python's ``zipfile`` here, to check it before
anything is inflated or unpickled, and torch's own reader inside ``torch.load``.  They
agree only on archives laid out as ``torch.save`` lays them out, so anything else is
refused: a check that one reader passes must hold for what the other reads.
"""

from __future__ import annotations

import io
import struct
import zipfile
from contextlib import contextmanager
from typing import IO, Any, Iterator

import torch

from .errors import CheckpointFormatError, UnsafeCheckpointError
from .pickle_nesting import check_nesting
from .safe_pickle import BUFFER_GLOBALS, safe_loads

_LOCAL_HEADER = b"PK\x03\x04"
_END = b"PK\x05\x06"  # end of central directory record, 22 bytes without a comment
_END64 = b"PK\x06\x06"  # zip64 end record, which torch.save always writes
_END64_LOCATOR = b"PK\x06\x07"  # 20 bytes, right before the end record
# torch's weights-only refusals that the buffer unpickler may answer: io.BytesIO, and b""
# (protocol 2 pickles it as a call of bytes, which torch refuses too)
_BUFFER_REFUSALS = ("GLOBAL _io.BytesIO ", "GLOBAL bytes ", "GLOBAL builtins.bytes ", "GLOBAL __builtin__.bytes ")


def check_stored_archive(stream: IO[bytes], where: str) -> None:
    """Refuse a ``torch.save`` zip archive whose members are compressed, or whose layout
    torch's reader could read otherwise than ``zipfile`` does.  ``torch.save`` stores members
    as they are, but ``torch.load`` inflates a DEFLATE member whole before any check: a 1 MB
    item could claim a gigabyte.  A zip archive this check cannot read is refused too
    (torch's own reader might read it, and inflate it), and so is anything but a zip archive
    (``torch.save`` has written nothing else since torch 1.6).  The pickle is walked for tuples
    nested deeper than hashing them survives (``pickle_nesting``)."""
    start = stream.tell()
    if stream.read(4) != _LOCAL_HEADER:
        stream.seek(start)
        raise CheckpointFormatError(f"{where}: not a torch.save archive (torch.save writes a zip archive, "
                                    "and this item does not start with one)")
    stream.seek(start)
    try:
        with zipfile.ZipFile(stream) as archive:
            infos = archive.infolist()
            packed = next((i for i in infos if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size), None)
            ambiguous = _ambiguity(stream, start, infos)
            pickles = [i for i in infos if packed is None and ambiguous is None
                       and i.filename.rpartition("/")[2] == "data.pkl"]
    except Exception as exc:  # zipfile raises many types on damaged input (NotImplementedError too)
        raise CheckpointFormatError(f"{where}: damaged torch.save archive ({type(exc).__name__}: {exc})") from exc
    finally:
        stream.seek(start)
    if ambiguous is not None:
        raise UnsafeCheckpointError(
            f"{where}: torch.save archive {ambiguous}; torch.save writes no such archive, and zip readers "
            "disagree on what it holds"
        )
    if packed is not None:
        raise UnsafeCheckpointError(
            f"{where}: torch.save archive member {packed.filename!r:.80} is compressed "
            f"({packed.compress_size} bytes that claim {packed.file_size}); torch.save never compresses, "
            "and inflating it would be unbounded"
        )
    for info in pickles:  # before torch's unpickler hashes a tuple nested too deep to survive
        with _member(stream, start, info, where) as pickled:
            check_nesting(pickled, where)


@contextmanager
def _member(stream: IO[bytes], start: int, info: zipfile.ZipInfo, where: str) -> Iterator[memoryview]:
    """The bytes of a stored (uncompressed) member, without a copy where ``stream`` is in memory."""
    stream.seek(start + info.header_offset)
    header = stream.read(30)
    if len(header) != 30 or header[:4] != _LOCAL_HEADER:
        raise CheckpointFormatError(f"{where}: damaged torch.save archive (no local header for {info.filename!r:.80})")
    at = start + info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    try:
        if isinstance(stream, io.BytesIO):  # getvalue() is the very bytes it was made from
            with memoryview(stream.getvalue()) as whole, whole[at:at + info.file_size] as view:
                if len(view) != info.file_size:
                    raise CheckpointFormatError(f"{where}: damaged torch.save archive ({info.filename!r:.80} is cut short)")
                yield view
        else:
            stream.seek(at)
            data = stream.read(info.file_size)
            if len(data) != info.file_size:
                raise CheckpointFormatError(f"{where}: damaged torch.save archive ({info.filename!r:.80} is cut short)")
            yield memoryview(data)
    finally:
        stream.seek(start)


def _ambiguity(stream: IO[bytes], start: int, infos: list[zipfile.ZipInfo]) -> str | None:
    """What in the archive's layout two zip readers could read differently, or None.

    ``zipfile`` finds the central directory right before the end record, wherever that
    record says it is, while torch's reader goes where it says; ``zipfile`` cuts names at a
    NUL, and torch's reader matches names without regard to case."""
    end = stream.seek(0, io.SEEK_END)
    if end - start < 22 + 20:
        return "is too short for its end records"
    stream.seek(end - 22 - 20)
    tail = stream.read(42)
    locator, record = tail[:20], tail[20:]
    if record[:4] != _END or record[20:22] != b"\0\0":
        return "has a comment or bytes after its end record"
    cd_size, cd_offset = struct.unpack_from("<II", record, 12)
    cd_end = end - 22
    if locator[:4] == _END64_LOCATOR:
        (end64,) = struct.unpack_from("<Q", locator, 8)
        stream.seek(start + end64)
        record64 = stream.read(56)
        if len(record64) != 56 or record64[:4] != _END64:
            return "has a zip64 locator that points at no zip64 end record"
        cd_size, cd_offset = struct.unpack_from("<QQ", record64, 40)
        cd_end = start + end64
    if start + cd_offset + cd_size != cd_end:
        return "has bytes between its central directory and its end records"
    names = [i.orig_filename for i in infos]
    if any("\0" in n for n in names):
        return "has a member name with a NUL byte"
    if len({n.lower() for n in names}) != len(names):
        return "has member names that differ only in case"
    return None


def load_weights_only(data: bytes | io.BytesIO, where: str, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` of a non-tensor entry; a refusal is an
    ``UnsafeCheckpointError`` naming the entry.

    torch's restricted unpickler admits tensors, containers and primitive values, plus any
    class the user allowed with ``torch.serialization.add_safe_globals``; entries of plain
    values and ``io.BytesIO`` buffers are read as ``_load_buffers`` says."""
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    check_stored_archive(stream, where)
    start = stream.tell()
    try:
        return torch.load(stream, weights_only=True, map_location=map_location)
    except Exception as exc:
        reason = weights_only_reason(str(exc)) + " "
        if any(refusal in reason for refusal in _BUFFER_REFUSALS):
            stream.seek(start)
            found = _load_buffers(stream, where)
            if found is not None:
                return found[0]
        raise UnsafeCheckpointError(
            f"{where}: non-tensor entry refused: it does not load with torch.load(weights_only=True) "
            f"({weights_only_reason(str(exc))}); allow trusted classes with "
            "torch.serialization.add_safe_globals, or read a checkpoint you trust with "
            "FileSystemReader(..., weights_only=False)"
        ) from exc


def _load_buffers(stream: IO[bytes], where: str) -> tuple[Any] | None:
    """A ``torch.save`` archive that holds no tensors, only plain values and ``io.BytesIO``
    buffers (DCP's idiom for extra state, which torch's weights-only unpickler refuses),
    unpickled with the allow-list unpickler (``BUFFER_GLOBALS`` admitted), as a 1-tuple;
    None where it holds anything else (the caller keeps torch's refusal).  The pickle is
    taken through torch's own zip reader: a planner that unpickles the entry again after this
    check gets the very bytes it checked."""
    try:
        pickled = torch._C.PyTorchFileReader(stream).get_record("data.pkl")
        return (safe_loads(pickled, where, BUFFER_GLOBALS),)
    except Exception:
        return None


def weights_only_reason(text: str) -> str:
    """The one informative sentence of torch's multi-paragraph weights-only error: the
    refused global."""
    detail = text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
    reason = " ".join(detail.split()).split(". ")[0]
    if reason:
        return reason
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = [line for line in lines if "GLOBAL" in line or "nsupported" in line]
    return (telling or lines or ["it holds objects other than tensors and plain values"])[0]

"""Checking every item of a checkpoint without a model or a process group.

Each framed item is decoded from the outside in, down to and including its outermost
integrity layer (a checksum, or authenticated encryption when a key is at hand), chunk by chunk
on a thread pool, and the item records the manifest keeps for the decoded layers (a
checksum's item digest) are checked against the chunks' records; an item stored as it is
gets its bytes checked against the CRC-32C the manifest records.  Nothing is loaded into
tensors.  Items with neither, or whose outermost check needs a key the reader lacks, are
"missing".

With ``full`` every layer is undone, as a load undoes them: what the outermost check cannot
see (bytes damaged before they were checksummed, ciphertext bound to another checkpoint id,
a stock item's archive) fails here instead of in the load.  That needs every key.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from .errors import DcpxError
from .framing import FRAME_DESCRIPTOR, RAW_DESCRIPTOR
from .pipeline import ItemDigests, decode_chunk
from .data_files import DataFiles
from .read_job import ReadJob
from .reader import FileSystemReader
from .torch_archive import load_weights_only
from .transform import ChunkInfo, holds_keys


@dataclass(frozen=True)
class ItemCheck:
    fqn: str
    shard_offsets: tuple[int, ...] | None
    file: str
    status: str  # "ok", "missing" (no integrity layer) or "failed"
    detail: str = ""
    stored_bytes: int = 0


def verify_checkpoint(
    path: str,
    *,
    transforms: Sequence[Any] | None = None,
    workers: int | None = None,
    on_item: Callable[[ItemCheck], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    full: bool = False,
) -> list[ItemCheck]:
    """Verify every item of the checkpoint at ``path``; never raises for a bad item.
    ``on_start`` learns how many items there are once ``.metadata`` is read; ``full`` decodes
    every layer of every item (see the module docstring)."""
    reader = FileSystemReader(path, transforms=transforms, workers=workers)
    metadata = reader.read_metadata()  # .metadata against the manifest, the manifest's HMAC as a load checks it
    reader.set_up_storage_reader(metadata, True)
    unstored = [ItemCheck(fqn, offsets, "", "failed", f"{fqn}: .metadata lists it but stores no item for it")
                for fqn, offsets in _unstored(metadata)]
    if on_start is not None:
        on_start(len(metadata.storage_data or {}) + len(unstored))
    files = DataFiles(path)
    results: list[ItemCheck] = []
    for check in unstored:
        results.append(check)
        if on_item is not None:
            on_item(check)
    try:
        with ThreadPoolExecutor(reader.workers, thread_name_prefix="dcpx-verify") as pool:
            for check in pool.map(lambda pair: _check(reader, files, *pair, full), _requests(metadata)):
                results.append(check)
                if on_item is not None:
                    on_item(check)
    finally:
        files.close()
    return results


def _unstored(metadata: Any) -> list[tuple[str, tuple[int, ...] | None]]:
    """Entries (a tensor's chunks) of ``state_dict_metadata`` with no stored item: a load
    that asks for them fails, so the checkpoint cannot be called verified."""
    keys = [(getattr(i, "fqn", None), getattr(i, "offset", None)) for i in metadata.storage_data or {}]
    stored = {(fqn, tuple(offset) if offset is not None else None) for fqn, offset in keys}
    listed: list[tuple[str, tuple[int, ...] | None]] = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            listed.extend((fqn, tuple(c.offsets)) for c in md.chunks)
        else:
            listed.append((fqn, None))
    return [key for key in listed if key not in stored]


def _requests(metadata: Any) -> Iterator[tuple[MetadataIndex, ReadItem]]:
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            continue
        md = metadata.state_dict_metadata.get(index.fqn)
        if isinstance(md, TensorStorageMetadata):
            sizes = next((c.sizes for c in md.chunks if tuple(c.offsets) == tuple(index.offset or ())), None)
            sizes = torch.Size(sizes if sizes is not None else [])
            req = ReadItem(LoadItemType.TENSOR, index, torch.Size([0] * len(sizes)), index,
                           torch.Size([0] * len(sizes)), sizes)
        else:
            req = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
        yield index, req


_files_lock = threading.Lock()
# a non-tensor entry is decoded whole (up to max_item_bytes, twice that at peak): one at a
# time, as a load decodes them, so that memory does not grow with the number of threads
_entry_lock = threading.Lock()


def _check(reader: FileSystemReader, files: DataFiles, index: MetadataIndex, req: ReadItem, full: bool) -> ItemCheck:
    info = reader.storage_data[index]
    offsets = tuple(index.offset) if index.offset is not None else None
    base = dict(fqn=index.fqn, shard_offsets=offsets, file=str(info.relative_path), stored_bytes=int(info.length or 0))
    try:
        with _files_lock:
            job = reader.prepare(req, files)
        with job.file.use():
            return _check_job(job, base, full)
    except DcpxError as exc:
        return ItemCheck(status="failed", detail=str(exc), **base)
    except OSError as exc:  # the system refused a read (an I/O error), as a load reports it
        return ItemCheck(status="failed", detail=f"{index.fqn}: cannot read the data file: {exc}", **base)


def _check_job(job: ReadJob, base: dict[str, Any], full: bool) -> ItemCheck:
    """Check one prepared item, its data file open."""
    raw = job.descriptors[:1] == [RAW_DESCRIPTOR]
    if full and raw:
        job.check_raw()  # its size, as a load checks it
    if job.descriptors == [RAW_DESCRIPTOR] and job.length == 0:
        return ItemCheck(status="ok", detail="empty tensor: no bytes stored", **base)
    decodable = True
    if job.descriptors[:1] == [FRAME_DESCRIPTOR]:
        status, detail, decodable = _check_frames(job, full)
    elif job.recorded_crc is not None:
        job.verify_stored()
        status, detail = "ok", "crc32c recorded in the manifest"
    else:
        status, detail = "missing", "no integrity transform"
    if not full or not decodable:
        return ItemCheck(status=status, detail=detail, **base)
    if not job.is_tensor:  # every layer again, then unpickled as a default (weights-only) load does
        with _entry_lock:
            load_weights_only(job.run(None), job.where)
    elif raw:  # nothing to decode: its size is checked above, its bytes by the CRC-32C if any
        return ItemCheck(status=status, detail=detail, **base)
    elif job.descriptors[:1] != [FRAME_DESCRIPTOR]:
        job.stored_tensor()  # a stock item: its torch.save archive, through its transforms
    detail = "no integrity transform" if status == "missing" else detail
    return ItemCheck(status=status, detail=f"decoded; {detail}", **base)


def _check_frames(job: ReadJob, full: bool) -> tuple[str, str, bool]:
    """A framed item, chunk by chunk down to its outermost integrity layer (``full``: every
    layer): its status, what checked it, and whether it could be decoded at all (keys)."""
    index_, chain, item = job.frame()
    checks = [i for i, t in enumerate(chain.transforms) if t.verifies_integrity]
    if not checks and not full:
        return "missing", "no integrity transform", False
    depth = 0 if full else max(checks)  # innermost-first index of the last layer to undo
    keyless = [i for i in range(depth, len(chain.transforms)) if holds_keys(chain.transforms[i]) is False]
    if keyless:
        return "missing", f"{chain.descriptors[keyless[-1]]}: no key to {'decode' if full else 'check'} it with", False
    digests = ItemDigests(chain, item, index_.count, job.records, stop=depth)
    for k, stored_at in enumerate(index_.stored_offsets()):
        start, end = index_.raw_span(k)
        sizes = index_.layer_sizes[k]
        chunk = ChunkInfo(item, k, index_.count, start, end - start)
        decode_chunk(chain, job.pread(stored_at, sizes[-1]), chunk, sizes, stop=depth, digests=digests)
    digests.check()
    if not checks:
        return "missing", "no integrity transform", True
    return "ok", _detail(chain.descriptors[max(checks)], digests), True


def _detail(descriptor: str, digests: ItemDigests) -> str:
    """What verified the item: its outermost integrity layer, and whether item records too."""
    return f"{descriptor} (and item digest)" if digests else descriptor

"""``FileSystemReader``: DCP's ``StorageReader`` that treats the checkpoint as untrusted.

Every path is confined to the checkpoint directory, every offset and length is checked
against the file, every decode is bounded by the recorded raw size, and nothing from the
checkpoint is unpickled outside an allow-list.  Reads dcpx checkpoints and everything stock
torch 2.13 writes (torch.save items, with or without torch's zstd extension).
"""

from __future__ import annotations

import copy
import io
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from . import commit, manifest
from .descriptor import parse
from .errors import CheckpointFormatError, DcpxError, IntegrityError, PolicyError, UnsafeCheckpointError
from .framing import FOOTER, FRAME_DESCRIPTOR, MARKERS, RAW_DESCRIPTOR, FrameIndex, parse_footer, parse_index
from .pipeline import BoundChain, codec_pool, decode_range, default_workers
from .plugins import as_transform, host
from .safe_pickle import plugin_safe_globals, safe_loads
from .tensor_bytes import element_size, writable_bytes
from .transform import ItemInfo, Transform, descriptor_name, read_bounded, transform_name

MAX_METADATA_BYTES = 4 << 30
# torch.save wraps a tensor's bytes in a small zip archive; allow that much on top.
TORCH_SAVE_OVERHEAD = 1 << 20


@dataclass
class _OpenFile:
    fd: int
    size: int


class FileSystemReader(StorageReader):
    """Drop-in replacement for ``torch.distributed.checkpoint.FileSystemReader``.

    * ``transforms``: configured transforms for reading (e.g. an ``encrypt`` transform
      holding keys).  Descriptors in the checkpoint choose what runs; these only supply
      reader-side configuration.  Everything else is rebuilt from the plugin registry.
    * ``require``: transform names every item must carry (e.g. ``["encrypt"]``); an item
      without them is refused before its bytes are read.
    * ``checkpoint_id``: refuse a checkpoint whose dcpx checkpoint id differs (anti-replay).
    * ``max_item_bytes``: upper bound for a non-tensor item's decoded size.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        _extension_registry: Any = None,
        *,
        transforms: Sequence[Any] | None = None,
        require: Sequence[str] = (),
        checkpoint_id: str | None = None,
        workers: int | None = None,
        max_item_bytes: int = 1 << 30,
    ) -> None:
        super().__init__()
        self.fs = FileSystem()
        self.path = os.fspath(path)
        self.workers = workers or default_workers()
        self.max_item_bytes = max_item_bytes
        self.expected_checkpoint_id = checkpoint_id
        self._configured: dict[str, Transform] = {}
        for spec in transforms or ():
            t = host().create(spec) if isinstance(spec, str) else as_transform(spec)
            self._configured[transform_name(t)] = t
        if _extension_registry is not None:
            for name, cls in getattr(_extension_registry, "extensions", {}).items():
                host()._add("torch-extension-registry", cls)
        self.require = [host().resolve_name(r) if "@" not in r and "/" not in r else r for r in require]
        self._cache: dict[str, Transform] = {}
        self.storage_data: dict[MetadataIndex, Any] = {}
        self.metadata: Metadata | None = None
        self.manifest: dict[str, Any] | None = None
        self.metadata_error: DcpxError | None = None
        self.rank: int | None = None
        self.use_collectives = True

    # -- StorageReader protocol ---------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        self.metadata = None
        self.metadata_error = None
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)

    @property
    def checkpoint_id(self) -> str | os.PathLike:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None and self.metadata_error is not None and os.path.lexists(os.path.join(self.path, commit.METADATA)):
            # the global metadata exists but was refused: never fall back to a stale rank-local one
            raise self.metadata_error
        name = commit.METADATA if rank is None else f"__{rank}{commit.METADATA}"
        try:
            metadata, data = load_metadata(self.path, name)
            self.manifest = load_manifest(self.path, metadata, data)
            self._authenticate_manifest(metadata, data)
            if self.expected_checkpoint_id is not None:
                found = metadata.storage_meta.save_id if metadata.storage_meta else None
                if found != self.expected_checkpoint_id:
                    raise PolicyError(
                        f"{self.path}: checkpoint id is {found!r}, the caller expected {self.expected_checkpoint_id!r}"
                    )
        except DcpxError as exc:
            # torch retries with rank-local metadata and then raises a bare AssertionError;
            # keep the first, informative error for dcpx.load to re-raise
            if self.metadata_error is None:
                self.metadata_error = exc
            raise
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def _authenticate_manifest(self, metadata: Metadata, data: bytes) -> None:
        """Check the manifest's HMAC when a key for it is at hand.  A checkpoint whose items
        use a keyed transform must carry a keyed manifest, so deleting or replacing the
        manifest (to hide an edit of ``.metadata``) is detected by a reader holding the key."""
        claim = (self.manifest or {}).get("hmac_key")
        keyed = {n: t for n, t in self._configured.items() if callable(getattr(t, "manifest_key_for", None))}
        used = {descriptor_name(d) for info in (metadata.storage_data or {}).values()
                if isinstance(info, _StorageInfo) for d in (info.transform_descriptors or ()) if isinstance(d, str)}
        if not isinstance(claim, dict):
            if keyed.keys() & used:
                raise IntegrityError(
                    f"{self.path}: items use {sorted(keyed.keys() & used)} but the checkpoint has no keyed manifest; "
                    "its manifest was removed or replaced"
                )
            return
        name, key_id = str(claim.get("transform")), str(claim.get("key_id"))
        transform = keyed.get(name)
        if transform is None:
            try:
                transform = host().create(name)  # default configuration, e.g. keys from the environment
            except DcpxError:
                return
        lookup = getattr(transform, "manifest_key_for", None)
        if not callable(lookup):
            return
        try:
            key = lookup(key_id)
        except DcpxError:
            if name in keyed:
                raise
            return  # no key here: the items themselves cannot be decrypted either
        manifest.verify(self.manifest, data, f"{self.path}/{manifest.manifest_name(str(metadata.storage_meta.save_id))}", key)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.metadata = metadata
        self.storage_data = metadata.storage_data
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        if not isinstance(self.storage_data, dict):
            raise CheckpointFormatError(f"{self.path}: metadata has no storage table")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        files: dict[str, _OpenFile] = {}
        try:
            jobs = [self._prepare(req, files) for req in plan.items]
            targets = [(job, planner.resolve_tensor(job.req).detach() if job.is_tensor else None) for job in jobs]
            item_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dcpx-reader")
            try:
                futures = [item_pool.submit(job.run, target) for job, target in targets]
                for (job, target), fut in zip(targets, futures):
                    value = fut.result()
                    if job.is_tensor:
                        planner.commit_tensor(job.req, value)
                    else:
                        planner.load_bytes(job.req, io.BytesIO(value))
            finally:
                item_pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for f in files.values():
                os.close(f.fd)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # -- one item -----------------------------------------------------------------------
    def _prepare(self, req: ReadItem, files: dict[str, _OpenFile]) -> "_ReadJob":
        info = self.storage_data.get(req.storage_index)
        fqn = req.storage_index.fqn
        if not isinstance(info, _StorageInfo):
            raise CheckpointFormatError(f"{fqn}: no storage entry for this item in {self.path}/.metadata")
        rel, offset, length = info.relative_path, info.offset, info.length
        where = f"{fqn} (file {rel!r}, offset {offset}, length {length})"
        if not (isinstance(offset, int) and isinstance(length, int)) or offset < 0 or length < 0:
            raise CheckpointFormatError(f"{where}: offset and length must be non-negative integers")
        descriptors = list(info.transform_descriptors or [])
        if not all(isinstance(d, str) for d in descriptors):
            raise CheckpointFormatError(f"{where}: transform descriptors must be strings")
        self._check_policy(where, descriptors)
        opened = files.get(rel)
        if opened is None:
            full = confine(self.path, rel, where)
            try:
                # O_NONBLOCK: opening a FIFO planted in the directory must not hang
                fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            except FileNotFoundError as exc:
                raise CheckpointFormatError(f"{where}: data file is missing") from exc
            except OSError as exc:
                raise CheckpointFormatError(f"{where}: cannot open data file: {exc}") from exc
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise UnsafeCheckpointError(f"{where}: {rel!r} is not a regular file")
            opened = files[rel] = _OpenFile(fd, st.st_size)
        if offset + length > opened.size:
            raise CheckpointFormatError(
                f"{where}: item ends at byte {offset + length} but the file has only {opened.size} bytes (truncated?)"
            )
        expected = self._expected(req, where)
        return _ReadJob(self, req, where, opened, offset, length, descriptors, expected)

    def _check_policy(self, where: str, descriptors: list[str]) -> None:
        names = {descriptor_name(d) for d in descriptors}
        missing = [r for r in self.require if r not in names]
        if missing:
            raise PolicyError(f"{where}: item lacks required transform(s) {missing}; it carries {sorted(names) or 'none'}")

    def _expected(self, req: ReadItem, where: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        if req.type == LoadItemType.BYTE_IO:
            return None
        md = self.metadata.state_dict_metadata.get(req.storage_index.fqn) if self.metadata else None
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointFormatError(f"{where}: metadata has no tensor entry for this item")
        offsets = tuple(req.storage_index.offset or ())
        for chunk in md.chunks:
            if tuple(chunk.offsets) == offsets:
                shape = tuple(int(s) for s in chunk.sizes)
                if any(s < 0 for s in shape):
                    raise CheckpointFormatError(f"{where}: negative size in metadata")
                return md.properties.dtype, shape
        raise CheckpointFormatError(f"{where}: metadata has no chunk at offsets {offsets}")

    def transform_for(self, text: str, where: str) -> Transform:
        cached = self._cache.get(text)
        if cached is None:
            try:
                name = descriptor_name(text)
                configured = self._configured.get(name)
                cached = configured.with_descriptor(parse(text)) if configured is not None else host().from_descriptor(text)
            except DcpxError as exc:
                raise type(exc)(f"{where}: {exc}") from exc
            self._cache[text] = cached
        return cached


class _ReadJob:
    """Everything needed to decode one read request; ``run`` executes on a worker thread."""

    def __init__(self, reader: FileSystemReader, req: ReadItem, where: str, f: _OpenFile, offset: int,
                 length: int, descriptors: list[str], expected: tuple[torch.dtype, tuple[int, ...]] | None) -> None:
        self.reader, self.req, self.where, self.file = reader, req, where, f
        self.offset, self.length, self.descriptors, self.expected = offset, length, descriptors, expected
        self.is_tensor = expected is not None

    def pread(self, pos: int, size: int) -> bytes:
        """Read ``size`` stored bytes at item-relative ``pos``; short reads are errors."""
        if pos < 0 or size < 0 or pos + size > self.length:
            raise CheckpointFormatError(f"{self.where}: read of {size} bytes at {pos} leaves the item")
        data = os.pread(self.file.fd, size, self.offset + pos)
        if len(data) != size:
            raise CheckpointFormatError(f"{self.where}: file is shorter than recorded (truncated)")
        return data

    def run(self, target: torch.Tensor | None) -> Any:
        try:
            if self.descriptors and self.descriptors[0] in MARKERS:
                return self._native(target)
            return self._stock(target)
        except DcpxError as exc:
            if self.where in str(exc):
                raise
            named = copy.copy(exc)  # keeps a plugin error's attributes (digests, key ids)
            named.args = (f"{self.where}: {exc}",)
            raise named from exc

    # dcpx items: raw bytes or framed chunks -------------------------------------------
    def _native(self, target: torch.Tensor | None) -> Any:
        marker, chain_desc = self.descriptors[0], self.descriptors[1:]
        item = self.item_info()
        raw_size = item.nbytes if self.expected is not None else None
        if marker == RAW_DESCRIPTOR:
            if chain_desc:
                raise CheckpointFormatError(f"{self.where}: a raw item cannot list transforms {chain_desc}")
            if raw_size is not None and self.length != raw_size:
                raise CheckpointFormatError(f"{self.where}: raw item holds {self.length} bytes, metadata expects {raw_size}")
            size = self.length if raw_size is None else raw_size

            def fill(lo: int, hi: int, out: memoryview) -> None:
                n = os.preadv(self.file.fd, [out], self.offset + lo)
                if n != hi - lo:
                    raise CheckpointFormatError(f"{self.where}: file is shorter than recorded (truncated)")
        else:
            index, chain = self.frame(raw_size)
            size = index.raw_size
            item = ItemInfo(item.fqn, size, item.dtype, item.shape, item.offsets, item.checkpoint_id)
            pool = codec_pool(self.reader.workers) if index.count > 1 else None

            def fill(lo: int, hi: int, out: memoryview) -> None:
                decode_range(index, chain, item, self.pread, lo, hi, out, pool)
        if self.expected is None:
            buf = bytearray(size)
            fill(0, size, memoryview(buf))
            return bytes(buf)
        return self._into_tensor(target, fill)

    def frame(self, raw_size: int | None) -> tuple[FrameIndex, BoundChain]:
        """Validate a framed item's index and build its decode chain."""
        chain_desc = self.descriptors[1:]
        if self.descriptors[0] != FRAME_DESCRIPTOR or not chain_desc:
            raise CheckpointFormatError(f"{self.where}: malformed dcpx descriptor list {self.descriptors}")
        footer = self.pread(self.length - FOOTER.size, FOOTER.size) if self.length >= FOOTER.size else b""
        index_len = parse_footer(footer, self.length, self.where)
        body = self.pread(self.length - FOOTER.size - index_len, index_len)
        limit = self.reader.max_item_bytes if raw_size is None else raw_size
        index = parse_index(footer, body, self.length, len(chain_desc), self.where, raw_size, limit)
        innermost_first = list(reversed(chain_desc))
        transforms = tuple(self.reader.transform_for(d, self.where) for d in innermost_first)
        return index, BoundChain(transforms, tuple(innermost_first))

    def item_info(self) -> ItemInfo:
        if self.expected is None:
            return ItemInfo(self.req.storage_index.fqn, 0, checkpoint_id=self._checkpoint_id())
        dtype, shape = self.expected
        return ItemInfo(self.req.storage_index.fqn, math.prod(shape) * element_size(dtype), dtype, shape,
                        tuple(self.req.storage_index.offset or ()), self._checkpoint_id())

    def _into_tensor(self, target: torch.Tensor, fill: Any) -> torch.Tensor:
        dtype, shape = self.expected
        req = self.req
        lengths = tuple(int(x) for x in req.lengths)
        offsets = tuple(int(x) for x in req.storage_offsets)
        if tuple(target.shape) != lengths:
            raise CheckpointFormatError(f"{self.where}: destination has shape {tuple(target.shape)}, read expects {lengths}")
        if any(o < 0 or o + n > s for o, n, s in zip(offsets, lengths, shape)) or len(offsets) != len(shape):
            raise CheckpointFormatError(f"{self.where}: requested region {offsets}+{lengths} is outside the stored shape {shape}")
        itemsize = element_size(dtype)
        if math.prod(lengths) == 0:  # the frame, if any, was validated in _native
            return target
        # rows: the request is a contiguous byte range when only the leading dim is narrowed
        leading_only = all(o == 0 and n == s for o, n, s in zip(offsets[1:], lengths[1:], shape[1:]))
        if leading_only:
            row = math.prod(shape[1:]) * itemsize
            lo = (offsets[0] if shape else 0) * row
            hi = lo + math.prod(lengths) * itemsize
            direct = writable_bytes(target) if target.dtype == dtype else None
            if direct is not None:
                fill(lo, hi, direct)
                return target
            tmp = torch.empty(lengths, dtype=dtype)
            fill(lo, hi, writable_bytes(tmp))
            target.copy_(tmp)
            return target
        tmp = torch.empty(shape, dtype=dtype)
        fill(0, tmp.nbytes, writable_bytes(tmp))
        region = tmp
        for dim, (o, n) in enumerate(zip(offsets, lengths)):
            region = region.narrow(dim, o, n)
        target.copy_(region)
        return target

    # stock torch items: torch.save payloads through torch-style stream transforms ------
    def _stock(self, target: torch.Tensor | None) -> Any:
        stream: Any = io.BytesIO(self.pread(0, self.length))
        # stock torch records descriptors innermost first; undo the outermost first
        for text in reversed(self.descriptors):
            stream = self.reader.transform_for(text, self.where).transform_from(stream)
        if self.expected is None:
            data = read_bounded(stream, self.reader.max_item_bytes + 1)
            if len(data) > self.reader.max_item_bytes:
                raise CheckpointFormatError(f"{self.where}: item decodes to more than {self.reader.max_item_bytes} bytes")
            return data
        dtype, shape = self.expected
        limit = math.prod(shape) * element_size(dtype) + TORCH_SAVE_OVERHEAD
        data = read_bounded(stream, limit + 1)
        if len(data) > limit:
            raise CheckpointFormatError(f"{self.where}: item decodes to more bytes than its tensor can hold")
        try:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointFormatError(f"{self.where}: not a valid torch.save tensor ({type(exc).__name__}: {exc})") from exc
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointFormatError(f"{self.where}: stored tensor does not match metadata ({dtype}, {shape})")
        region = tensor
        for dim, (o, n) in enumerate(zip(self.req.storage_offsets, self.req.lengths)):
            region = region.narrow(dim, int(o), int(n))
        if tuple(target.shape) != tuple(region.shape):
            raise CheckpointFormatError(f"{self.where}: destination has shape {tuple(target.shape)}, read expects {tuple(region.shape)}")
        target.copy_(region)
        return target

    def _checkpoint_id(self) -> str:
        md = self.reader.metadata
        return str(md.storage_meta.save_id or "") if md is not None and md.storage_meta is not None else ""


def confine(root: str, relative: Any, where: str) -> str:
    """Resolve ``relative`` inside ``root`` or raise; symlinks may not lead outside."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
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
    metadata = safe_loads(data, where, plugin_safe_globals())
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointFormatError(f"{where}: does not hold DCP Metadata")
    if metadata.storage_data is not None and not isinstance(metadata.storage_data, dict):
        raise CheckpointFormatError(f"{where}: storage table is not a mapping")
    return metadata, data


def load_manifest(directory: str, metadata: Metadata, metadata_bytes: bytes) -> dict[str, Any] | None:
    """The manifest belonging to ``metadata`` (verified against its bytes), or None if the
    checkpoint has none (written by stock torch)."""
    save_id = metadata.storage_meta.save_id if metadata.storage_meta is not None else None
    if not isinstance(save_id, str) or len(save_id) != 32 or not all(c in "0123456789abcdef" for c in save_id):
        return None
    path = manifest.path_in(directory, save_id)
    try:
        data = read_regular_file(path, manifest.MAX_MANIFEST_BYTES, path)
    except FileNotFoundError:
        return None
    body = manifest.loads(data, path)
    manifest.verify(body, metadata_bytes, path)
    return body


def read_regular_file(path: str, limit: int, where: str) -> bytes:
    """Read a small file from the checkpoint: regular files only (a FIFO or device planted
    there must not hang or flood the reader), at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointFormatError(f"{where}: cannot open: {exc}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeCheckpointError(f"{where}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise CheckpointFormatError(f"{where}: {st.st_size} bytes is more than the limit of {limit}")
        return read_bounded(f, limit)


def referenced_files(directory: str) -> set[str] | None:
    """Files the committed checkpoint in ``directory`` uses; None if it cannot be read safely
    (then nothing may be cleaned up)."""
    if not os.path.exists(os.path.join(directory, commit.METADATA)):
        return set()
    try:
        metadata, _ = load_metadata(directory)
    except DcpxError:
        return None
    keep = {info.relative_path for info in (metadata.storage_data or {}).values() if isinstance(info, _StorageInfo)}
    save_id = metadata.storage_meta.save_id if metadata.storage_meta is not None else None
    if isinstance(save_id, str):
        keep.add(manifest.manifest_name(save_id))
    return keep

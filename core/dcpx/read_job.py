"""Decoding one read request into its destination, on a worker thread.

dcpx items are raw bytes (read straight into the destination tensor) or framed chunks
(decoded in parallel, only those a partial read overlaps); stock torch items are
``torch.save`` payloads behind torch-style stream transforms, loaded with
``weights_only=True``.  Every size comes from metadata and is checked before use.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch.distributed.checkpoint.planner import ReadItem

from . import digest
from .data_files import DataFile
from .errors import CheckpointFormatError, DcpxError
from .framing import FOOTER, FRAME_DESCRIPTOR, MARKERS, RAW_DESCRIPTOR, FrameIndex, parse_footer, parse_index
from .manifest import SAVE_ID_RECORD
from .pipeline import BoundChain, ItemDigests, codec_pool, decode_range
from .torch_archive import check_stored_archive, weights_only_reason
from .safetensors_io import starts_safetensors_file
from .tensor_bytes import QUANTIZED, element_size, region, writable_bytes
from .transform import ItemInfo, read_bounded, stream_limit

if TYPE_CHECKING:
    from .reader import FileSystemReader


# torch.save wraps a tensor's bytes in a small zip archive; allow that much on top.
TORCH_SAVE_OVERHEAD = 1 << 20
WIDEST_ELEMENT = 16  # complex128
# stream transforms an unframed item may list (stock torch writes one; each is a nested reader)
MAX_STREAM_LAYERS = 16


class ItemView(io.RawIOBase):
    """A read-only, seekable window on one item of a data file, read with ``pread`` (no
    shared file position, so items are read from several threads at once)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise ValueError(f"seek to {base + pos}, before the start of the item")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(view.nbytes, self._length - self._pos))
        if n == 0:
            return 0
        got = os.preadv(self._fd, [view[:n]], self._offset + self._pos)
        self._pos += got
        return got


class ReadJob:
    """Everything needed to decode one read request; ``run`` executes on a worker thread."""

    def __init__(self, reader: FileSystemReader, req: ReadItem, where: str, f: DataFile, offset: int,
                 length: int, descriptors: list[str], expected: tuple[torch.dtype, tuple[int, ...]] | None,
                 recorded: Mapping[str, Any] | None = None) -> None:
        self.reader, self.req, self.where, self.file = reader, req, where, f
        self.offset, self.length, self.descriptors, self.expected = offset, length, descriptors, expected
        self.is_tensor = expected is not None
        recorded = recorded or {}
        # the manifest's per-transform records of a framed item (e.g. a checksum's item digest)
        self.records: Mapping[str, Any] = recorded.get("records") or {}
        # the manifest's CRC-32C, checked for items stored as they are (raw, untransformed)
        self.recorded_crc = self.records.get(digest.RECORD) if descriptors in ([], [RAW_DESCRIPTOR]) else None
        # the size the writer recorded: a framed non-tensor item must decode to exactly that
        self.recorded_raw: int | None = recorded.get("raw_size")

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
            with self.file.use():
                if self.descriptors and self.descriptors[0] in MARKERS:
                    return self._native(target)
                return self._stock(target)
        except DcpxError as exc:
            if self.where in str(exc):
                raise
            named = copy.copy(exc)  # keeps a plugin error's attributes (digests, key ids)
            named.args = (f"{self.where}: {exc}",)
            raise named from exc
        except OSError as exc:  # the system refused a read (an I/O error): say where
            raise CheckpointFormatError(f"{self.where}: cannot read the data file: {exc}") from exc

    # dcpx items: raw bytes or framed chunks -------------------------------------------
    def _native(self, target: torch.Tensor | None) -> Any:
        marker = self.descriptors[0]
        if marker == RAW_DESCRIPTOR:
            self.check_raw()
            size = self._entry_size() if self.expected is None else self.item_info().nbytes

            def fill(lo: int, hi: int, out: memoryview) -> None:
                if self.recorded_crc is not None and (lo, hi) == (0, self.length):
                    self._read_checked(out)
                else:
                    self._read_into(lo, out)
        else:
            index, chain, item = self.frame()
            size = index.raw_size
            pool = codec_pool(self.reader.workers) if index.count > 1 else None
            digests = ItemDigests(chain, item, index.count, self.records)

            def fill(lo: int, hi: int, out: memoryview) -> None:
                decode_range(index, chain, item, self.pread, lo, hi, out, pool, digests, self.reader.workers)
                self._check_item(digests, out)
        if self.expected is None:
            # pages of an empty tensor are only touched as chunks decode into them: a raw size
            # a forged index claims (up to max_item_bytes) costs nothing until data backs it
            buf = torch.empty(size, dtype=torch.uint8).numpy()
            fill(0, size, memoryview(buf))
            return buf.tobytes()
        return self._into_tensor(target, fill)

    def _entry_size(self) -> int:
        """The size of a non-tensor entry stored as it is, refused before it is read when
        it exceeds ``max_item_bytes``."""
        if self.length > self.reader.max_item_bytes:
            raise CheckpointFormatError(f"{self.where}: entry holds {self.length} bytes, more than "
                                        f"max_item_bytes={self.reader.max_item_bytes}")
        return self.length

    def check_raw(self) -> None:
        """A raw item lists no transforms and, for a tensor, holds exactly its bytes."""
        if self.descriptors[1:]:
            raise CheckpointFormatError(f"{self.where}: a raw item cannot list transforms {self.descriptors[1:]}")
        raw_size = self.item_info().nbytes if self.expected is not None else None
        if raw_size is not None and self.length != raw_size:
            raise CheckpointFormatError(f"{self.where}: raw item holds {self.length} bytes, metadata expects {raw_size}")

    def _read_into(self, pos: int, out: memoryview) -> None:
        """Fill ``out`` with the stored bytes at item-relative ``pos`` (one ``preadv``)."""
        if os.preadv(self.file.fd, [out], self.offset + pos) != out.nbytes:
            raise CheckpointFormatError(f"{self.where}: file is shorter than recorded (truncated)")

    def _read_checked(self, out: memoryview, block: int = 1 << 20) -> None:
        """Read the whole item into ``out`` and check it against the manifest's CRC-32C.
        Each block is summed while it is still in the CPU cache, which keeps the check to a
        fraction of the copy; on a mismatch ``out`` is zeroed before the error is raised."""
        value = 0
        for pos in range(0, out.nbytes, block):
            part = out[pos:pos + block]
            self._read_into(pos, part)
            value = digest.crc(part, value)
        try:
            digest.check(value, self.recorded_crc, self.where)
        except DcpxError:
            if out.nbytes and not out.readonly:
                torch.frombuffer(out, dtype=torch.uint8).zero_()
            raise

    def _check_item(self, digests: ItemDigests, out: memoryview) -> None:
        """Check the item records once every chunk is decoded.  Chunks decode straight into
        ``out``, which may be the destination tensor: on a mismatch it is zeroed before the
        error is raised, so no chunk from the wrong place is left in it."""
        try:
            digests.check()
        except DcpxError:
            if out.nbytes and not out.readonly:
                torch.frombuffer(out, dtype=torch.uint8).zero_()
            raise

    def verify_stored(self, block: int = 16 << 20) -> None:
        """Check an item stored as it is against the manifest's CRC-32C, reading it in
        blocks (``dcpx verify``: nothing is loaded)."""
        value = 0
        for pos in range(0, self.length, block):
            value = digest.crc(self.pread(pos, min(block, self.length - pos)), value)
        digest.check(value, self.recorded_crc, self.where)

    def frame(self) -> tuple[FrameIndex, BoundChain, ItemInfo]:
        """Validate a framed item's index and build its decode chain; with them the
        ``ItemInfo`` its chunks were encoded against (a non-tensor item's size is the
        index's, as the writer saw it), the one place load and ``verify`` take it from.
        The index must hold the tensor's size, or for a non-tensor item the size the
        manifest records (at most ``max_item_bytes``)."""
        raw_size = self.item_info().nbytes if self.expected is not None else self.recorded_raw
        chain_desc = self.descriptors[1:]
        if self.descriptors[0] != FRAME_DESCRIPTOR or not chain_desc:
            raise CheckpointFormatError(f"{self.where}: malformed dcpx descriptor list {self.descriptors}")
        footer = self.pread(self.length - FOOTER.size, FOOTER.size) if self.length >= FOOTER.size else b""
        index_len = parse_footer(footer, self.length, self.where)
        body = self.pread(self.length - FOOTER.size - index_len, index_len)
        limit = self.reader.max_item_bytes if self.expected is None else raw_size
        index = parse_index(footer, body, self.length, len(chain_desc), self.where, raw_size, limit)
        innermost_first = list(reversed(chain_desc))
        transforms = tuple(self.reader.transform_for(d, self.where) for d in innermost_first)
        item = dataclasses.replace(self.item_info(), nbytes=index.raw_size)
        return index, BoundChain(transforms, tuple(innermost_first)), item

    def item_info(self) -> ItemInfo:
        if self.expected is None:
            return ItemInfo(self.req.storage_index.fqn, 0, checkpoint_id=self._checkpoint_id())
        dtype, shape = self.expected
        return ItemInfo(self.req.storage_index.fqn, math.prod(shape) * element_size(dtype), dtype, shape,
                        tuple(self.req.storage_index.offset or ()), self._checkpoint_id())

    def _leading_only(self) -> bool:
        """Whether the request narrows only the leading dimension, i.e. asks for one
        contiguous byte range of the stored item."""
        shape = self.expected[1] if self.expected else ()
        return all(int(o) == 0 and int(n) == s
                   for o, n, s in zip(self.req.storage_offsets[1:], self.req.lengths[1:], shape[1:]))

    def reads_in_place(self, target: torch.Tensor | None) -> bool:
        """Whether ``run`` reads the stored bytes straight into ``target``'s own memory,
        holding no buffer of its own (a raw item asked for whole rows, same dtype)."""
        return (target is not None and self.descriptors == [RAW_DESCRIPTOR] and target.dtype == self.expected[0]
                and self._leading_only() and writable_bytes(target) is not None)

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
        if self._leading_only():
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
        target.copy_(region(tmp, offsets, lengths))
        return target

    # stock torch items: torch.save payloads through torch-style stream transforms ------
    def _decoded(self, limit: int) -> bytes:
        """The item's bytes through its torch-style stream transforms: at most ``limit + 1``
        of them (the caller refuses more).  A dcpx layer, which decodes all at once, may not
        claim more than that either (a forged header would otherwise size its buffer); a
        transform's own failure (torch's zstd fed bytes that are not zstd) names the item."""
        if len(self.descriptors) > MAX_STREAM_LAYERS:
            raise CheckpointFormatError(f"{self.where}: lists {len(self.descriptors)} stream transforms; "
                                        f"an item without a dcpx frame is read through at most {MAX_STREAM_LAYERS}")
        stream: Any = io.BytesIO(self.pread(0, self.length))
        try:
            with stream_limit(limit):
                # stock torch records descriptors innermost first; undo the outermost first
                for text in reversed(self.descriptors):
                    stream = self.reader.transform_for(text, self.where).transform_from(stream)
            return read_bounded(stream, limit + 1)
        except DcpxError:
            raise
        except Exception as exc:
            raise CheckpointFormatError(f"{self.where}: its stream transforms {self.descriptors} cannot decode it "
                                        f"({type(exc).__name__}: {str(exc)[:200]})") from exc

    def _stock(self, target: torch.Tensor | None) -> Any:
        if self.expected is None:
            if not self.descriptors:
                self._entry_size()
            data = self._decoded(self.reader.max_item_bytes)
            if len(data) > self.reader.max_item_bytes:
                raise CheckpointFormatError(f"{self.where}: item decodes to more than {self.reader.max_item_bytes} bytes")
            if self.recorded_crc is not None:
                digest.check(digest.crc(data), self.recorded_crc, self.where)
            return data
        wanted = region(self.stored_tensor(), self.req.storage_offsets, self.req.lengths)
        if tuple(target.shape) != tuple(wanted.shape):
            raise CheckpointFormatError(f"{self.where}: destination has shape {tuple(target.shape)}, read expects {tuple(wanted.shape)}")
        try:
            target.copy_(wanted)
        except RuntimeError as exc:  # e.g. a quantized tensor stored where metadata records another dtype
            raise CheckpointFormatError(f"{self.where}: the stored {wanted.dtype} tensor cannot be copied into the "
                                        f"{target.dtype} destination ({exc})") from exc
        return target

    def stored_tensor(self) -> torch.Tensor:
        """The whole tensor a stock item stores, loaded ``weights_only``.  Its dtype may differ
        from the metadata's: stock's writer stores what a planner that casts in ``resolve_data``
        returns, and stock's reader casts it into the destination (so does ``_stock``)."""
        dtype, shape = self.expected
        numel = math.prod(shape)
        if self.descriptors:  # decoded in memory: bounded by the recorded tensor, whatever a forger packs
            limit = numel * element_size(dtype) + TORCH_SAVE_OVERHEAD
            data = self._decoded(limit)
            if len(data) > limit:
                raise CheckpointFormatError(f"{self.where}: item decodes to more bytes than its {dtype} tensor can hold "
                                            "(stock items cast to a wider dtype are read only without transforms)")
            source: Any = io.BytesIO(data)
        else:  # torch.load reads the storage straight from the file, as stock torch does: every byte
            # is on disk, so the bound allows a planner's cast to the widest dtype
            if self.length > numel * max(element_size(dtype), WIDEST_ELEMENT) + TORCH_SAVE_OVERHEAD:
                raise CheckpointFormatError(f"{self.where}: item holds more bytes than its tensor can")
            source = ItemView(self.file.fd, self.offset, self.length)
        if starts_safetensors_file(os.pread(self.file.fd, 9, self.offset)):
            raise CheckpointFormatError(
                f"{self.where}: holds a safetensors header, not a torch.save tensor: stock torch's "
                "serialization_format=SAFETENSORS records offsets that point every tensor at the start of "
                "its file, so neither stock torch nor dcpx can read it back"
            )
        check_stored_archive(source, self.where)
        try:
            tensor = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointFormatError(
                f"{self.where}: not a valid torch.save tensor ({type(exc).__name__}: {weights_only_reason(str(exc))})"
            ) from exc
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise CheckpointFormatError(f"{self.where}: stored tensor does not match metadata ({dtype}, {shape})")
        if tensor.dtype != dtype and (tensor.dtype in QUANTIZED or dtype in QUANTIZED):
            raise CheckpointFormatError(f"{self.where}: stores a {tensor.dtype} tensor where metadata records "
                                        f"{dtype}; no cast copies one into the other")
        return tensor

    def _checkpoint_id(self) -> str:
        """The id the item's bytes are bound to: the checkpoint's, unless the item records one
        of its own (a rank that wrote a cached plan; see plan_data.py)."""
        own = self.records.get(SAVE_ID_RECORD)
        if own is not None:
            return own
        md = self.reader.metadata
        return str(md.storage_meta.save_id or "") if md is not None and md.storage_meta is not None else ""

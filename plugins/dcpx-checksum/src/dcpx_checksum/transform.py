"""``stream.checksum@dcpx``: a digest per chunk, verified before the bytes go any further.

Where it sits in a chain is the user's choice.  Last (``[zstd, encrypt, checksum]``) it
covers the stored bytes, so anyone can check a checkpoint for corruption without keys or
decompression; first (``[checksum, zstd]``) it covers the tensor's own bytes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import dcpx
from dcpx.transform import ChunkInfo, ItemInfo

from . import algorithms, trailer
from .errors import ChecksumFramingError, ChecksumMismatchError

PARAM = "algorithm"


def _bytes(data: object) -> memoryview:
    """A flat unsigned-byte view of ``data`` without copying it."""
    view = memoryview(data)  # type: ignore[arg-type]
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _where(chunk: ChunkInfo) -> str:
    return f"item {chunk.item.fqn!r} chunk {chunk.index} (of {chunk.count})"


class ChecksumTransform(dcpx.Transform):
    """Appends a digest of each chunk on save; checks it on load before returning the bytes.

    ``algorithm`` is ``"crc32c"`` (default), ``"xxh3-128"`` or ``"sha256"``.  Instances are
    immutable, hence safe to share between the pipeline's threads.
    """

    name = "stream.checksum@dcpx"
    version = 1
    #: decode proves the bytes intact, so ``dcpx verify`` stops at this layer (no keys needed
    #: for what lies beneath, e.g. encryption)
    verifies_integrity = True

    def __init__(self, algorithm: str = algorithms.DEFAULT_ALGORITHM) -> None:
        self.algorithm = algorithms.get(algorithm)
        self._footer = trailer.footer(self.algorithm)
        self._trailer_size = trailer.trailer_size(self.algorithm)

    # -- configuration --------------------------------------------------------------
    def params(self) -> dict[str, str]:
        # Recorded even when it is the default, so a future default cannot misread old data.
        return {PARAM: self.algorithm.name}

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> "ChecksumTransform":
        if version != cls.version:
            raise dcpx.DescriptorError(f"{cls.name}: unsupported version {version} (this plugin reads {cls.version})")
        unknown = sorted(set(params) - {PARAM})
        if unknown:
            raise dcpx.DescriptorError(f"{cls.name}: unknown parameters {unknown}")
        if PARAM not in params:
            raise dcpx.DescriptorError(f"{cls.name}: descriptor lacks the {PARAM!r} parameter")
        if params[PARAM] not in algorithms.ALGORITHMS:
            raise dcpx.DescriptorError(
                f"{cls.name}: unknown algorithm {params[PARAM]!r} (this plugin reads {sorted(algorithms.ALGORITHMS)})"
            )
        return cls(params[PARAM])

    # -- chunk API ------------------------------------------------------------------
    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        view = _bytes(data)
        # One allocation and one copy of the payload: the contract returns a single buffer.
        return b"".join((view, self.algorithm.digest(view), self._footer))

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> memoryview:
        view = _bytes(data)
        self._check(view, chunk, size)
        return view[:size]  # verified; a zero-copy prefix of the input

    def verify(self, data: memoryview, chunk: ChunkInfo, size: int) -> str:
        """Check one encoded chunk without keeping the payload; return its digest (hex).

        For a keyless ``dcpx verify``: ``size`` is the payload length recorded for this layer.
        Raises ``ChecksumMismatchError`` / ``ChecksumFramingError`` exactly like ``decode``.
        """
        return self._check(_bytes(data), chunk, size).hex()

    def _check(self, view: memoryview, chunk: ChunkInfo, size: int) -> bytes:
        alg = self.algorithm
        expected_len = size + self._trailer_size
        if size < 0 or len(view) != expected_len:
            self._raise_length(view, chunk, size, expected_len)
        digest_end = size + alg.digest_size
        actual = alg.digest(view[:size])
        stored = bytes(view[size:digest_end])
        problem = trailer.footer_problem(bytes(view[digest_end:]), alg)
        if problem is not None:
            raise ChecksumFramingError(
                f"{self.name}: {_where(chunk)}: {problem}; {alg.name} expected {stored.hex()} (stored), "
                f"actual {actual.hex()} (computed from the stored bytes)",
                fqn=chunk.item.fqn, chunk_index=chunk.index, algorithm=alg.name,
                expected=stored.hex(), actual=actual.hex(),
            )
        if stored != actual:
            raise ChecksumMismatchError(
                f"{self.name}: {_where(chunk)}: {alg.name} mismatch: expected {stored.hex()} "
                f"(recorded at save), actual {actual.hex()} (computed from the stored bytes)",
                fqn=chunk.item.fqn, chunk_index=chunk.index, algorithm=alg.name,
                expected=stored.hex(), actual=actual.hex(),
            )
        return actual

    def _raise_length(self, view: memoryview, chunk: ChunkInfo, size: int, expected_len: int) -> None:
        found = len(view)
        layout = f"{size} payload bytes + {self._trailer_size}-byte {self.algorithm.name} trailer"
        if found < expected_len:
            what = f"truncated: {found} bytes stored, expected {expected_len} ({layout})"
        else:
            what = (f"{found - expected_len} unexpected trailing bytes: {found} bytes stored, "
                    f"expected {expected_len} ({layout})")
        writer = trailer.writer_of(view)
        if writer is not None and writer is not self.algorithm and found == size + trailer.trailer_size(writer):
            what = f"written with {writer.name}, but the descriptor says {self.algorithm.name}; {what}"
        raise ChecksumFramingError(
            f"{self.name}: {_where(chunk)}: {what}; digest not checked",
            fqn=chunk.item.fqn, chunk_index=chunk.index, algorithm=self.algorithm.name,
        )

    # -- manifest records -------------------------------------------------------------
    def chunk_record(self, encoded: memoryview, chunk: ChunkInfo) -> str:
        """The chunk's digest (hex), read from the trailer ``encode`` just wrote."""
        view = _bytes(encoded)
        footer_at = len(view) - trailer.FOOTER_SIZE
        problem = trailer.footer_problem(bytes(view[max(footer_at, 0):]), self.algorithm)
        if len(view) < self._trailer_size or problem is not None:
            raise ChecksumFramingError(
                f"{self.name}: {_where(chunk)}: no valid {self.algorithm.name} trailer to record"
                + (f" ({problem})" if problem else ""),
                fqn=chunk.item.fqn, chunk_index=chunk.index, algorithm=self.algorithm.name,
            )
        return bytes(view[footer_at - self.algorithm.digest_size:footer_at]).hex()

    def item_record(self, item: ItemInfo, chunk_records: Sequence[str | None]) -> str:
        """The item digest: the same algorithm over the chunk digests concatenated in chunk
        order (hex).  Digests have a fixed length, so the concatenation is unambiguous; an
        item with no chunks gets the digest of no bytes."""
        size = self.algorithm.digest_size
        parts: list[bytes] = []
        for index, record in enumerate(chunk_records):
            try:
                digest = bytes.fromhex(record or "")
            except ValueError:
                digest = b""
            if len(digest) != size:
                raise dcpx.CheckpointFormatError(
                    f"{self.name}: item {item.fqn!r} chunk {index}: record {record!r} is not a "
                    f"{self.algorithm.name} digest"
                )
            parts.append(digest)
        return self.algorithm.digest(memoryview(b"".join(parts))).hex()

    def verify_item(self, item: ItemInfo, chunk_records: Sequence[str | None], recorded: str) -> None:
        """Compare the item digest recomputed from verified chunk digests with the one the
        manifest recorded; catches chunks that are intact on their own but reordered, swapped
        or dropped."""
        actual = self.item_record(item, chunk_records)
        if actual != recorded:
            raise ChecksumMismatchError(
                f"{self.name}: item {item.fqn!r}: {self.algorithm.name} item digest mismatch: "
                f"expected {recorded} (manifest), actual {actual} (from the {len(chunk_records)} stored chunks)",
                fqn=item.fqn, algorithm=self.algorithm.name, expected=recorded, actual=actual,
            )

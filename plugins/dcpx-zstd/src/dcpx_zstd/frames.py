"""Where zstd frames begin and end, read from their headers alone.

zstd's stream reader reports a stream cut inside a frame (even one missing only the last
byte of its checksum) as a clean end of data.  ``FrameWalker`` follows frame headers,
block headers and checksums, skipping block payloads without looking at them, so a
reader can tell a complete stream from a cut one at the cost of a few operations per
128 KiB block.
"""

from __future__ import annotations

import dcpx

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
_FCS_BYTES = (0, 2, 4, 8)
_DICT_ID_BYTES = (0, 1, 2, 4)


class FrameWalker:
    """Follows zstd frame boundaries in the compressed bytes as they pass by.

    zstd's stream reader reports a stream cut inside a frame as a clean end of data; the
    walker tracks frame headers, block headers and checksums (skipping block payloads
    without looking at them), so the reader can tell a complete stream from a cut one.
    """

    def __init__(self) -> None:
        self.frames = 0
        self._state, self._need = "magic", 4
        self._buf = bytearray()
        self._skip = 0
        self._checksum = False

    def feed(self, data: memoryview) -> None:
        i, end = 0, len(data)
        while i < end:
            if self._skip:
                step = min(self._skip, end - i)
                self._skip -= step
                i += step
                continue
            step = min(self._need - len(self._buf), end - i)
            self._buf += data[i:i + step]
            i += step
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                self._advance(field)

    def complete(self) -> bool:
        """True between frames, after at least one."""
        return self.frames > 0 and self._between_frames()

    def empty(self) -> bool:
        """True if not a single byte has been seen."""
        return self.frames == 0 and self._between_frames()

    def _between_frames(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip

    def _advance(self, field: bytes) -> None:
        value = int.from_bytes(field, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif value & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._state, self._need = "skippable", 4
            else:
                raise dcpx.CheckpointFormatError(f"not a zstd frame (magic 0x{value:08x})")
        elif self._state == "skippable":
            self._skip, self.frames = value, self.frames + 1
            self._state, self._need = "magic", 4
        elif self._state == "descriptor":
            single = (value >> 5) & 1
            self._checksum = bool((value >> 2) & 1)
            fcs = _FCS_BYTES[value >> 6] or single
            rest = (0 if single else 1) + _DICT_ID_BYTES[value & 3] + fcs
            self._state, self._need = ("header", rest) if rest else ("block", 3)
        elif self._state == "header":
            self._state, self._need = "block", 3
        elif self._state == "block":
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise dcpx.CheckpointFormatError("corrupt zstd stream: reserved block type")
            self._skip = 1 if kind == 1 else size
            if not last:
                self._state, self._need = "block", 3
            elif self._checksum:
                self._state, self._need = "checksum", 4
            else:
                self._state, self._need, self.frames = "magic", 4, self.frames + 1
        else:  # checksum
            self._state, self._need, self.frames = "magic", 4, self.frames + 1

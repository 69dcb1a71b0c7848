"""Byte grouping: reorder the bytes of fixed-width words so that zstd sees like with like.

Trained weights are nearly incompressible as a byte stream, because every element mixes
a low-entropy exponent with high-entropy mantissa bits.  Split into *planes* (one byte of
every element per plane), the exponent bytes form a stream with 2-4 bits of entropy that
zstd's Huffman stage shrinks well, while the mantissa planes can be stored as they are.

Two families of layouts, all lossless for any input bytes (they only permute bits):

* ``int16``/``int32``/``int64``: plain byte planes of little-endian words; plane ``k``
  holds byte ``k`` of every word.
* ``bfloat16``/``float32``/``float64``: the top 16 bits of every word are rotated left by
  two, then the word is cut into byte planes.  The top byte (the "head" plane) then holds
  the exponent without its most significant bit plus the leading mantissa bit, which is
  skewed given the exponent.  The next byte (the "sign" plane) holds six mantissa bits,
  the sign, and in bit 0 the exponent's top bit, which is 0 for every value of magnitude
  below 2, i.e. nearly all weights: such a plane packs into 7 bits per byte (see
  ``packing``).  Lower bytes are plain planes.  Compared with a plain split, the head
  plane no longer carries the random sign bit, and the constant bit leaves the sign plane
  cheaply.
* ``float16`` (IEEE half, 5 exponent bits): rotated left by one, moving only the sign to
  the bottom; the head plane is the whole exponent plus three mantissa bits.  With a
  5-bit exponent the two-bit rotation gains nothing (measured: slightly worse), so half
  precision uses the simpler form.

Two implementations compute exactly the same bytes (see ``kernels``): compiled C, one pass
over memory, and the whole-array numpy arithmetic below (shifts, masks, narrowing and
widening copies), which is the reference and the fallback.  Both release the GIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np

from . import kernels

NONE = "none"


@dataclass(frozen=True)
class Layout:
    """How one chunk is cut into planes.  ``width`` is the word size in bytes (1 = none)."""

    name: str
    width: int
    rotate: int = 0  # floats: rotate the top 16 bits left by this much before cutting
    pack_sign: bool = False  # floats: the second plane's bit 0 is usually clear

    @property
    def is_float(self) -> bool:
        return self.rotate > 0

    @property
    def planes(self) -> int:
        return self.width if self.width > 1 else 1

    @property
    def sign_plane(self) -> int | None:
        """Index of the plane whose bit 0 is usually clear (7-bit packing candidate)."""
        return self.planes - 2 if self.pack_sign else None

    def words(self, size: int) -> tuple[int, int]:
        """(number of whole words, length of the trailing partial word) for ``size`` bytes."""
        return divmod(size, self.width)

    def split(self, data: memoryview, compiled: bool | None = None) -> tuple[list[np.ndarray | memoryview], memoryview]:
        """Planes (in storage order) and the tail bytes that do not fill a whole word."""
        n, _ = self.words(len(data))
        if self.width == 1:
            return [data], data[len(data):]
        planes = [np.empty(n, dtype=np.uint8) for _ in range(self.planes)]
        if kernels.use_compiled(compiled):
            kernels.native.split(data[: n * self.width], self.width, self.rotate, planes)
            return planes, data[n * self.width:]
        words = np.frombuffer(data, dtype=_word_dtype(self.width), count=n)
        if self.is_float:
            _blockwise(partial(_split_float, rotate=self.rotate), words, planes)
        else:
            _blockwise(_split_bytes, words, planes)
        return planes, data[n * self.width:]

    def join(self, planes: Sequence[Buffer], tail: Buffer, out: np.ndarray, compiled: bool | None = None) -> None:
        """Inverse of ``split``: write the reassembled bytes into ``out`` (uint8, exact size)."""
        n, _ = self.words(out.size)
        if self.width == 1:
            out[:n] = np.frombuffer(planes[0], dtype=np.uint8)
        elif kernels.use_compiled(compiled):
            kernels.native.join(planes, self.width, self.rotate, out[: n * self.width])
        else:
            words = out[: n * self.width].view(_word_dtype(self.width))
            arrays = [np.frombuffer(p, dtype=np.uint8) for p in planes]
            if self.is_float:
                _blockwise(partial(_join_float, rotate=self.rotate), words, arrays)
            else:
                _blockwise(_join_bytes, words, arrays)
        out[n * self.width:] = np.frombuffer(tail, dtype=np.uint8)


Buffer = bytes | bytearray | memoryview | np.ndarray

# numpy fallback ------------------------------------------------------------------------
# Words per pass.  Several whole-array passes over a 4 MiB chunk would stream every
# intermediate through main memory; blocks of 64 Ki words keep one block's arrays in the
# L2 cache, while the per-call overhead stays small.  Only contiguous arrays are touched:
# numpy's strided byte copies run at a fraction of the speed of its vectorised arithmetic.
BLOCK = 1 << 16


def _word_dtype(width: int) -> np.dtype:
    # Little-endian on every host, so a checkpoint's planes mean the same everywhere.
    return np.dtype(f"<u{width}")


@dataclass
class _Scratch:
    """Per-call work arrays for one block: two 16-bit and one word-sized."""

    a: np.ndarray
    b: np.ndarray
    word: np.ndarray

    def cut(self, m: int) -> "_Scratch":
        return _Scratch(self.a[:m], self.b[:m], self.word[:m])


Kernel = Callable[[np.ndarray, list[np.ndarray], _Scratch], None]


def _blockwise(kernel: Kernel, words: np.ndarray, planes: list[np.ndarray]) -> None:
    """Run ``kernel`` over ``words`` and the matching slices of ``planes``, block by block."""
    native = words.dtype.newbyteorder("=")
    size = min(BLOCK, words.size)
    scratch = _Scratch(np.empty(size, np.uint16), np.empty(size, np.uint16), np.empty(size, native))
    for start in range(0, words.size, BLOCK):
        stop = min(start + BLOCK, words.size)
        kernel(words[start:stop], [p[start:stop] for p in planes], scratch.cut(stop - start))


def _shift_up(words: np.ndarray, bits: int) -> None:
    """``words <<= bits`` in place, as a multiplication: numpy vectorises integer multiply
    for every width, but not every left shift (unsigned arithmetic wraps the same way)."""
    np.multiply(words, words.dtype.type(1 << bits), out=words)


def _split_bytes(words: np.ndarray, planes: list[np.ndarray], s: _Scratch) -> None:
    np.copyto(planes[0], words, casting="unsafe")  # narrowing keeps the low byte
    for k in range(1, len(planes)):
        np.right_shift(words, 8 * k, out=s.word)
        np.copyto(planes[k], s.word, casting="unsafe")


def _join_bytes(words: np.ndarray, planes: list[np.ndarray], s: _Scratch) -> None:
    np.copyto(words, planes[0])
    for k in range(1, len(planes)):
        np.copyto(s.word, planes[k])
        _shift_up(s.word, 8 * k)
        np.bitwise_or(words, s.word, out=words)


def _split_float(words: np.ndarray, planes: list[np.ndarray], s: _Scratch, rotate: int) -> None:
    *rest, sign, head = planes
    bits = 8 * words.dtype.itemsize
    if bits == 16:
        np.copyto(s.b, words)
    else:
        np.right_shift(words, bits - 16, out=s.word)
        np.copyto(s.b, s.word, casting="unsafe")  # the top 16 bits
    np.multiply(s.b, np.uint16(1 << rotate), out=s.a)  # rotate them left
    np.right_shift(s.b, 16 - rotate, out=s.b)
    np.bitwise_or(s.a, s.b, out=s.a)
    np.copyto(sign, s.a, casting="unsafe")  # low byte of the rotated half
    np.right_shift(s.a, 8, out=s.a)
    np.copyto(head, s.a, casting="unsafe")
    if rest:
        _split_bytes(words, rest, s)


def _join_float(words: np.ndarray, planes: list[np.ndarray], s: _Scratch, rotate: int) -> None:
    *rest, sign, head = planes
    bits = 8 * words.dtype.itemsize
    np.copyto(s.a, head)
    np.multiply(s.a, np.uint16(1 << 8), out=s.a)
    np.copyto(s.b, sign)
    np.bitwise_or(s.a, s.b, out=s.a)
    np.right_shift(s.a, rotate, out=s.b)  # rotate back
    np.multiply(s.a, np.uint16(1 << (16 - rotate)), out=s.a)
    if bits == 16:
        np.bitwise_or(s.a, s.b, out=words)
        return
    np.bitwise_or(s.a, s.b, out=s.a)
    np.copyto(words, s.a)
    _shift_up(words, bits - 16)
    for k, plane in enumerate(rest):
        np.copyto(s.word, plane)
        if k:
            _shift_up(s.word, 8 * k)
        np.bitwise_or(words, s.word, out=words)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(NONE, 1),
        Layout("int16", 2),
        Layout("int32", 4),
        Layout("int64", 8),
        Layout("float16", 2, rotate=1),
        Layout("bfloat16", 2, rotate=2, pack_sign=True),
        Layout("float32", 4, rotate=2, pack_sign=True),
        Layout("float64", 8, rotate=2, pack_sign=True),
    )
}

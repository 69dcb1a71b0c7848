"""``stream.zstd``: zstd compression, torch-compatible by default on the wire, float-aware
when dcpx writes it.

Two formats share the name torch gave zstd:

* ``stream.zstd/1`` (no parameters) is exactly torch's: every chunk, and every stream made
  with ``transform_to``, is plain zstd.  Stock torch reads it, and this class reads what
  stock torch writes.
* ``stream.zstd/1;group=<layout>`` is dcpx's: each chunk carries a kind byte (stored or
  planes) and its bytes are grouped by significance first (see ``grouping``).  Stock torch
  refuses the parameter instead of misreading the data.
"""

from __future__ import annotations

from typing import IO, Mapping

import numpy as np
import torch

import dcpx
from dcpx import ChunkInfo, ItemInfo

from . import framing
from .codec import compressor, decompress_stream
from .grouping import LAYOUTS, NONE, Layout
from .streams import StreamReader, open_writer

AUTO = "auto"
DEFAULT_LEVEL = 3
DEFAULT_RAW_THRESHOLD = 0.95
MIN_LEVEL, MAX_LEVEL = -(1 << 17), 22
GROUP_PARAM = "group"


class ZstdTransform(dcpx.Transform):
    """zstd with optional byte grouping of floating-point tensors.

    Options (keyword arguments of ``dcpx.transform("zstd", ...)``):

    * ``level``: zstd level, negative (fast) levels included.  Byte planes of floats use a
      Huffman-first profile at every level below 16 (see ``codec``); other data uses the
      level as zstd defines it.  Not recorded: a reader does not need it.
    * ``grouping``: ``"auto"`` (byte-group floating-point tensors by their dtype, leave
      everything else as it is), ``"none"``, a layout name (``bfloat16``, ``float16``,
      ``float32``, ``float64``, ``int16``, ``int32``, ``int64``) applied to every item, or a dtype
      (``torch.bfloat16`` or its name) meaning "as auto would for that dtype".
    * ``raw_threshold``: a chunk, or a plane of one, that does not shrink below this
      fraction of its size is stored as it is (cheaper to read back, barely larger).
    * ``torch_format``: write torch's plain format (``stream.zstd/1``) instead.
    """

    name = "stream.zstd"
    version = 1

    def __init__(
        self,
        level: int = DEFAULT_LEVEL,
        grouping: str | torch.dtype = AUTO,
        raw_threshold: float = DEFAULT_RAW_THRESHOLD,
        torch_format: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(level, bool) or not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
            raise dcpx.ConfigError(f"{self.name}: level must be an integer from {MIN_LEVEL} to {MAX_LEVEL}, got {level!r}")
        if isinstance(raw_threshold, bool) or not isinstance(raw_threshold, (int, float)) or not 0 < raw_threshold <= 1:
            raise dcpx.ConfigError(f"{self.name}: raw_threshold must be a number in (0, 1], got {raw_threshold!r}")
        self.level = level
        self.raw_threshold = float(raw_threshold)
        self.torch_format = bool(torch_format)
        self.grouping, self._layout, self._entropy = _resolve_grouping(grouping, self.name)
        if self.torch_format and self.grouping not in (AUTO, NONE):
            raise dcpx.ConfigError(f"{self.name}: torch_format=True writes plain zstd; it cannot apply grouping={grouping!r}")
        self._variants: dict[tuple[str, bool], ZstdTransform] = {}
        self._text = self.get_descriptor()  # for error messages, formatted once

    # -- configuration ------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """The layout ``encode`` uses (``none`` while ``grouping="auto"`` awaits an item)."""
        return self._layout

    def params(self) -> dict[str, str]:
        return {} if self.torch_format else {GROUP_PARAM: self._layout.name}

    @classmethod
    def from_params(cls, version: int, params: Mapping[str, str]) -> "ZstdTransform":
        if version != cls.version:
            raise dcpx.DescriptorError(f"{cls.name}: unsupported version {version} (this plugin reads {cls.version})")
        unknown = sorted(set(params) - {GROUP_PARAM})
        if unknown:
            raise dcpx.DescriptorError(f"{cls.name}: unknown parameters {unknown}")
        if not params:
            return cls(torch_format=True)
        group = params[GROUP_PARAM]
        if group not in LAYOUTS:
            raise dcpx.DescriptorError(f"{cls.name}: unknown byte grouping {group!r} (known: {sorted(LAYOUTS)})")
        return cls(grouping=group)

    def for_item(self, item: ItemInfo) -> "ZstdTransform":
        if self.torch_format or self.grouping != AUTO:
            return self
        layout, entropy = auto_grouping(item.dtype)
        key = (layout, entropy)
        variant = self._variants.get(key)
        if variant is None:
            variant = ZstdTransform(self.level, layout, self.raw_threshold)
            variant._entropy = entropy
            variant = self._variants.setdefault(key, variant)
        return variant

    def torch_compatible(self) -> "ZstdTransform":
        return self if self.torch_format else ZstdTransform(self.level, torch_format=True)

    # -- chunks -------------------------------------------------------------------------
    def encode(self, data: memoryview, chunk: ChunkInfo) -> bytes:
        data = _bytes_view(data)
        if self.torch_format:
            return compressor(self.level, False).compress(data)
        return framing.encode(data, self._layout, compressor(self.level, self._entropy), self.raw_threshold)

    def decode(self, data: memoryview, chunk: ChunkInfo, size: int) -> bytes | bytearray | memoryview:
        where = self._where(chunk)
        data = _bytes_view(data)
        if self.torch_format:
            return decompress_stream(data, size, where)
        return framing.decode(data, self._layout, size, where)

    def decode_into(self, data: memoryview, chunk: ChunkInfo, out: memoryview) -> None:
        if self.torch_format:
            return super().decode_into(data, chunk, out)
        framing.decode(_bytes_view(data), self._layout, out.nbytes, self._where(chunk), np.frombuffer(out, dtype=np.uint8))

    def _where(self, chunk: ChunkInfo) -> str:
        return f"{self._text}: item {chunk.item.fqn!r} chunk {chunk.index}"

    # -- torch's stream API ---------------------------------------------------------------
    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return open_writer(output, self.level) if self.torch_format else super().transform_to(output)

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return StreamReader(input, self._text) if self.torch_format else super().transform_from(input)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<ZstdTransform {self.get_descriptor()} level={self.level} grouping={self.grouping}>"


def _bytes_view(data: memoryview) -> memoryview:
    """A flat unsigned-byte view (the pipeline passes one already; other callers may not)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def auto_grouping(dtype: torch.dtype | None) -> tuple[str, bool]:
    """(layout, entropy profile) that ``grouping="auto"`` picks for a dtype.

    Floats get the layout of their format (complex numbers are pairs of floats); one-byte
    floats (float8 variants) have nothing to group but still get the Huffman-first
    profile.  Multi-byte integers get plain byte planes at the configured level: ids,
    indices and counts leave their high planes nearly constant, which plain zstd only
    finds as short matches, at a tenth of the speed (see docs/compression.md).  One-byte
    types and non-tensor entries are left to plain zstd.
    """
    if dtype is None:
        return NONE, False
    if dtype == torch.bfloat16:
        return "bfloat16", True
    if dtype.is_complex:
        return _FLOAT_BY_WIDTH.get(dtype.itemsize // 2, NONE), True
    if dtype.is_floating_point or "float" in str(dtype):
        return _FLOAT_BY_WIDTH.get(dtype.itemsize, NONE), True
    return _INT_BY_WIDTH.get(dtype.itemsize, NONE), False


_FLOAT_BY_WIDTH = {2: "float16", 4: "float32", 8: "float64"}
_INT_BY_WIDTH = {2: "int16", 4: "int32", 8: "int64"}


def _resolve_grouping(grouping: object, name: str) -> tuple[str, Layout, bool]:
    """(grouping as given, layout to use now, entropy profile) for a ``grouping`` option."""
    if grouping == AUTO:
        return AUTO, LAYOUTS[NONE], False
    if isinstance(grouping, str) and grouping in LAYOUTS:
        return grouping, LAYOUTS[grouping], LAYOUTS[grouping].is_float
    dtype = grouping if isinstance(grouping, torch.dtype) else getattr(torch, grouping, None) if isinstance(grouping, str) else None
    if not isinstance(dtype, torch.dtype):
        raise dcpx.ConfigError(
            f"{name}: grouping must be 'auto', a layout ({', '.join(sorted(LAYOUTS))}) or a torch dtype, got {grouping!r}"
        )
    layout, entropy = auto_grouping(dtype)
    return layout, LAYOUTS[layout], entropy

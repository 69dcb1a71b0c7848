"""Hostile or damaged checkpoints: every failure is a dcpx error naming the item, never a hang,
never code execution."""

from __future__ import annotations

import glob
import io
import os
import pickle
import shutil
import signal
import struct
import zlib
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import dcpx
import dcpx.checkpoint_files
import dcpx.inspect
import dcpx.verify
from checkpoint_helpers import rewrite_metadata, storage_items
from dcpx import framing

CHUNK = 4096


class Gadget:
    """Pickles to a call of ``os.mkdir(sentinel)``: proof of code execution if it ever runs."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (os.mkdir, (self.sentinel,))


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {"model.w": torch.randn(40, 100, generator=g), "model.b": torch.arange(16.0), "extra": {"note": "hi"}}


def _dest() -> dict[str, Any]:
    return {"model.w": torch.zeros(40, 100), "model.b": torch.zeros(16), "extra": {"note": None}}


@pytest.fixture(params=["framed", "raw"])
def ckpt(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A small checkpoint: "framed" = zstd in 4 KiB chunks, "raw" = no transforms."""
    path = tmp_path / "ckpt"
    transforms = ["zstd"] if request.param == "framed" else None
    dcpx.save(_state(), path, transforms=transforms, chunk_size=CHUNK)
    return path


@pytest.fixture
def framed(tmp_path: Path) -> Path:
    path = tmp_path / "framed"
    dcpx.save(_state(), path, transforms=["zstd"], chunk_size=CHUNK)
    return path


def _items(path: Path) -> dict[str, Any]:
    return storage_items(dcpx.reader.load_metadata(str(path))[0])


ANY_FQN = "<any fqn>"  # items share a data file; whichever is read first may report it
FQNS = ("model.w", "model.b", "extra.note")


def expect_refusal(path: Path, watchdog: dict[str, bool], error: type[BaseException], *needles: str,
                   dest: dict[str, Any] | None = None, **load_kw: Any) -> BaseException:
    """``dcpx.load`` must raise ``error`` (a dcpx error) whose message contains ``needles``."""
    try:
        dcpx.load(dest if dest is not None else _dest(), path, **load_kw)
    except BaseException as exc:  # noqa: BLE001 - we classify it below
        assert not watchdog["fired"], "load hung"
        assert isinstance(exc, dcpx.DcpxError), f"expected a dcpx error, got {type(exc).__name__}: {exc}"
        assert isinstance(exc, error), f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
        for needle in needles:
            if needle == ANY_FQN:
                assert any(f in str(exc) for f in FQNS), f"no item fqn in message: {exc}"
            else:
                assert needle in str(exc), f"{needle!r} not in message: {exc}"
        return exc
    pytest.fail("a damaged checkpoint loaded without an error")


def expect_metadata_refusal(path: Path, error: type[BaseException], *needles: str, **reader_kw: Any) -> None:
    """The reader itself refuses the checkpoint's metadata (``read_metadata``)."""
    with pytest.raises(error) as info:
        dcpx.FileSystemReader(path, **reader_kw).read_metadata()
    for needle in needles:
        assert needle in str(info.value)


def load_fails(path: Path, watchdog: dict[str, bool]) -> None:
    """Whatever the error type, ``dcpx.load`` of ``path`` fails (and does not hang)."""
    with pytest.raises(BaseException) as info:
        dcpx.load(_dest(), path)
    assert not watchdog["fired"], "load hung"
    assert not isinstance(info.value, (KeyboardInterrupt, SystemExit))


def _set_info(fqn: str, **changes: Any) -> Callable[[Any], None]:
    def edit(metadata: Any) -> None:
        for index, info in metadata.storage_data.items():
            if index.fqn == fqn:
                for key, value in changes.items():
                    setattr(info, key, value)
    return edit


# -- descriptors -------------------------------------------------------------------------------------------


def test_unknown_descriptor_with_manifest_is_integrity_error(ckpt: Path, watchdog: dict[str, bool]) -> None:
    """Editing ``.metadata`` breaks the hash recorded in the manifest."""
    rewrite_metadata(ckpt, _set_info("model.w", transform_descriptors=["frame@dcpx/1", "stream.nope@nowhere/1"]),
                     drop_manifest=False)
    expect_metadata_refusal(ckpt, dcpx.IntegrityError, ".metadata", "manifest")
    load_fails(ckpt, watchdog)


def test_unknown_descriptor_without_manifest(ckpt: Path, watchdog: dict[str, bool], request: pytest.FixtureRequest) -> None:
    framed = request.node.callspec.params["ckpt"] == "framed"
    descriptors = ["frame@dcpx/1", "stream.nope@nowhere/1"] if framed else ["stream.nope@nowhere/1"]
    rewrite_metadata(ckpt, _set_info("model.w", transform_descriptors=descriptors))
    assert not glob.glob(str(ckpt / ".dcpx-manifest-*"))
    file = _items(ckpt)["model.w"].relative_path
    exc = expect_refusal(ckpt, watchdog, dcpx.UnknownTransformError, "model.w", file, "stream.nope@nowhere")
    assert "install" in str(exc)


def test_unknown_first_party_descriptor_names_distribution(framed: Path, watchdog: dict[str, bool]) -> None:
    rewrite_metadata(framed, _set_info("model.b", transform_descriptors=["frame@dcpx/1", "stream.encrypt@dcpx/1"]))
    expect_refusal(framed, watchdog, dcpx.UnknownTransformError, "model.b", "stream.encrypt@dcpx", "dcpx-encrypt")


@pytest.mark.parametrize(
    "descriptors, error",
    [
        (["frame@dcpx/1", "stream.zstd/01"], dcpx.DescriptorError),
        (["frame@dcpx/1", "stream.zstd"], dcpx.DescriptorError),
        (["frame@dcpx/1", "stream.zstd/2"], dcpx.DescriptorError),
        (["frame@dcpx/1", "stream.xor@test/1;seed=abc"], dcpx.DescriptorError),
        (["frame@dcpx/1", "stream.xor@test/1;seed=1;extra=2"], dcpx.DescriptorError),
        (["frame@dcpx/1", "stream.xor@test/1;seed=%ZZ"], dcpx.DescriptorError),
        (["frame@dcpx/1"], dcpx.CheckpointFormatError),
        (["frame@dcpx/1", "stream.zstd/1", "stream.zstd/1"], dcpx.CheckpointFormatError),
        (["raw@dcpx/1", "stream.zstd/1"], dcpx.CheckpointFormatError),
        (["frame@dcpx/1", 7], dcpx.CheckpointFormatError),
        (["stream.zstd/1", "frame@dcpx/1"], dcpx.DcpxError),
    ],
)
def test_malformed_descriptors(toys: Any, framed: Path, watchdog: dict[str, bool], descriptors: list[Any],
                               error: type[BaseException]) -> None:
    rewrite_metadata(framed, _set_info("model.w", transform_descriptors=descriptors))
    expect_refusal(framed, watchdog, error, "model.w")


def test_require_policy(framed: Path, watchdog: dict[str, bool], tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    dcpx.save(_state(), raw)
    expect_refusal(raw, watchdog, dcpx.PolicyError, ANY_FQN, "stream.zstd", require=["zstd"])
    dcpx.load(_dest(), framed, require=["zstd"])


def test_checkpoint_id_policy(framed: Path) -> None:
    expect_metadata_refusal(framed, dcpx.PolicyError, "0" * 32, checkpoint_id="0" * 32)
    save_id = dcpx.reader.load_metadata(str(framed))[0].storage_meta.save_id
    dcpx.load(_dest(), framed, checkpoint_id=save_id)


# -- files and paths ------------------------------------------------------------------------------------------


def test_missing_data_file(ckpt: Path, watchdog: dict[str, bool]) -> None:
    file = _items(ckpt)["model.w"].relative_path
    os.remove(ckpt / file)
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, ANY_FQN, file, "missing")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_data_file(ckpt: Path, watchdog: dict[str, bool], keep: float) -> None:
    file = _items(ckpt)["model.w"].relative_path
    size = os.path.getsize(ckpt / file)
    os.truncate(ckpt / file, int(size * keep))
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, ANY_FQN, file)


@pytest.mark.parametrize("name", ["../outside.distcp", "a/../../outside.distcp", "..\\outside.distcp",
                                  "sub/../../outside.distcp", "ABSOLUTE", "with\x00nul.distcp", "",
                                  "\ud800.distcp"])  # a lone surrogate: no file name the system takes
def test_relative_path_escapes(ckpt: Path, watchdog: dict[str, bool], name: str) -> None:
    file = _items(ckpt)["model.w"].relative_path
    outside = ckpt.parent / "outside.distcp"
    shutil.copy(ckpt / file, outside)
    (ckpt / "sub").mkdir()
    if name == "ABSOLUTE":
        name = str(outside)
    rewrite_metadata(ckpt, _set_info("model.w", relative_path=name))
    expect_refusal(ckpt, watchdog, dcpx.UnsafeCheckpointError, "model.w")


def test_non_string_relative_path(ckpt: Path, watchdog: dict[str, bool]) -> None:
    rewrite_metadata(ckpt, _set_info("model.w", relative_path=12))
    expect_refusal(ckpt, watchdog, dcpx.UnsafeCheckpointError, "model.w")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_symlink_pointing_outside(ckpt: Path, watchdog: dict[str, bool], kind: str) -> None:
    file = _items(ckpt)["model.w"].relative_path
    outside = ckpt.parent / "elsewhere"
    outside.mkdir()
    shutil.move(str(ckpt / file), outside / file)
    if kind == "file":
        os.symlink(outside / file, ckpt / file)
    else:
        os.symlink(outside, ckpt / "linked")
        shutil.copy(outside / file, ckpt / file)  # the other items stay readable
        rewrite_metadata(ckpt, _set_info("model.w", relative_path=f"linked/{file}"))
    expect_refusal(ckpt, watchdog, dcpx.UnsafeCheckpointError, ANY_FQN if kind == "file" else "model.w")


def test_symlink_inside_is_fine(ckpt: Path) -> None:
    items = _items(ckpt)
    file = items["model.w"].relative_path
    os.rename(ckpt / file, ckpt / "real.bin")
    os.symlink("real.bin", ckpt / file)
    dest = _dest()
    dcpx.load(dest, ckpt)
    assert torch.equal(dest["model.w"], _state()["model.w"])


@pytest.mark.parametrize("target", [".", "sub"])
def test_relative_path_is_a_directory(ckpt: Path, watchdog: dict[str, bool], target: str) -> None:
    (ckpt / "sub").mkdir()
    rewrite_metadata(ckpt, _set_info("model.b", relative_path=target, offset=0))
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, "model.b")


def test_data_file_is_a_fifo(ckpt: Path, watchdog: dict[str, bool]) -> None:
    """A named pipe in place of a data file must be refused, not block the reader forever."""
    file = _items(ckpt)["model.b"].relative_path
    os.remove(ckpt / file)
    os.mkfifo(ckpt / file)
    signal.alarm(5)  # re-arm the watchdog shorter: a blocked open() never returns by itself
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, ANY_FQN)


@pytest.mark.parametrize(
    "change",
    [
        lambda info, size: {"offset": size + 10},
        lambda info, size: {"length": size * 4},
        lambda info, size: {"offset": size - 1},
        lambda info, size: {"offset": -1},
        lambda info, size: {"length": -5},
        lambda info, size: {"offset": 2**62, "length": 2**62},
        lambda info, size: {"offset": "0"},
    ],
    ids=["offset-past-end", "length-past-end", "straddles-end", "negative-offset", "negative-length", "huge",
         "not-int"],
)
def test_offset_length_beyond_file(ckpt: Path, watchdog: dict[str, bool], change: Callable[..., dict[str, Any]]) -> None:
    info = _items(ckpt)["model.w"]
    size = os.path.getsize(ckpt / info.relative_path)
    rewrite_metadata(ckpt, _set_info("model.w", **change(info, size)))
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, "model.w", info.relative_path)


def test_length_shorter_than_tensor(ckpt: Path, watchdog: dict[str, bool]) -> None:
    info = _items(ckpt)["model.w"]
    rewrite_metadata(ckpt, _set_info("model.w", length=info.length - 8))
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, "model.w")


@pytest.mark.parametrize("field, value, needle", [
    ("relative_path", {"k": 1}, "invalid data file name"),
    ("relative_path", None, "invalid data file name"),  # torch pickles None fields as absent
    ("length", None, "non-negative integers"),
    ("transform_descriptors", 5, "must be a list of strings"),
])
def test_forged_storage_entry_fields(ckpt: Path, watchdog: dict[str, bool], field: str, value: Any, needle: str) -> None:
    rewrite_metadata(ckpt, _set_info("model.w", **{field: value}))
    expect_metadata_refusal(ckpt, dcpx.CheckpointFormatError, ".metadata", "model.w", needle)
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, "model.w", needle)


def test_missing_storage_entry(ckpt: Path, watchdog: dict[str, bool]) -> None:
    def drop(metadata: Any) -> None:
        for index in [i for i in metadata.storage_data if i.fqn == "model.w"]:
            del metadata.storage_data[index]
    rewrite_metadata(ckpt, drop)
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, "model.w")


# -- stock torch items (torch.save payloads) -------------------------------------------------------------------


@pytest.fixture
def stock(tmp_path: Path) -> Path:
    """A checkpoint written by stock torch: each tensor a ``torch.save`` payload."""
    path = tmp_path / "stock"
    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(path))
    return path


def _append_payload(path: Path, fqn: str, obj: Any) -> None:
    """Point ``fqn``'s storage entry at a new ``torch.save`` payload appended to its file."""
    info = _items(path)[fqn]
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(buf.getvalue())
    rewrite_metadata(path, _set_info(fqn, offset=offset, length=len(buf.getvalue())))


def test_stock_item_with_a_gadget_is_refused(stock: Path, tmp_path: Path, watchdog: dict[str, bool]) -> None:
    sentinel = tmp_path / "pwned-stock-item"
    _append_payload(stock, "model.w", Gadget(str(sentinel)))
    expect_refusal(stock, watchdog, dcpx.CheckpointFormatError, "model.w", "not a valid torch.save tensor")
    assert not sentinel.exists()


def _deflated_payload(path: Path, fqn: str, obj: Any) -> None:
    """Like ``_append_payload``, with every member of the archive DEFLATE-compressed."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    info = _items(path)[fqn]
    with open(path / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(packed.getvalue())
    rewrite_metadata(path, _set_info(fqn, offset=offset, length=len(packed.getvalue())))


@pytest.mark.parametrize("fqn, obj", [("model.b", torch.arange(16.0)), ("extra.note", "hi")], ids=["tensor", "non-tensor"])
def test_stock_item_with_a_compressed_archive_is_refused(stock: Path, watchdog: dict[str, bool], fqn: str, obj: Any) -> None:
    """torch.load would inflate a compressed member whole before any size check (a zip bomb)."""
    _deflated_payload(stock, fqn, obj)
    expect_refusal(stock, watchdog, dcpx.UnsafeCheckpointError, fqn, "is compressed")


def test_stock_safetensors_output_is_named(tmp_path: Path, watchdog: dict[str, bool]) -> None:
    """Stock torch's SAFETENSORS output points every tensor at its file's header; say so
    instead of suggesting weights_only=False."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    path = tmp_path / "st"
    dcp.save({"model.w": torch.ones(4, 4)}, storage_writer=dcp.FileSystemWriter(
        path, serialization_format=SerializationFormat.SAFETENSORS))
    expect_refusal(path, watchdog, dcpx.CheckpointFormatError, "model.w", "holds a safetensors header",
                   dest={"model.w": torch.zeros(4, 4)})


def test_stock_item_of_another_shape_is_refused(stock: Path, watchdog: dict[str, bool]) -> None:
    _append_payload(stock, "model.w", torch.zeros(100, 40))
    expect_refusal(stock, watchdog, dcpx.CheckpointFormatError, "model.w", "does not match metadata")


def test_stock_item_larger_than_its_tensor_is_refused(stock: Path, watchdog: dict[str, bool]) -> None:
    _append_payload(stock, "model.b", torch.zeros(1 << 19))  # 2 MiB where 16 floats belong
    expect_refusal(stock, watchdog, dcpx.CheckpointFormatError, "model.b", "more bytes than its tensor")


def test_stock_zstd_item_decoding_past_its_tensor_is_refused(tmp_path: Path, watchdog: dict[str, bool]) -> None:
    """A few KiB of torch-ZStandard data that inflate to 16 times the bf16 tensor the metadata
    records: decoding stops at the recorded tensor's size (plus the archive's own bytes)."""
    import zstandard
    from torch.distributed.checkpoint._extension import ZStandard

    n = 1 << 20
    dcp.save({"w": torch.ones(n, dtype=torch.bfloat16)}, storage_writer=dcp.FileSystemWriter(tmp_path, _extensions=[ZStandard()]))
    bomb = zstandard.ZstdCompressor().compress(bytes(16 * n))
    info = _items(tmp_path)["w"]
    with open(tmp_path / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(bomb)
    rewrite_metadata(tmp_path, _set_info("w", offset=offset, length=len(bomb)))
    expect_refusal(tmp_path, watchdog, dcpx.CheckpointFormatError, "w", "more bytes than its torch.bfloat16 tensor",
                   dest={"w": torch.zeros(n, dtype=torch.bfloat16)})


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_stock_item_with_garbled_bytes(stock: Path, watchdog: dict[str, bool], where: str) -> None:
    """Damage in the zip structure is refused; damage in the tensor's own bytes cannot be
    seen without a checksum, and then the load completes."""
    info = _items(stock)["model.w"]
    at = {"start": 0, "middle": info.length // 2, "end": info.length - 40}[where]
    with open(stock / info.relative_path, "r+b") as f:
        f.seek(info.offset + at)
        f.write(b"\xff" * 24)
    if where == "middle":  # lands in the tensor's bytes: only a checksum would see it
        dcpx.load(_dest(), stock)
        assert not watchdog["fired"]
        return
    needle = "damaged torch.save archive" if where == "end" else "not a torch.save archive"
    expect_refusal(stock, watchdog, dcpx.CheckpointFormatError, "model.w", needle)


@pytest.mark.parametrize("fqn", ["model.w", "extra.note"])
def test_stock_item_zip_that_python_cannot_read(stock: Path, watchdog: dict[str, bool], fqn: str) -> None:
    """A member needing a newer zip version: Python's zipfile raises NotImplementedError,
    which must become a dcpx error naming the item (torch's own reader might still inflate it)."""
    info = _items(stock)[fqn]
    with open(stock / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        item = f.read(info.length)
        f.seek(info.offset + item.index(b"PK\x01\x02") + 6)  # "version needed to extract"
        f.write(b"\xff")
    expect_refusal(stock, watchdog, dcpx.CheckpointFormatError, fqn, "damaged torch.save archive")


# -- frames ---------------------------------------------------------------------------------------------------


def _patch(path: Path, info: Any, pos: int, data: bytes) -> None:
    """Overwrite bytes at item-relative ``pos`` (negative: from the item's end)."""
    at = info.offset + (pos if pos >= 0 else info.length + pos)
    with open(path / info.relative_path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _index_region(path: Path, info: Any) -> tuple[int, bytes]:
    """Item-relative start of the frame index, and the index bytes."""
    blob = (path / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    index_len = framing.parse_footer(blob[-framing.FOOTER.size:], len(blob), "test")
    start = len(blob) - framing.FOOTER.size - index_len
    return start, blob[start:start + index_len]


@pytest.mark.parametrize("what", ["magic", "index-length", "index-crc", "index-body", "whole-footer", "index-reserved"])
def test_corrupted_footer_or_index(framed: Path, watchdog: dict[str, bool], what: str) -> None:
    info = _items(framed)["model.w"]
    start, body = _index_region(framed, info)
    if what == "index-reserved":  # the header's two reserved bytes set, the CRC made to match
        forged = body[:framing.HEADER.size - 2] + b"\xff\xff" + body[framing.HEADER.size:]
        _patch(framed, info, start, forged)
        _patch(framed, info, -framing.FOOTER.size + 16, struct.pack("<I", zlib.crc32(forged)))
        expect_refusal(framed, watchdog, dcpx.CheckpointFormatError, "model.w", "reserved bytes")
        return
    if what == "magic":
        _patch(framed, info, -framing.FOOTER.size, b"XXXXXXXX")
    elif what == "index-length":
        _patch(framed, info, -framing.FOOTER.size + 8, struct.pack("<Q", 2**40))
    elif what == "index-crc":
        _patch(framed, info, -framing.FOOTER.size + 16, b"\0\0\0\0")
    elif what == "index-body":
        _patch(framed, info, start + framing.HEADER.size, b"\xff")
    else:
        _patch(framed, info, -framing.FOOTER.size, os.urandom(framing.FOOTER.size))
    expect_refusal(framed, watchdog, dcpx.CheckpointFormatError, "model.w", info.relative_path)


def _current_index(path: Path, info: Any) -> framing.FrameIndex:
    blob = (path / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    footer = blob[-framing.FOOTER.size:]
    _, body = _index_region(path, info)
    return framing.parse_index(footer, body, len(blob), len(info.transform_descriptors) - 1, "test", None, 1 << 30)


def _forge_index(path: Path, info: Any, edit: Callable[[dict[str, Any]], None]) -> None:
    """Replace the item's index and footer by a well-formed (valid CRC) but lying one."""
    index = _current_index(path, info)
    fields = {"raw_size": index.raw_size, "chunk_size": index.chunk_size, "layers": index.layers,
              "layer_sizes": [list(s) for s in index.layer_sizes]}
    edit(fields)
    forged = framing.FrameIndex(fields["raw_size"], fields["chunk_size"], fields["layers"],
                                tuple(tuple(s) for s in fields["layer_sizes"])).encode()
    _patch(path, info, -len(forged), forged)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda f: f.__setitem__(key, value(f[key]) if callable(value) else value)


def _sizes(edit: Callable[[list[list[int]]], Any]) -> Callable[[dict[str, Any]], None]:
    return lambda f: edit(f["layer_sizes"])


@pytest.mark.parametrize(
    "edit",
    [
        _set("raw_size", lambda v: v + 4),  # raw size disagrees with metadata
        _set("chunk_size", 1),  # chunk size inconsistent with the chunk count
        _set("chunk_size", 0),
        lambda f: (f.__setitem__("layers", 2), [s.append(s[0]) for s in f["layer_sizes"]]),  # != descriptors
        _sizes(lambda s: s[0].__setitem__(0, s[0][0] + 1)),  # chunk sizes do not add up
        _sizes(lambda s: (s[0].__setitem__(0, s[0][0] + 1000), s[1].__setitem__(0, s[1][0] - 1000))),
        _sizes(lambda s: s[0].__setitem__(0, 2**50)),  # implausible size
        _sizes(lambda s: s.pop()),  # a chunk missing from the table
    ],
    ids=["raw-size", "chunk-size", "zero-chunk", "layers", "sum", "shifted", "huge", "missing-chunk"],
)
def test_forged_index(framed: Path, watchdog: dict[str, bool], edit: Callable[[dict[str, Any]], None]) -> None:
    info = _items(framed)["model.w"]
    _forge_index(framed, info, edit)
    expect_refusal(framed, watchdog, dcpx.DcpxError, "model.w")


def test_garbled_chunk_payload(framed: Path, watchdog: dict[str, bool]) -> None:
    info = _items(framed)["model.w"]
    _patch(framed, info, 0, b"\0" * 16)  # destroys the first zstd frame's header
    expect_refusal(framed, watchdog, dcpx.DcpxError, "model.w")


# -- metadata structure ---------------------------------------------------------------------------------------


def _tensor_md(metadata: Any, fqn: str = "model.w") -> Any:
    return metadata.state_dict_metadata[fqn]


def _rename_entry(metadata: Any) -> None:
    metadata.state_dict_metadata[7] = metadata.state_dict_metadata.pop("model.b")


FORGED_STRUCTURE: dict[str, tuple[Callable[[Any], None], str]] = {
    "dtype-string": (lambda m: setattr(_tensor_md(m).properties, "dtype", "float32"), "not a torch dtype"),
    "size-string": (lambda m: setattr(_tensor_md(m), "size", "40x100"), "size must be"),
    "size-negative": (lambda m: setattr(_tensor_md(m), "size", torch.Size([-40, 100])), "size must be"),
    "chunks-not-list": (lambda m: setattr(_tensor_md(m), "chunks", None), "chunk list"),
    "chunk-wrong-type": (lambda m: _tensor_md(m).chunks.__setitem__(0, 5), "chunk 0 is a int"),
    "chunk-sizes-string": (lambda m: setattr(_tensor_md(m).chunks[0], "sizes", "xyz"), "chunk 0 offsets and sizes"),
    "chunk-rank-mismatch": (lambda m: setattr(_tensor_md(m).chunks[0], "offsets", torch.Size([0])), "dimensions"),
    "chunk-outside": (lambda m: setattr(_tensor_md(m).chunks[0], "offsets", torch.Size([1, 0])), "outside the tensor"),
    # the whole tensor listed eight times: each chunk would be read and decoded into it again
    "chunks-overlap": (lambda m: _with_chunks(_tensor_md(m), 8), "its 8 chunks hold 32000 elements, more than the tensor's 4000"),
    "entry-wrong-type": (lambda m: m.state_dict_metadata.__setitem__("model.w", 3), "not DCP storage metadata"),
    "no-storage-table": (lambda m: setattr(m, "storage_data", None), "storage table is missing"),
    # a non-tensor entry described as a tensor, and the reverse: torch's planner raised ValueError
    "bytes-as-tensor": (lambda m: m.state_dict_metadata.__setitem__("extra.note", _tensor_md(m)),
                        "'extra.note' is described as a tensor but stored as a non-tensor entry"),
    "tensor-as-bytes": (lambda m: m.state_dict_metadata.__setitem__("model.w", m.state_dict_metadata["extra.note"]),
                        "'model.w' is described as a non-tensor entry but stored as a tensor chunk"),
    "entry-name-not-str": (_rename_entry, "not a string"),
    "sparse-list-index": (lambda m: m.planner_data.__setitem__("model.w", ("model", 10**12)), "far beyond"),
    "path-through-value": (lambda m: m.planner_data.__setitem__("model.b", ("model.w", "x")), "does not fit"),
    "index-into-dict": (lambda m: m.planner_data.__setitem__("model.b", ("extra", 5)), "does not fit"),
    # past 4300 digits Python refuses to print an integer, so even the message needs care
    "size-huge-int": (lambda m: setattr(_tensor_md(m), "size", [10**5000, 100]), "too large to show"),
    "offset-huge-int": (lambda m: _set_info("model.w", offset=10**5000)(m), "too large to show"),
    "path-huge-index": (lambda m: m.planner_data.__setitem__("model.w", ("model", 10**5000)), "too large to show"),
    # one chunk list referenced by 2,000 entries: every check and planner would walk it each time
    "shared-chunk-lists": (lambda m: m.state_dict_metadata.update(
        {f"copy{i}": _with_chunks(_tensor_md(m), 2000) for i in range(2000)}), "referenced over and over"),
}


def _peak_rss_growth(run: Callable[[], Any]) -> int:
    """Bytes the process's RSS rose above its start while ``run`` ran (sampled every 2 ms)."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    start, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss() - start)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return peak[0]


def test_non_tensor_entry_claiming_a_gigabyte_allocates_nothing(framed: Path, watchdog: dict[str, bool]) -> None:
    """A non-tensor entry's frame index may claim up to ``max_item_bytes`` (1 GiB); a 57-byte
    forgery used to have the reader zero a whole gigabyte before its one chunk failed."""
    chunk = b"\x07"  # no valid dcpx-zstd chunk kind
    index = framing.FrameIndex(raw_size=1 << 30, chunk_size=1 << 30, layers=1, layer_sizes=((len(chunk),),))
    forged = chunk + index.encode()
    info = _items(framed)["extra.note"]
    with open(framed / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(forged)
    rewrite_metadata(framed, _set_info("extra.note", offset=offset, length=len(forged)))
    grew = _peak_rss_growth(lambda: load_fails(framed, watchdog))
    assert grew < 256 << 20, f"RSS rose by {grew >> 20} MiB"


def _with_chunks(entry: Any, count: int) -> Any:
    """``entry`` with its one chunk listed ``count`` times (pickled once, referenced after)."""
    entry.chunks = entry.chunks * count if len(entry.chunks) == 1 else entry.chunks
    return entry


@pytest.mark.parametrize("forgery", list(FORGED_STRUCTURE))
def test_forged_metadata_structure(ckpt: Path, watchdog: dict[str, bool], forgery: str) -> None:
    """Allow-listed types holding the wrong values: refused when ``.metadata`` is read,
    before a planner trips over them with a bare ``TypeError``, or (a sparse list index in
    the flattening paths) appends 10**12 slots to a list."""
    edit, needle = FORGED_STRUCTURE[forgery]
    rewrite_metadata(ckpt, lambda m: (m.__setattr__("planner_data", dict(m.planner_data or {})), edit(m)))
    expect_metadata_refusal(ckpt, dcpx.CheckpointFormatError, ".metadata", needle)
    expect_refusal(ckpt, watchdog, dcpx.CheckpointFormatError, needle)


def test_forged_flattening_path_refused_when_loading_without_a_template(ckpt: Path, watchdog: dict[str, bool]) -> None:
    """Loading without a template (``_load_state_dict_from_keys``; ``dcp_to_torch_save``
    likewise) rebuilds nesting from the paths: the reader refuses the forgery first."""
    rewrite_metadata(ckpt, lambda m: m.planner_data.__setitem__("model.w", ("model", 10**12)))
    with pytest.raises((CheckpointException, AssertionError)) as info:
        _load_state_dict_from_keys(storage_reader=dcpx.FileSystemReader(ckpt))
    assert not watchdog["fired"], "load hung"
    assert "far beyond the entries saved" in str(info.value)


def test_nested_lists_load_without_a_template(tmp_path: Path) -> None:
    """The structural check admits what DCP itself flattens: lists in lists, dicts in lists."""
    state = {"layers": [[torch.ones(2), torch.zeros(1)], [torch.arange(3.0)]],
             "groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "w": torch.ones(1)}]}
    dcpx.save(state, tmp_path / "ck")
    out = _load_state_dict_from_keys(storage_reader=dcpx.FileSystemReader(tmp_path / "ck"))
    assert torch.equal(out["layers"][0][0], torch.ones(2)) and torch.equal(out["layers"][1][0], torch.arange(3.0))
    assert out["groups"][0] == {"lr": 0.1, "params": [0, 1]} and torch.equal(out["groups"][1]["w"], torch.ones(1))


def test_gaps_left_by_empty_dicts_in_lists_are_admitted(tmp_path: Path) -> None:
    """An empty dict inside a list leaves a gap in DCP's numbering of the list: metadata
    with thousands of them is no forgery."""
    dcpx.save({"sparse": [{} for _ in range(3000)] + [torch.full((2,), 5.0)]}, tmp_path / "ck")
    assert dcpx.FileSystemReader(tmp_path / "ck").read_metadata().planner_data == {"sparse.3000": ("sparse", 3000)}


# -- code execution -------------------------------------------------------------------------------------------


def test_metadata_reduce_gadget(ckpt: Path, tmp_path: Path, watchdog: dict[str, bool]) -> None:
    sentinel = tmp_path / "pwned-metadata"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Gadget(str(sentinel))))
    expect_metadata_refusal(ckpt, dcpx.UnsafeCheckpointError, ".metadata", "mkdir")
    assert not sentinel.exists()
    load_fails(ckpt, watchdog)
    assert not sentinel.exists()


@pytest.mark.parametrize("where", ["planner_data", "storage_info", "descriptor"])
def test_gadget_nested_in_valid_metadata(ckpt: Path, tmp_path: Path, watchdog: dict[str, bool], where: str) -> None:
    sentinel = tmp_path / f"pwned-{where}"

    def edit(metadata: Any) -> None:
        if where == "planner_data":
            metadata.planner_data = {"x": Gadget(str(sentinel))}
        elif where == "storage_info":
            _set_info("model.w", offset=Gadget(str(sentinel)))(metadata)
        else:
            _set_info("model.w", transform_descriptors=["frame@dcpx/1", Gadget(str(sentinel))])(metadata)

    rewrite_metadata(ckpt, edit)  # plain pickle only *writes* here; the gadget is not run
    assert not sentinel.exists()
    expect_metadata_refusal(ckpt, dcpx.UnsafeCheckpointError, ".metadata")
    load_fails(ckpt, watchdog)
    assert not sentinel.exists()


def _build_on(target: bytes, attribute: str) -> bytes:
    """A pickle (protocol 2) that pushes ``target`` and sets ``attribute`` on it to
    ``builtins.set`` through BUILD's slot state, as a forged file would."""
    name = attribute.encode()
    return (b"\x80\x02" + target + b"N}X" + struct.pack("<I", len(name)) + name
            + b"cbuiltins\nset\ns\x86b.")


_METADATA_CLASS = b"ctorch.distributed.checkpoint.metadata\nMetadata\n"
_ENUM_MEMBER = b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x01\x85R"


@pytest.mark.parametrize("target, owner, needle", [
    (_METADATA_CLASS, lambda: dcp.metadata.Metadata, "the class Metadata"),
    (_ENUM_MEMBER, lambda: dcp.metadata._MEM_FORMAT_ENCODING(1), "a _MEM_FORMAT_ENCODING"),
], ids=["class", "enum-member"])
def test_metadata_cannot_change_shared_objects(ckpt: Path, watchdog: dict[str, bool], target: bytes,
                                               owner: Callable[[], Any], needle: str) -> None:
    """BUILD on a class or an enum member would patch it for the whole process."""
    (ckpt / ".metadata").write_bytes(_build_on(target, "planted"))
    expect_metadata_refusal(ckpt, dcpx.UnsafeCheckpointError, ".metadata", needle)
    load_fails(ckpt, watchdog)
    assert not hasattr(owner(), "planted")


def test_metadata_tuples_nested_too_deep(ckpt: Path, watchdog: dict[str, bool]) -> None:
    """A dict key of tuples nested 200,000 deep: hashing it would recurse in C and crash."""
    (ckpt / ".metadata").write_bytes(b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"Ns.")
    expect_metadata_refusal(ckpt, dcpx.UnsafeCheckpointError, ".metadata", "tuples nested more than 64 deep")
    load_fails(ckpt, watchdog)


def test_metadata_copying_one_string_over_and_over(ckpt: Path, watchdog: dict[str, bool]) -> None:
    """``list`` is an allowed callable: each ``list(s)`` of a memoised 1 MiB string costs the
    pickle 7 bytes and memory 8 MiB.  The budget refuses it after a few copies."""
    size = 1 << 20
    blob = (b"\x80\x02cbuiltins\nlist\nq\x00X" + struct.pack("<I", size) + b"a" * size + b"q\x010]"
            + b"h\x00h\x01\x85Ra" * 200 + b".")
    (ckpt / ".metadata").write_bytes(blob)
    expect_metadata_refusal(ckpt, dcpx.UnsafeCheckpointError, ".metadata", "builds far more than")
    load_fails(ckpt, watchdog)


_A_MIB = b"X" + struct.pack("<I", 1 << 20) + b"a" * (1 << 20)  # a 1 MiB string


@pytest.mark.parametrize("blob, needle", [
    # BUILD planting a callable that a later opcode calls: APPENDS calls obj.extend
    (b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}X\x06\x00\x00\x00extendcbuiltins\nlist\nsb"
     b"(K\x01K\x02e.", "refusing to set attribute 'extend'"),
    # BUILD setting __class__ through slot state turns the object into another class
    (b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81N}X\t\x00\x00\x00__class__"
     b"cpathlib\nPosixPath\ns\x86b.", "refusing to set attribute '__class__'"),
    # complex() of a million digits takes seconds; pickles build complex from two numbers
    (b"\x80\x02cbuiltins\ncomplex\nX" + struct.pack("<I", 1 << 20) + b"1" * (1 << 20) + b"\x85R.",
     "complex"),
    # PosixPath(*[s] * 2000) holds 2000 references to one string and joins them when used
    (b"\x80\x02cpathlib\nPosixPath\n" + _A_MIB + b"q\x010(" + b"h\x01" * 2000 + b"tR.", "builds far more than"),
], ids=["planted-callable", "class-swap", "complex-digits", "path-of-copies"])
def test_metadata_calls_that_do_more_than_build_data(ckpt: Path, watchdog: dict[str, bool], blob: bytes,
                                                     needle: str) -> None:
    (ckpt / ".metadata").write_bytes(blob)
    expect_metadata_refusal(ckpt, dcpx.UnsafeCheckpointError, ".metadata", needle)
    load_fails(ckpt, watchdog)


def test_metadata_naming_a_torch_submodule_imports_nothing() -> None:
    """torch's module ``__getattr__`` imports submodules on first access: a refused global
    ``torch._inductor`` must not import the compiler stack (hundreds of modules)."""
    code = ("import sys, dcpx.safe_pickle as p\n"
            "try:\n    p.safe_loads(b'\\x80\\x02ctorch\\n_inductor\\n.', 'x')\n"
            "except p.UnsafeCheckpointError:\n    print('torch._inductor' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_metadata_bytearray_longer_than_the_file(ckpt: Path, watchdog: dict[str, bool]) -> None:
    """BYTEARRAY8 declares its length; 1 TiB in a 12-byte file is refused before allocating."""
    (ckpt / ".metadata").write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".")
    expect_metadata_refusal(ckpt, dcpx.UnsafeCheckpointError, ".metadata", "bytearray claims 1099511627776 bytes")
    load_fails(ckpt, watchdog)


@pytest.mark.parametrize("data", [b"", b"\x80\x05", b"not a pickle at all", pickle.dumps({"a": 1}),
                                  pickle.dumps([1, 2, 3])], ids=["empty", "truncated", "text", "dict", "list"])
def test_garbage_metadata(ckpt: Path, watchdog: dict[str, bool], data: bytes) -> None:
    (ckpt / ".metadata").write_bytes(data)
    expect_metadata_refusal(ckpt, dcpx.CheckpointFormatError, ".metadata")
    load_fails(ckpt, watchdog)


def test_missing_metadata(ckpt: Path, watchdog: dict[str, bool]) -> None:
    os.remove(ckpt / ".metadata")
    expect_metadata_refusal(ckpt, dcpx.CheckpointFormatError, "not a checkpoint")
    load_fails(ckpt, watchdog)


@pytest.mark.parametrize("data, needle", [
    (b"{not json", "manifest is not valid JSON"),
    # deeper than json's recursion limit, yet few enough arrays for the checkpoint's 3 items
    (b"[" * 1060 + b"]" * 1060, "manifest is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "manifest holds 100000 JSON objects and arrays"),
    (b'{"format": ' + b"9" * 5000 + b"}", "manifest is not valid JSON"),
], ids=["garbage", "deeply-nested", "too-many-arrays", "huge-number"])
def test_garbage_manifest(ckpt: Path, watchdog: dict[str, bool], data: bytes, needle: str) -> None:
    (manifest,) = glob.glob(str(ckpt / ".dcpx-manifest-*.json"))
    Path(manifest).write_bytes(data)
    expect_metadata_refusal(ckpt, dcpx.CheckpointFormatError, f"{manifest}: {needle}")
    load_fails(ckpt, watchdog)


METADATA_DAMAGE = {
    "gadget": (lambda d, tmp: (d / ".metadata").write_bytes(pickle.dumps(Gadget(str(tmp / "pwned")))),
               dcpx.UnsafeCheckpointError, {}),
    "garbage": (lambda d, tmp: (d / ".metadata").write_bytes(b"not a pickle"), dcpx.CheckpointFormatError, {}),
    "missing": (lambda d, tmp: os.remove(d / ".metadata"), dcpx.CheckpointFormatError, {}),
    "manifest-mismatch": (lambda d, tmp: rewrite_metadata(d, _set_info("model.w", offset=0), drop_manifest=False),
                          dcpx.IntegrityError, {}),
    "checkpoint-id": (lambda d, tmp: None, dcpx.PolicyError, {"checkpoint_id": "0" * 32}),
}


@pytest.mark.parametrize("damage", list(METADATA_DAMAGE))
def test_metadata_errors_surface_through_dcpx_load(framed: Path, tmp_path: Path, watchdog: dict[str, bool],
                                                   damage: str) -> None:
    """``dcpx.load`` promises dcpx errors, also when the *metadata* is what is refused.

    torch's ``dcp.load`` catches the reader's ``read_metadata`` error, retries with the
    rank-local ``__0.metadata`` and then raises a bare ``AssertionError`` carrying only the
    text, so ``unwrap_errors`` finds no dcpx error to re-raise."""
    make, error, kw = METADATA_DAMAGE[damage]
    make(framed, tmp_path)
    expect_refusal(framed, watchdog, error, **kw)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("transforms", [None, ["zstd"]], ids=["plain", "zstd"])
def test_non_tensor_entry_with_gadget(tmp_path: Path, watchdog: dict[str, bool], transforms: Any) -> None:
    sentinel = tmp_path / "pwned-bytes"
    path = tmp_path / "ckpt"
    dcpx.save({"w": torch.ones(3), "evil": Gadget(str(sentinel))}, path, transforms=transforms)
    assert not sentinel.exists()
    dest = {"w": torch.zeros(3), "evil": None}
    expect_refusal(path, watchdog, dcpx.UnsafeCheckpointError, "evil", dest=dest)
    assert not sentinel.exists()
    # the same protection is available to dcp.load callers
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(3), "evil": None}, storage_reader=dcpx.FileSystemReader(path),
                 planner=dcpx.SafeLoadPlanner())
    assert any(isinstance(f[0] if isinstance(f, tuple) else f, dcpx.UnsafeCheckpointError)
               for f in info.value.failures.values())
    assert not sentinel.exists()



@pytest.mark.parametrize("compat", [False, True], ids=["dcpx", "compat"])
def test_gadget_refused_by_the_reader_under_torchs_default_planner(tmp_path: Path, compat: bool) -> None:
    """torch's DefaultLoadPlanner unpickles non-tensor entries with weights_only=False; the
    reader refuses the entry before the planner sees it, whatever the planner."""
    sentinel = tmp_path / "pwned-default-planner"
    path = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(3), "evil": Gadget(str(sentinel))}, storage_writer=dcpx.FileSystemWriter(path, compat=compat))
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(3), "evil": None}, storage_reader=dcpx.FileSystemReader(path))
    failures = [f[0] if isinstance(f, tuple) else f for f in info.value.failures.values()]
    assert any(isinstance(f, dcpx.UnsafeCheckpointError) and "evil" in str(f) and "posix.mkdir" in str(f)
               for f in failures), failures
    assert not sentinel.exists()


class UserConfig:
    """A plain user class in a state dict: not loadable with weights_only=True unless allowed."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_user_classes_load_when_allowed_or_trusted(tmp_path: Path) -> None:
    dcpx.save({"cfg": UserConfig(0.5)}, tmp_path)
    with pytest.raises(CheckpointException):
        dcp.load({"cfg": None}, storage_reader=dcpx.FileSystemReader(tmp_path))
    with torch.serialization.safe_globals([UserConfig]):  # torch's own allow-list mechanism
        dest: dict[str, Any] = {"cfg": None}
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))
        assert dest["cfg"].lr == 0.5
    dest = {"cfg": None}
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path, weights_only=False))  # a checkpoint you trust
    assert dest["cfg"].lr == 0.5
    with pytest.raises(dcpx.UnsafeCheckpointError, match="cfg"):
        dcpx.load({"cfg": None}, tmp_path)
    dest = {"cfg": None}
    dcpx.load(dest, tmp_path, weights_only=False)  # the same switch through dcpx.load
    assert dest["cfg"].lr == 0.5

def test_non_tensor_entry_with_plain_values_loads(tmp_path: Path) -> None:
    sd = {"cfg": {"lr": 0.1, "betas": (0.9, 0.99), "name": "x", "flags": [True, None], "t": torch.ones(2)}}
    dcpx.save(sd, tmp_path)
    dest = {"cfg": {"lr": None, "betas": None, "name": None, "flags": None, "t": torch.zeros(2)}}
    dcpx.load(dest, tmp_path)
    assert dest["cfg"]["betas"] == (0.9, 0.99) and dest["cfg"]["flags"] == [True, None]
    assert torch.equal(dest["cfg"]["t"], torch.ones(2))


# -- special files where metadata should be --------------------------------------------------------------


def _replace_with(path: Path, kind: str) -> None:
    os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_metadata_is_not_a_regular_file(framed: Path, watchdog: dict[str, bool], kind: str) -> None:
    """A planted FIFO must not block the reader (nor a device such as /dev/zero feed it forever)."""
    _replace_with(framed / ".metadata", kind)
    signal.alarm(5)
    expect_refusal(framed, watchdog, dcpx.CheckpointFormatError, f"{framed}/.metadata")


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_manifest_is_not_a_regular_file(framed: Path, watchdog: dict[str, bool], kind: str) -> None:
    (manifest,) = glob.glob(str(framed / ".dcpx-manifest-*.json"))
    _replace_with(Path(manifest), kind)
    signal.alarm(5)
    expect_refusal(framed, watchdog, dcpx.CheckpointFormatError, "manifest")


def test_damaged_metadata_does_not_fall_back_to_rank_local_metadata(framed: Path, watchdog: dict[str, bool]) -> None:
    """torch retries a failed ``.metadata`` read with ``__<rank>.metadata``; a leftover of an
    earlier no-collectives save must not be loaded silently in place of the damaged checkpoint."""
    other = {"model.w": torch.full((40, 100), 2.0), "model.b": torch.full((16,), 2.0), "extra": {"note": "other"}}
    dcp.save(other, storage_writer=dcpx.FileSystemWriter(framed), use_collectives=False)
    assert (framed / "__0.metadata").exists()
    dest = _dest()
    dcpx.load(dest, framed)  # intact: the committed checkpoint, not the rank-local one
    assert torch.equal(dest["model.b"], torch.arange(16.0))
    (framed / ".metadata").write_bytes(b"\x80\x05garbage")
    expect_refusal(framed, watchdog, dcpx.CheckpointFormatError, ".metadata")


def test_missing_checkpoint_directory(tmp_path: Path, watchdog: dict[str, bool]) -> None:
    expect_refusal(tmp_path / "nothing-here", watchdog, dcpx.CheckpointFormatError, "nothing-here")


# -- failures no check foresaw ----------------------------------------------------------------------------

HUGE = 10 ** 5000  # more digits than Python agrees to turn into a string


def test_unforeseen_failure_checking_metadata_names_the_file(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``inspect`` and ``verify`` read ``.metadata`` without the reader's safety net; the
    loader has its own, which survives even an exception whose message cannot be formatted."""
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError(HUGE)

    monkeypatch.setattr(dcpx.checkpoint_files, "check_metadata", broken)
    with pytest.raises(dcpx.CheckpointFormatError, match=r"/\.metadata: cannot be read \(ValueError"):
        dcpx.checkpoint_files.load_metadata(str(ckpt))


def test_unforeseen_failure_checking_the_manifest_names_the_file(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(dcpx.manifest, "verify", broken)
    metadata, data = dcpx.checkpoint_files.load_metadata(str(ckpt))
    with pytest.raises(dcpx.CheckpointFormatError, match=r"\.dcpx-manifest-[0-9a-f]{32}\.json: cannot be read \(TypeError"):
        dcpx.checkpoint_files.load_manifest(str(ckpt), metadata, data)


def test_integers_too_long_to_print_in_metadata(ckpt: Path) -> None:
    """Messages that quote such an integer raise ``ValueError`` while being formatted."""
    rewrite_metadata(ckpt, lambda md: setattr(_tensor_md(md).chunks[0], "offsets", [HUGE, 0]))
    for read in (dcpx.checkpoint_files.load_metadata, dcpx.inspect.describe, dcpx.verify.verify_checkpoint):
        with pytest.raises(dcpx.CheckpointFormatError, match=r"\.metadata"):
            read(str(ckpt))


def test_inspect_survives_sizes_no_float_holds(ckpt: Path) -> None:
    """A stored length of 10**5000 bytes: the ratio does not fit a float."""
    assert dcpx.inspect.ratio(HUGE, 3) is None and dcpx.inspect.ratio(4, 8) == 0.5 and dcpx.inspect.ratio(1, 0) is None
    rewrite_metadata(ckpt, _set_info("model.w", length=HUGE))
    try:
        info = dcpx.inspect.describe(str(ckpt))
    except dcpx.DcpxError:
        return  # refused by the metadata check: as good
    assert info["totals"]["ratio"] is None


def test_a_scalar_listed_once_per_rank_loads(tmp_path: Path) -> None:
    """A 0-dim tensor every rank kept (a planner that skips deduplication; torch's own check
    lets 0-dim tensors through) lists one chunk per rank: not an overlap worth refusing."""
    dcpx.save({"step": torch.tensor(5.0)}, tmp_path)

    def every_rank(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["step"]
        entry.chunks = entry.chunks * 4

    rewrite_metadata(tmp_path, every_rank)
    out = {"step": torch.tensor(0.0)}
    dcpx.load(out, tmp_path)
    assert out["step"].item() == 5.0

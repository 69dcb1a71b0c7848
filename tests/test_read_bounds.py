"""What a read may cost is set by the item and the reader's limits, not by sizes the files
claim; and once a load has failed it no longer touches the caller's tensors."""

from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter as StockWriter

import dcpx
from checkpoint_helpers import rewrite_metadata, storage_items
from dcpx.checkpoint_files import load_metadata
from dcpx.verify import verify_checkpoint


def _claim(path: Path, fqn: str, size: int) -> None:
    """Make the stream header of ``fqn``'s item (written by stock torch through a dcpx
    transform: an 8-byte raw length, then the encoded bytes) claim ``size`` bytes."""
    info = storage_items(load_metadata(str(path))[0])[fqn]
    with open(path / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(struct.pack("<Q", size))


class Doubling(dcpx.Transform):
    """Stores every byte twice: its output is twice its input (error-correcting codes and
    text armour also grow what they encode)."""

    name = "stream.double@test"
    version = 1

    @classmethod
    def from_params(cls, version: int, params: Any) -> dcpx.Transform:
        return cls()

    def encode(self, data: memoryview, chunk: Any) -> bytes:
        return bytes(data) * 2

    def decode(self, data: memoryview, chunk: Any, size: int) -> bytes:
        if data.nbytes != 2 * size or data[:size] != data[size:]:
            raise dcpx.IntegrityError(f"{chunk.item.fqn}: the two copies differ")
        return bytes(data[:size])


def test_a_transform_whose_output_is_larger_than_its_input_reads_back(fresh_host: Any, tmp_path: Path) -> None:
    """The bound is on what a layer claims and on what a lazy decoder feeds it, not on bytes
    already read: stock torch writing through a transform that doubles 8 MiB."""

    class Plugin:
        @dcpx.hookimpl
        def dcpx_register_transforms(self, register: Any) -> None:
            register(Doubling)

    dcpx.register_plugin(Plugin(), name="dcpx-test-double")
    state = {"t": torch.randn(1 << 21)}
    dcp.save(state, storage_writer=StockWriter(tmp_path, _extensions=[Doubling()]))
    out = {"t": torch.zeros(1 << 21)}
    dcpx.load(out, tmp_path)
    assert torch.equal(out["t"], state["t"])


@pytest.mark.parametrize("fqn", ["blob", "t"])
def test_a_stream_header_cannot_claim_more_than_the_item_holds(toys: Any, tmp_path: Path, fqn: str) -> None:
    dcp.save({"blob": io.BytesIO(b"abc" * 100), "t": torch.ones(2)},
             storage_writer=StockWriter(tmp_path, _extensions=[toys.XorTransform()]))
    _claim(tmp_path, fqn, 1 << 33)
    toys.RECORD.clear()
    out = {"blob": io.BytesIO(), "t": torch.zeros(2)}
    with pytest.raises(dcpx.CheckpointFormatError) as info:
        dcpx.load(out, tmp_path, max_item_bytes=1 << 20)
    assert "stream claims 8589934592 bytes" in str(info.value) and fqn in str(info.value)
    # refused from the header: the transform was never asked to produce the claimed bytes
    assert not [c for c in toys.RECORD.of(op="decode") if c.nbytes == 1 << 33]


def test_the_same_items_load_when_their_headers_are_honest(toys: Any, tmp_path: Path) -> None:
    state = {"blob": io.BytesIO(b"abc" * 100), "t": torch.arange(2.0)}
    dcp.save(state, storage_writer=StockWriter(tmp_path, _extensions=[toys.XorTransform()]))
    out = {"blob": io.BytesIO(), "t": torch.zeros(2)}
    dcpx.load(out, tmp_path, max_item_bytes=1 << 20)
    assert out["blob"].getvalue() == b"abc" * 100 and torch.equal(out["t"], state["t"])


@pytest.mark.parametrize("compat", [False, True])
def test_an_entry_over_max_item_bytes_is_refused_before_it_is_read(tmp_path: Path, compat: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dcpx.save({"blob": io.BytesIO(os.urandom(3 << 20)), "t": torch.ones(2)}, tmp_path, compat=compat)
    sizes: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: sizes.append(n) or real_pread(fd, n, off))
    with pytest.raises(dcpx.CheckpointFormatError) as info:
        dcpx.load({"blob": io.BytesIO(), "t": torch.zeros(2)}, tmp_path, max_item_bytes=1 << 20)
    assert "blob" in str(info.value) and "max_item_bytes=1048576" in str(info.value)
    assert max(sizes, default=0) < 1 << 20


def test_a_failed_load_no_longer_writes_into_the_destination(toys: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = 64 << 10
    dcpx.save({"w": torch.ones(8 * chunk // 4)}, tmp_path, transforms=["xor"], chunk_size=chunk)
    decode_into = toys.XorTransform.decode_into

    def slow_or_failing(self: Any, data: memoryview, info: Any, out: memoryview) -> None:
        if info.index == 0:
            raise dcpx.IntegrityError("chunk 0 is damaged")
        time.sleep(0.3)  # still decoding when chunk 0 has failed
        decode_into(self, data, info, out)

    monkeypatch.setattr(toys.XorTransform, "decode_into", slow_or_failing)
    dest = torch.zeros(8 * chunk // 4)
    with pytest.raises(dcpx.IntegrityError, match="chunk 0 is damaged"):
        dcpx.load({"w": dest}, tmp_path, workers=2)
    dest.fill_(7.0)  # the caller falls back, e.g. to another checkpoint, in the same tensor
    time.sleep(0.6)
    assert bool((dest == 7.0).all())


def test_verify_binds_chunks_to_the_item_as_load_does(toys: Any, tmp_path: Path) -> None:
    dcpx.save({"blob": io.BytesIO(b"x" * 100), "t": torch.ones(4)}, tmp_path, transforms=["probe"])
    saved = {c.fqn: c.nbytes for c in toys.RECORD.of(op="encode")}
    toys.RECORD.clear()
    assert all(c.status == "missing" for c in verify_checkpoint(str(tmp_path), full=True))
    verified = [(c.fqn, c.nbytes) for c in toys.RECORD.of(op="decode")]
    assert {fqn for fqn, _ in verified} == {"blob", "t"} and saved["blob"] > 0
    assert all(nbytes == saved[fqn] for fqn, nbytes in verified), verified


def test_workers_may_be_any_integer_type(tmp_path: Path) -> None:
    import numpy as np

    assert dcpx.FileSystemWriter(tmp_path, workers=np.int64(3)).workers == 3
    assert dcpx.FileSystemReader(tmp_path, workers=np.int32(2)).workers == 2


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_positive_count(tmp_path: Path, workers: Any) -> None:
    with pytest.raises(dcpx.ConfigError, match="workers"):
        dcpx.FileSystemWriter(tmp_path, workers=workers)
    with pytest.raises(dcpx.ConfigError, match="workers"):
        dcpx.FileSystemReader(tmp_path, workers=workers)


def test_require_takes_names_not_versions(tmp_path: Path) -> None:
    with pytest.raises(dcpx.ConfigError, match="'stream.zstd'"):
        dcpx.FileSystemReader(tmp_path, require=["stream.zstd/1"])


def test_a_lazy_outer_layer_cannot_feed_an_inner_one_more_than_the_item_holds(toys: Any, tmp_path: Path) -> None:
    """torch's zstd outside a dcpx transform: what the inner layer reads is bounded too."""
    from torch.distributed.checkpoint._extension import ZStandard
    zstandard = pytest.importorskip("zstandard")
    dcp.save({"blob": io.BytesIO(b"abc"), "t": torch.ones(2)}, storage_writer=StockWriter(tmp_path))
    bomb = zstandard.ZstdCompressor().compress(struct.pack("<Q", 3) + bytes(16 << 20))
    with open(tmp_path / "bomb.distcp", "wb") as f:
        f.write(bomb)

    def edit(metadata: Any) -> None:
        stored = storage_items(metadata)["blob"]
        stored.relative_path, stored.offset, stored.length = "bomb.distcp", 0, len(bomb)
        stored.transform_descriptors = [toys.XorTransform().get_descriptor(), ZStandard().get_descriptor()]

    rewrite_metadata(tmp_path, edit)
    with pytest.raises(dcpx.CheckpointFormatError, match="stream holds more than the 2097152 bytes") as caught:
        dcpx.load({"blob": io.BytesIO(), "t": torch.zeros(2)}, tmp_path, max_item_bytes=1 << 20)
    assert str(caught.value).startswith("blob ")


def _relabel(path: Path, descriptors: list[str]) -> None:
    def edit(metadata: Any) -> None:
        storage_items(metadata)["w"].transform_descriptors = descriptors

    rewrite_metadata(path, edit)


def test_an_unframed_item_lists_a_bounded_number_of_stream_transforms(tmp_path: Path) -> None:
    """Each listed layer nests one more reader: hundreds of them once ended in RecursionError."""
    dcp.save({"w": torch.ones(4)}, storage_writer=StockWriter(tmp_path))
    _relabel(tmp_path, ["stream.zstd/1"] * 400)
    with pytest.raises(dcpx.CheckpointFormatError, match="^w .*lists 400 stream transforms"):
        dcpx.load({"w": torch.zeros(4)}, tmp_path)


def test_a_stream_transform_failing_on_its_input_names_the_item(tmp_path: Path) -> None:
    """torch's own zstd (the core alone) fed bytes that are not zstd: its ZstdError is the
    item's CheckpointFormatError, for a load and for verify alike."""
    dcp.save({"w": torch.ones(4)}, storage_writer=StockWriter(tmp_path))
    _relabel(tmp_path, ["stream.zstd/1"])
    with pytest.raises(dcpx.CheckpointFormatError, match=r"^w .*cannot decode it \(ZstdError"):
        dcpx.load({"w": torch.zeros(4)}, tmp_path)
    (check,) = verify_checkpoint(str(tmp_path), full=True)
    assert check.status == "failed" and "ZstdError" in check.detail


def test_an_item_of_many_chunks_keeps_a_bounded_number_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chunk_size is the checkpoint's to choose: thousands of tiny chunks must not become
    thousands of pending decodes (each holds memory until it runs)."""
    from dcpx import pipeline, read_job

    state = {"w": torch.arange(8192, dtype=torch.int32)}
    dcpx.save(state, tmp_path, transforms=["zstd"], chunk_size=16)  # 2048 chunks
    pending: list[int] = []
    real_pool = read_job.codec_pool

    class Counting:
        def __init__(self, pool: Any) -> None:
            self.pool, self.futures = pool, []

        def submit(self, fn: Any, *args: Any) -> Any:
            self.futures.append(self.pool.submit(fn, *args))
            pending.append(sum(not f.done() for f in self.futures))
            return self.futures[-1]

    monkeypatch.setattr(read_job, "codec_pool", lambda workers: Counting(real_pool(workers)))
    out = {"w": torch.zeros(8192, dtype=torch.int32)}
    dcpx.load(out, tmp_path, workers=2)
    assert torch.equal(out["w"], state["w"]) and len(pending) == 2048
    assert max(pending) <= pipeline.CHUNKS_IN_FLIGHT


def test_convert_refuses_a_recorded_size_no_machine_holds(tmp_path: Path) -> None:
    from dcpx.convert import convert

    dcpx.save({"t": torch.ones(4)}, tmp_path / "src")

    def edit(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["t"]
        entry.size = torch.Size([1 << 50])
        entry.chunks[0].sizes = torch.Size([1 << 50])

    rewrite_metadata(tmp_path / "src", edit)
    with pytest.raises(dcpx.CheckpointFormatError, match="item 't': cannot allocate its recorded size"):
        convert(tmp_path / "src", tmp_path / "dst")

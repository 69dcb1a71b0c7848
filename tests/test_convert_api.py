"""``dcpx.convert.convert`` in-process: sharded items, groups, cleanup, file formats."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

import dcpx
from checkpoint_helpers import assert_same, blank, data_files, rewrite_metadata
from cli_helpers import installed, tensors_only, training_state
from dcpx.convert import ConvertVerificationError, compare, convert, open_source, transform_from_spec


def write_sharded(path: Path) -> torch.Tensor:
    """A stock checkpoint whose tensor is stored as two row shards (as two ranks write it),
    made by driving torch's own ``FileSystemWriter`` through the StorageWriter protocol."""
    full = torch.arange(6 * 1024, dtype=torch.float32).reshape(6, 1024)
    props = TensorProperties(dtype=torch.float32)
    chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 1024])),
              ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([4, 1024]))]
    items = [WriteItem(MetadataIndex("w", c.offsets, i), WriteItemType.SHARD, tensor_data=TensorWriteData(c, props, full.shape))
             for i, c in enumerate(chunks)]
    items.append(WriteItem(MetadataIndex("step"), WriteItemType.BYTE_IO))
    step = io.BytesIO()
    torch.save(9, step)
    data = {items[0].index: full[:2].clone(), items[1].index: full[2:].clone(), items[2].index: step}

    class Planner:
        def resolve_data(self, item: WriteItem) -> Any:
            return data[item.index]

    writer = dcp.FileSystemWriter(path)
    writer.set_up_storage_writer(True)
    (plan,) = writer.prepare_global_plan([writer.prepare_local_plan(SavePlan(items))])
    results = writer.write_data(plan, Planner()).value()
    writer.finish(Metadata({"w": TensorStorageMetadata(props, full.shape, chunks), "step": BytesStorageMetadata()}), [results])
    return full


def test_sharded_items_keep_their_chunks_across_groups(tmp_path: Path) -> None:
    full = write_sharded(tmp_path / "sharded")
    seen: list[tuple[str, int, int]] = []
    report = convert(tmp_path / "sharded", tmp_path / "out", transforms=["zstd"], group_bytes=1,
                     progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert report.verified and report.items == 3
    src = open_source(str(tmp_path / "sharded"))
    out = open_source(str(tmp_path / "out"))
    assert out.metadata.state_dict_metadata == src.metadata.state_dict_metadata
    assert set(out.metadata.storage_data) == set(src.metadata.storage_data)  # same MetadataIndex offsets
    assert len(data_files(tmp_path / "out")) == 3  # one group per item under a 1-byte bound
    assert {s for s, _, _ in seen} == {"convert", "verify"}
    assert seen[-1][1] == seen[-1][2] == report.raw_bytes
    convert(tmp_path / "out", tmp_path / "whole.pt")
    assert_same(torch.load(tmp_path / "whole.pt", weights_only=True), {"w": full, "step": 9})


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    dcp.save(tensors_only(), storage_writer=dcp.FileSystemWriter(tmp_path / "src"))
    (name,) = data_files(tmp_path / "src")
    os.truncate(tmp_path / "src" / name, (tmp_path / "src" / name).stat().st_size - 64)  # the last item is cut
    with pytest.raises(dcpx.CheckpointFormatError, match="truncated"):
        convert(tmp_path / "src", tmp_path / "dst", group_bytes=1)
    assert not (tmp_path / "dst").exists()


def test_overwrite_replaces_a_checkpoint(tmp_path: Path) -> None:
    dcp.save(tensors_only(1), storage_writer=dcp.FileSystemWriter(tmp_path / "a"))
    dcp.save(tensors_only(2), storage_writer=dcp.FileSystemWriter(tmp_path / "b"))
    convert(tmp_path / "a", tmp_path / "dst")
    with pytest.raises(dcpx.ConfigError, match="already exists"):
        convert(tmp_path / "b", tmp_path / "dst")
    old_files = set(data_files(tmp_path / "dst"))
    convert(tmp_path / "b", tmp_path / "dst", overwrite=True)
    assert not old_files & set(data_files(tmp_path / "dst"))
    state = blank(tensors_only(2))
    dcpx.load(state, tmp_path / "dst")
    assert_same(state, tensors_only(2))


class Custom:
    pass


def test_unsafe_torch_file_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "obj": Custom()}, tmp_path / "evil.pt")
    with pytest.raises(dcpx.UnsafeCheckpointError, match=r"evil\.pt.*weights_only=True.*Custom"):
        convert(tmp_path / "evil.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not installed("safetensors"), reason="safetensors is not installed")
def test_safetensors_holds_tensors_only(tmp_path: Path) -> None:
    dcp.save(training_state(), storage_writer=dcp.FileSystemWriter(tmp_path / "src"))
    with pytest.raises(dcpx.ConfigError, match="'optim.lr'.*tensors only"):
        convert(tmp_path / "src", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_transforms_only_for_dcp_destinations(tmp_path: Path) -> None:
    dcp.save(tensors_only(), storage_writer=dcp.FileSystemWriter(tmp_path / "src"))
    with pytest.raises(dcpx.ConfigError, match="DCP checkpoints only"):
        convert(tmp_path / "src", tmp_path / "out.pt", transforms=["zstd"])


def test_transform_spec_options(toys: Any) -> None:
    assert transform_from_spec("xor:seed=7").get_descriptor() == "stream.xor@test/1;seed=7"
    with pytest.raises(dcpx.ConfigError, match="key=value"):
        transform_from_spec("xor:7")


def test_verification_compares_values(tmp_path: Path) -> None:
    """A destination that decodes to other values than the source is reported."""
    dcp.save(tensors_only(1), storage_writer=dcp.FileSystemWriter(tmp_path / "a"))
    dcp.save(tensors_only(2), storage_writer=dcp.FileSystemWriter(tmp_path / "b"))
    with pytest.raises(ConvertVerificationError, match="layer.0.weight.*differ"):
        compare(open_source(str(tmp_path / "a")), open_source(str(tmp_path / "b")), 1 << 20)


def test_unsafe_non_tensor_entry_is_refused(tmp_path: Path) -> None:
    """A DCP entry that only a full unpickler could load is refused, not copied along."""
    dcp.save({"w": torch.ones(3), "obj": Custom()}, storage_writer=dcp.FileSystemWriter(tmp_path / "src"))
    with pytest.raises(dcpx.UnsafeCheckpointError, match=r"src: obj: non-tensor entry refused.*Custom"):
        convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_forged_tensor_size_is_refused_when_assembling(tmp_path: Path) -> None:
    """A shard's tensor size comes from (unauthenticated) metadata; one no machine can hold
    is a format error naming the item, not torch's allocator error."""
    write_sharded(tmp_path / "sharded")

    def grow(metadata: Any) -> None:
        metadata.state_dict_metadata["w"].size = torch.Size([10**7, 10**7])

    rewrite_metadata(tmp_path / "sharded", grow)
    with pytest.raises(dcpx.CheckpointFormatError, match=r"item 'w': cannot allocate its recorded size"):
        convert(tmp_path / "sharded", tmp_path / "whole.pt")
    assert not (tmp_path / "whole.pt").exists()


# -- hostile or unusual single-file sources ---------------------------------------------


def test_compressed_torch_file_is_refused(tmp_path: Path) -> None:
    """torch.save never compresses: a memory-mapped load would read the compressed bytes as
    tensor data (and the check, reading the source the same way, agreed), a plain one would
    inflate a member whatever size it claims."""
    import zipfile

    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(tmp_path / "packed.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    for out in ("out", "out.pt", "out.safetensors"):
        with pytest.raises(dcpx.UnsafeCheckpointError, match=r"packed\.pt: torch.save archive member .* is compressed"):
            convert(tmp_path / "packed.pt", tmp_path / out)
        assert not (tmp_path / out).exists()


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_a_fifo_source_is_refused_at_once(tmp_path: Path, name: str) -> None:
    os.mkfifo(tmp_path / name)
    with pytest.raises(dcpx.UnsafeCheckpointError, match="not a regular file"):
        convert(tmp_path / name, tmp_path / "out")  # opening it for torch.load would wait for a writer


def test_integer_dict_keys_are_refused(tmp_path: Path) -> None:
    """An optimizer's state is keyed by parameter index; DCP keys are strings, so a converted
    copy would hold '0' and '1' and attach no state to any parameter."""
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optim.step()
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(dcpx.CheckpointFormatError, match=r"dict key 0 at optim\.state is a int"):
        convert(tmp_path / "ckpt.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_float4_safetensors_source(tmp_path: Path) -> None:
    """safetensors counts 4-bit values (its shape's last dimension is twice torch's)."""
    from safetensors.torch import save_file

    packed = torch.tensor([0x12, 0x34, 0x56, 0x78], dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(2, 2)
    save_file({"a": packed}, str(tmp_path / "f4.safetensors"))
    for out in ("out", "out.pt", "out2.safetensors"):
        assert convert(tmp_path / "f4.safetensors", tmp_path / out).verified
    got = torch.load(tmp_path / "out.pt", weights_only=True)["a"]
    assert got.dtype == torch.float4_e2m1fn_x2 and got.shape == (2, 2)
    assert torch.equal(got.view(torch.uint8), packed.view(torch.uint8))


def test_a_failed_check_leaves_no_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dcpx.convert as convert_module

    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")

    def mismatch(*args: Any, **kwargs: Any) -> None:
        raise ConvertVerificationError("values differ (injected)")

    monkeypatch.setattr(convert_module, "compare", mismatch)
    for out in ("out", "out.pt", "out.safetensors"):
        with pytest.raises(ConvertVerificationError, match="injected"):
            convert(tmp_path / "src.pt", tmp_path / out)
        assert not (tmp_path / out).exists(), out


def test_a_failed_check_keeps_the_file_it_would_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dcpx.convert as convert_module

    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    torch.save({"w": torch.zeros(4)}, tmp_path / "out.pt")
    before = (tmp_path / "out.pt").read_bytes()

    def mismatch(*args: Any, **kwargs: Any) -> None:
        raise ConvertVerificationError("values differ (injected)")

    monkeypatch.setattr(convert_module, "compare", mismatch)
    with pytest.raises(ConvertVerificationError, match="injected"):
        convert(tmp_path / "src.pt", tmp_path / "out.pt", overwrite=True)
    assert (tmp_path / "out.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.pt", "src.pt"]


@pytest.mark.parametrize("out", ["out", "out.pt", "out.safetensors"])
def test_the_destination_appears_only_once_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str) -> None:
    import dcpx.convert as convert_module

    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    checked = []

    def check_first(*args: Any, **kwargs: Any) -> None:
        assert not (tmp_path / out).exists()  # a kill now would leave no destination
        compare(*args, **kwargs)
        checked.append(out)

    monkeypatch.setattr(convert_module, "compare", check_first)
    convert(tmp_path / "src.pt", tmp_path / out)
    assert checked == [out]
    assert sorted(os.listdir(tmp_path)) == sorted([out, "src.pt"])


def test_a_killed_conversion_leaves_nothing_the_next_one_keeps(tmp_path: Path) -> None:
    """A conversion killed half-way leaves only its staging directory; the next conversion to
    the same destination removes what is in it."""
    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    stage = tmp_path / ".out.pt.dcpx-convert"
    stage.mkdir()
    (stage / "out.pt").write_bytes(os.urandom(4096))  # a half-written file of the killed run
    convert(tmp_path / "src.pt", tmp_path / "out.pt")
    assert sorted(os.listdir(tmp_path)) == ["out.pt", "src.pt"]
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True)["w"], torch.ones(4))


def test_a_conversion_running_to_the_same_destination_is_refused(tmp_path: Path) -> None:
    import fcntl

    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    stage = tmp_path / ".out.dcpx-convert"
    stage.mkdir()
    fd = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the running conversion holds it
        with pytest.raises(dcpx.ConfigError, match="another conversion"):
            convert(tmp_path / "src.pt", tmp_path / "out")
    finally:
        os.close(fd)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["empty directory", "current directory", "link to an empty directory"])
def test_an_existing_directory_is_written_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """It keeps its inode, mode and mount; the checkpoint records the path as given."""
    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    (tmp_path / "out").mkdir()
    os.chmod(tmp_path / "out", 0o2770)
    before = os.stat(tmp_path / "out")
    dst = {"empty directory": str(tmp_path / "out"), "current directory": ".", "link to an empty directory": "link"}[how]
    os.symlink(tmp_path / "out", tmp_path / "link")
    monkeypatch.chdir(tmp_path / "out" if how == "current directory" else tmp_path)
    convert(tmp_path / "src.pt", dst)
    after = os.stat(tmp_path / "out")
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert dcpx.reader.load_metadata(str(tmp_path / "out"))[0].storage_meta.checkpoint_id == dst
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


def test_a_new_checkpoint_records_its_own_path_not_the_staging_one(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    convert(tmp_path / "src.pt", tmp_path / "out")
    assert dcpx.reader.load_metadata(str(tmp_path / "out"))[0].storage_meta.checkpoint_id == str(tmp_path / "out")


def test_a_name_too_long_to_prefix_is_staged_under_a_digest(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    name = "x" * 245 + ".pt"
    convert(tmp_path / "src.pt", tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted([name, "src.pt"])


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without overwrite, whatever another process put at DST during the conversion stays."""
    import dcpx.convert as convert_module

    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")

    def others_file_appears(*args: Any, **kwargs: Any) -> None:
        compare(*args, **kwargs)
        (tmp_path / "out.pt").write_bytes(b"someone else's")

    monkeypatch.setattr(convert_module, "compare", others_file_appears)
    with pytest.raises(dcpx.ConfigError, match="left as it is"):
        convert(tmp_path / "src.pt", tmp_path / "out.pt")
    assert (tmp_path / "out.pt").read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["out.pt", "src.pt"]


def test_a_failed_conversion_into_an_empty_directory_can_be_retried(tmp_path: Path) -> None:
    dcp.save(tensors_only(), storage_writer=dcp.FileSystemWriter(tmp_path / "src"))
    (name,) = data_files(tmp_path / "src")
    whole = (tmp_path / "src" / name).read_bytes()
    os.truncate(tmp_path / "src" / name, len(whole) - 64)
    (tmp_path / "out").mkdir()
    with pytest.raises(dcpx.CheckpointFormatError, match="truncated"):
        convert(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / name).write_bytes(whole)  # repaired: the same command again
    assert convert(tmp_path / "src", tmp_path / "out").verified


@pytest.mark.parametrize("name", ["out/.", "sub/../out", "out\udcff"], ids=["dot", "dotdot", "not-utf8"])
def test_destination_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    convert("src.pt", name)
    out = os.path.normpath(name)
    dest = {"w": torch.zeros(4)}
    dcpx.load(dest, out)
    assert torch.equal(dest["w"], torch.ones(4))
    assert sorted(os.listdir(tmp_path)) == sorted([out, "src.pt", "sub"])


def test_an_empty_path_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "src.pt")
    with pytest.raises(dcpx.ConfigError, match="empty destination"):
        convert(tmp_path / "src.pt", "")


def test_a_dtype_safetensors_cannot_hold_is_named(tmp_path: Path) -> None:
    torch.save({"c": torch.ones(2, dtype=torch.complex128), "w": torch.ones(2)}, tmp_path / "src.pt")
    with pytest.raises(dcpx.ConfigError, match=r"out\.safetensors: item 'c' is torch\.complex128, which safetensors"):
        convert(tmp_path / "src.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("source", ["pt", "dcp"])
def test_quantized_tensors_are_refused_by_name(tmp_path: Path, source: str) -> None:
    """Their scale and zero point would not survive: say so before writing anything."""
    q = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 3, torch.qint8)
    src = tmp_path / ("model.pt" if source == "pt" else "ckpt")
    if source == "pt":
        torch.save({"w": torch.ones(2), "q": q}, src)
    else:
        dcp.save({"w": torch.ones(2), "q": q}, storage_writer=dcp.FileSystemWriter(src))
    with pytest.raises(dcpx.ConfigError, match="'q' is a quantized tensor.*dequantize"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


_SIZE_LIMITED_CONVERT = r"""
import json, os, resource, signal, sys
import torch, dcpx
from dcpx.convert import convert
src, dst = sys.argv[1], sys.argv[2]
dcpx.save({"w": torch.randn(1 << 19)}, src)  # 2 MiB, written before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    convert(src, dst)
except OSError as exc:
    print(json.dumps({"type": type(exc).__name__, "errno": exc.errno, "message": str(exc),
                      "left": sorted(os.listdir(os.path.dirname(dst)))}))
"""


@pytest.mark.parametrize("out", ["out.pt", "out.safetensors"])
def test_a_single_file_the_system_refuses_to_write(tmp_path: Path, out: str) -> None:
    """torch.save and safetensors report a full disk (here a file-size limit) in errors of
    their own; the conversion says what the system refused, as a ``WriteError``."""
    import errno
    import json
    import subprocess
    import sys

    if out.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    src, dst = tmp_path / "src", tmp_path / "dst" / out
    dst.parent.mkdir()
    env = os.environ | {"DCPX_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-c", _SIZE_LIMITED_CONVERT, str(src), str(dst)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout, done.stderr
    failure = json.loads(done.stdout)
    assert failure["type"] == "WriteError" and failure["errno"] == errno.EFBIG, failure
    assert "file failed: File too large" in failure["message"], failure
    assert failure["message"].startswith(f"[Errno 27] {dst}: ") and "dcpx-convert" not in failure["message"], failure
    assert failure["left"] == [], failure  # no destination, no staging


def test_groups_count_what_non_tensor_entries_decode_to(tmp_path: Path) -> None:
    """A compressed entry stores a few KiB of a MiB of zeros: groups are sized by the decoded
    size (the manifest's), or, where no manifest records it, by the most an entry may hold."""
    from torch.distributed.checkpoint._extension import ZStandard

    state = {f"blob{i}": bytes(1 << 20) for i in range(4)}
    dcp.save(state, storage_writer=dcpx.FileSystemWriter(tmp_path / "dcpx", transforms=["zstd"]))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "stock", _extensions=[ZStandard()]))
    limit = 3 << 20  # room for two decoded entries, and for all four as stored
    src = open_source(str(tmp_path / "dcpx"))
    assert all(src.stored_size(i) < 64 << 10 and src.raw_size(i) > 1 << 20 for i in src.items)
    assert [len(g) for g in src.groups(src.items, limit)] == [2, 2]
    stock = open_source(str(tmp_path / "stock"))
    assert [len(g) for g in stock.groups(stock.items, limit)] == [1, 1, 1, 1]
    report = convert(tmp_path / "dcpx", tmp_path / "out", group_bytes=limit)
    assert report.verified and report.raw_bytes == sum(src.raw_size(i) for i in src.items)
    loaded = {k: None for k in state}
    dcp.load(loaded, storage_reader=dcpx.FileSystemReader(tmp_path / "out"))
    assert loaded == state

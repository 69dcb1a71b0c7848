"""Interoperability with stock torch DCP in both directions, and the SAFETENSORS format."""

from __future__ import annotations

import copy
import os
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import SerializationFormat

import dcpx
from checkpoint_helpers import assert_same, blank, data_files, storage_items
from toy_transforms import BitFlip

safetensors = pytest.importorskip("safetensors")
import safetensors.torch  # noqa: E402


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(40, 30, generator=g),
        "h": torch.randn(500, generator=g).half(),
        "bf": torch.randn(64, generator=g).bfloat16(),
        "i": torch.arange(1000, dtype=torch.int64),
        "b": torch.rand(77, generator=g) > 0.3,
        "f8": torch.randn(128, generator=g).to(torch.float8_e4m3fn),
        "c": torch.complex(torch.randn(5, generator=g), torch.randn(5, generator=g)),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 4),
        "t": torch.randn(8, 6, generator=g).t(),
        "nested": {"x": torch.ones(3, dtype=torch.int16), "step": 10, "name": "n"},
        "lst": [1, 2, "three"],
    }


@pytest.mark.parametrize("thread_count", [1, 4])
@pytest.mark.parametrize("single_file_per_rank", [True, False])
@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("via", ["dcp", "dcpx"])
def test_dcpx_reads_stock_checkpoints(tmp_path: Path, thread_count: int, single_file_per_rank: bool, zstd: bool,
                                      via: str) -> None:
    sd = state()
    expected = copy.deepcopy(sd)
    writer = dcp.FileSystemWriter(
        tmp_path, single_file_per_rank=single_file_per_rank, thread_count=thread_count,
        serialization_format=SerializationFormat.TORCH_SAVE, _extensions=[ZStandard()] if zstd else None,
    )
    dcp.save(sd, storage_writer=writer)
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    assert items["w"].transform_descriptors == (["stream.zstd/1"] if zstd else None)
    dest = blank(sd)
    if via == "dcp":
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))
    else:
        dcpx.load(dest, tmp_path)
    assert_same(dest, expected)


def test_dcpx_reads_stock_chain_in_stock_order(fresh_host: Any, tmp_path: Path) -> None:
    """Stock torch records a chain innermost first; dcpx must undo it outermost first."""
    mod = types.ModuleType("flip_for_interop")

    @dcpx.hookimpl
    def dcpx_register_transforms(register: Any) -> None:
        register(BitFlip)

    mod.dcpx_register_transforms = dcpx_register_transforms  # type: ignore[attr-defined]
    dcpx.register_plugin(mod, name="flip-for-interop")
    sd = state()
    expected = copy.deepcopy(sd)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path, _extensions=[ZStandard(), BitFlip()]))
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    assert items["w"].transform_descriptors == ["stream.bitflip@user/1", "stream.zstd/1"]
    dest = blank(sd)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)


COMPAT = {
    "compat": dict(compat=True),
    "compat-zstd": dict(compat=True, transforms=["zstd"]),
    "compat-ZStandard": dict(compat=True, transforms=[ZStandard()]),
    "compat-extensions": dict(compat=True, _extensions=[ZStandard()]),
    "explicit-torch-save": dict(serialization_format=SerializationFormat.TORCH_SAVE, transforms=["zstd"]),
}


@pytest.mark.parametrize("thread_count", [1, 3])
@pytest.mark.parametrize("single_file_per_rank", [True, False])
@pytest.mark.parametrize("mode", list(COMPAT))
def test_stock_reads_dcpx_compat(tmp_path: Path, mode: str, single_file_per_rank: bool, thread_count: int) -> None:
    sd = state()
    expected = copy.deepcopy(sd)
    dcp.save(sd, storage_writer=dcpx.FileSystemWriter(
        tmp_path, single_file_per_rank=single_file_per_rank, thread_count=thread_count, **COMPAT[mode]))
    dest = blank(sd)
    dcp.load(dest, storage_reader=dcp.FileSystemReader(tmp_path))
    assert_same(dest, expected)
    # and dcpx reads its own compat output
    dest = blank(sd)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    zstd = "transforms" in COMPAT[mode] or "_extensions" in COMPAT[mode]
    assert items["w"].transform_descriptors == (["stream.zstd/1"] if zstd else None)


def test_compat_refuses_what_stock_cannot_read(toys: Any, tmp_path: Path) -> None:
    with pytest.raises(dcpx.ConfigError):
        dcpx.FileSystemWriter(tmp_path, compat=True, transforms=["xor"])
    with pytest.raises(dcpx.ConfigError):
        dcpx.FileSystemWriter(tmp_path, compat=True, transforms=["zstd", "rev"])


@pytest.mark.parametrize("where", ["transforms", "_extensions"])
def test_compat_writes_a_user_torch_extension_as_stock_does(tmp_path: Path, where: str) -> None:
    """A user's torch ``StreamTransformExtension`` is torch's own format: in compat mode it is
    written exactly as stock torch writes it, and a stock reader given the same extension
    registry stock torch needs loads it."""
    from torch.distributed.checkpoint._extension import ExtensionRegistry

    sd = state()
    expected = copy.deepcopy(sd)
    dcp.save(sd, storage_writer=dcpx.FileSystemWriter(tmp_path, compat=True, **{where: [BitFlip()]}))
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    assert items["w"].transform_descriptors == ["stream.bitflip@user/1"]
    registry = ExtensionRegistry()
    registry.register(BitFlip)
    for reader in (dcp.FileSystemReader(tmp_path, _extension_registry=registry),
                   dcpx.FileSystemReader(tmp_path, _extension_registry=registry)):
        dest = blank(sd)
        dcp.load(dest, storage_reader=reader)
        assert_same(dest, expected)


@pytest.mark.parametrize("transforms", [None, ["zstd"]], ids=["raw", "zstd"])
def test_stock_reader_refuses_default_dcpx_output(tmp_path: Path, transforms: list[str] | None) -> None:
    sd = {"w": torch.randn(10, 10), "n": 3}
    dcpx.save(sd, tmp_path, transforms=transforms)
    dest = {"w": torch.zeros(10, 10), "n": None}
    with pytest.raises(CheckpointException) as info:
        dcp.load(dest, storage_reader=dcp.FileSystemReader(tmp_path))
    assert "frame@dcpx" in str(info.value) or "raw@dcpx" in str(info.value)
    assert torch.equal(dest["w"], torch.zeros(10, 10))


# -- SAFETENSORS ------------------------------------------------------------------------------------------


def _tensor_leaves(sd: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif isinstance(v, dict):
            out.update(_tensor_leaves(v, f"{prefix}{k}."))
    return out


@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_safetensors_files_are_valid(tmp_path: Path, single_file_per_rank: bool, thread_count: int) -> None:
    sd = state()
    expected = copy.deepcopy(sd)
    dcpx.save(sd, tmp_path, serialization_format=SerializationFormat.SAFETENSORS,
              single_file_per_rank=single_file_per_rank, thread_count=thread_count)
    metadata = dcpx.reader.load_metadata(str(tmp_path))[0]
    items = storage_items(metadata)
    tensors = _tensor_leaves(expected)
    tensor_files = {items[fqn].relative_path for fqn in tensors}
    found: dict[str, torch.Tensor] = {}
    for name in sorted(tensor_files):
        loaded = safetensors.torch.load_file(str(tmp_path / name))
        with safetensors.safe_open(str(tmp_path / name), framework="pt") as f:
            assert set(f.keys()) == set(loaded)
            assert f.metadata() is not None
        for key, value in loaded.items():
            assert key not in found
            found[key] = value
    assert set(found) == set(tensors)
    for fqn, t in tensors.items():
        assert_same(found[fqn], t.contiguous(), fqn)
        # metadata points straight at the tensor bytes inside the safetensors payload
        info = items[fqn]
        assert info.length == t.numel() * t.element_size()
    dest = blank(sd)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)
    dest = blank(sd)
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))
    assert_same(dest, expected)


@pytest.mark.parametrize("spec", [["zstd"], [ZStandard()], "rules"])
def test_safetensors_with_transforms_is_config_error(tmp_path: Path, spec: Any) -> None:
    transforms = [dcpx.Rule(["zstd"], match="w*")] if spec == "rules" else spec
    with pytest.raises(dcpx.ConfigError, match="(?i)safetensors"):
        dcpx.FileSystemWriter(tmp_path, serialization_format=SerializationFormat.SAFETENSORS, transforms=transforms)
    with pytest.raises(dcpx.ConfigError):
        dcpx.save({"w": torch.ones(2)}, tmp_path, serialization_format=SerializationFormat.SAFETENSORS,
                  transforms=transforms)
    assert not data_files(tmp_path) if os.path.isdir(tmp_path) else True


def test_compat_with_safetensors_is_config_error(tmp_path: Path) -> None:
    """compat promises stock's reader can load the result; its safetensors output it cannot."""
    with pytest.raises(dcpx.ConfigError, match="compat=True"):
        dcpx.FileSystemWriter(tmp_path, compat=True, serialization_format=SerializationFormat.SAFETENSORS)


class _Casting(dcp.DefaultSavePlanner):
    """A save planner that casts every tensor in resolve_data but records the original dtype."""

    def __init__(self, cast: Any) -> None:
        super().__init__()
        self.cast = cast

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)
        return self.cast(data) if isinstance(data, torch.Tensor) else data


@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("cast", [torch.Tensor.half, torch.Tensor.double], ids=["down", "up"])
def test_stock_checkpoint_of_a_casting_planner_loads_as_stock_loads_it(tmp_path: Path, zstd: bool, cast: Any) -> None:
    """A save planner that casts in resolve_data leaves stock items of another dtype than the
    metadata records; both readers cast them into the destination, except that dcpx refuses
    an up-cast item it must decompress.  The tensor is larger than the allowance for a
    torch.save archive's own bytes, so an up-cast item is larger than its metadata says."""
    from dcpx.verify import verify_checkpoint

    src = {"w": torch.randn(512, 1024), "rows": torch.randn(6, 3)}
    dcp.save(src, storage_writer=dcp.FileSystemWriter(tmp_path, _extensions=[ZStandard()] if zstd else None),
             planner=_Casting(cast))
    by_stock, by_dcpx = blank(src), blank(src)
    dcp.load(by_stock, storage_reader=dcp.FileSystemReader(tmp_path))
    if zstd and cast is torch.Tensor.double:
        # decompressed in memory, an item is bounded by its recorded tensor (against bombs)
        with pytest.raises(dcpx.CheckpointFormatError, match=r"^w .*wider dtype"):
            dcpx.load(by_dcpx, tmp_path)
        return
    dcp.load(by_dcpx, storage_reader=dcpx.FileSystemReader(tmp_path))
    assert_same(by_dcpx, by_stock)
    assert torch.equal(by_dcpx["w"], cast(src["w"]).float())
    assert {c.status for c in verify_checkpoint(str(tmp_path), full=True)} == {"missing"}  # decoded, no digest


def test_a_stored_tensor_that_cannot_be_cast_is_refused_by_name(tmp_path: Path) -> None:
    """Quantized where the metadata records float32: no destination of the recorded dtype takes it."""
    from dcpx.verify import verify_checkpoint

    quantize = _Casting(lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8))
    dcp.save({"w": torch.randn(4, 4)}, storage_writer=dcp.FileSystemWriter(tmp_path), planner=quantize)
    with pytest.raises(dcpx.CheckpointFormatError, match=r"^w .*qint8.*float32"):
        dcpx.load({"w": torch.zeros(4, 4)}, tmp_path)
    (check,) = verify_checkpoint(str(tmp_path), full=True)
    assert check.status == "failed" and "no cast" in check.detail


def test_an_empty_path_is_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As with stock torch, whose ``Path("")`` is ``"."``."""
    monkeypatch.chdir(tmp_path)
    dcp.save({"a": torch.ones(3)}, storage_writer=dcpx.FileSystemWriter(""))
    assert (tmp_path / ".metadata").is_file()
    dest = {"a": torch.zeros(3)}
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(""))
    assert torch.equal(dest["a"], torch.ones(3))


def test_alternating_stock_and_dcpx_saves_in_one_directory(tmp_path: Path) -> None:
    """Each save replaces the previous one completely, whichever library wrote either."""
    def check(value: float) -> None:
        dest = {"a": torch.zeros(3)}
        dcpx.load(dest, tmp_path)
        assert torch.equal(dest["a"], torch.full((3,), value))

    dcp.save({"a": torch.full((3,), 1.0), "x": torch.ones(5)},
             storage_writer=dcp.FileSystemWriter(tmp_path, single_file_per_rank=False))
    check(1.0)
    dcpx.save({"a": torch.full((3,), 2.0)}, tmp_path, transforms=["zstd"])
    check(2.0)
    names = set(os.listdir(tmp_path)) - {".dcpx.lock"}
    metadata = dcpx.reader.load_metadata(str(tmp_path))[0]
    referenced = {info.relative_path for info in metadata.storage_data.values()}
    assert {n for n in names if n.endswith(".distcp")} == referenced  # the stock files are gone
    dcp.save({"a": torch.full((3,), 3.0)}, storage_writer=dcp.FileSystemWriter(tmp_path))
    check(3.0)
    dcpx.save({"a": torch.full((3,), 4.0)}, tmp_path)
    check(4.0)
    names = set(os.listdir(tmp_path)) - {".dcpx.lock"}
    metadata = dcpx.reader.load_metadata(str(tmp_path))[0]
    referenced = {info.relative_path for info in metadata.storage_data.values()}
    assert names == referenced | {".metadata", f".dcpx-manifest-{metadata.storage_meta.save_id}.json"}


def test_reader_accepts_torch_extension_registry(tmp_path):
    """torch's experimental `_extension_registry=` keeps working: its classes read what no
    plugin provides, and a registry holding torch's own ZStandard causes no conflict."""
    from torch.distributed.checkpoint._extension import ExtensionRegistry

    state = {"w": torch.randn(16, 8), "n": torch.arange(5)}
    for name, ext in (("flip", BitFlip()), ("zstd", ZStandard())):
        path = tmp_path / name
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, _extensions=[ext]))
        registry = ExtensionRegistry()
        registry.register(type(ext))
        out = {"w": torch.zeros(16, 8), "n": torch.zeros(5, dtype=torch.long)}
        dcp.load(out, storage_reader=dcpx.FileSystemReader(path, _extension_registry=registry))
        assert torch.equal(out["w"], state["w"]) and torch.equal(out["n"], state["n"])
    with pytest.raises(dcpx.UnknownTransformError, match="stream.bitflip@user"):
        dcpx.load({"w": torch.zeros(16, 8), "n": torch.zeros(5, dtype=torch.long)}, tmp_path / "flip")


def test_metadata_with_the_legacy_sharded_tensor_properties_loads(tmp_path: Path) -> None:
    """Checkpoints from the sharded-tensor era name ``_shard.sharded_tensor.metadata``'s
    TensorProperties in ``.metadata``; the allow-list admits that data-only class."""
    from unittest import mock

    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties as Legacy

    sd = {"a": torch.randn(4, 4)}
    with mock.patch("torch.distributed.checkpoint.metadata.TensorProperties", Legacy):
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path))
    assert b"sharded_tensor.metadata" in (tmp_path / ".metadata").read_bytes()
    dest = {"a": torch.zeros(4, 4)}
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))
    assert torch.equal(dest["a"], sd["a"])


def test_storage_meta_names_checkpoint_save_and_load(tmp_path: Path) -> None:
    writer = dcpx.FileSystemWriter(tmp_path)
    dcp.save({"a": torch.zeros(4, 4)}, storage_writer=writer)
    reader = dcpx.FileSystemReader(tmp_path)
    meta = reader.read_metadata().storage_meta
    assert str(meta.checkpoint_id) == str(tmp_path)
    assert meta.save_id == writer.save_id
    assert meta.load_id == reader.load_id
    first = reader.load_id
    reader.reset()
    assert reader.load_id != first  # each load gets its own id, as with stock torch


@pytest.mark.parametrize("stock", [True, False])
def test_items_holding_buffers_are_read_one_per_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     stock: bool) -> None:
    """Stock items (``torch.load`` allocates each one whole) run at most one per core at a
    time, so memory stays as stock's reader needs; raw dcpx items, read straight into their
    tensors, may run two per core."""
    import threading
    import time

    from dcpx.read_job import ReadJob
    from dcpx.reader import READS_PER_CORE

    state = {f"t{i}": torch.randn(64, 64) for i in range(24)}
    writer = dcp.FileSystemWriter(tmp_path) if stock else dcpx.FileSystemWriter(tmp_path)
    dcp.save(state, storage_writer=writer)
    lock, running, most = threading.Lock(), [0], [0]
    run = ReadJob.run

    def counted(self: ReadJob, target: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)  # long enough for the pool's other threads to start theirs
            return run(self, target)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ReadJob, "run", counted)
    dest = blank(state)
    dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path, workers=2))
    assert_same(dest, state)
    assert most[0] == (2 if stock else 2 * READS_PER_CORE)


# dtypes safetensors 0.8 stores (F8_E4M3FNUZ, F8_E5M2FNUZ, F8_E8M0, F4) besides the common ones
NEWER_SAFETENSORS_DTYPES = [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2]


@pytest.mark.parametrize("dtype", NEWER_SAFETENSORS_DTYPES, ids=str)
def test_safetensors_format_round_trips_newer_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    """Every byte value, read back bit-exact by dcpx and by safetensors' own loader."""
    t = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    dcpx.save({"t": t, "step": 3}, tmp_path, serialization_format=SerializationFormat.SAFETENSORS)
    dest = {"t": torch.zeros(16, 16, dtype=torch.uint8).view(dtype), "step": 0}
    dcpx.load(dest, tmp_path)
    assert dest["t"].dtype == dtype and torch.equal(dest["t"].view(torch.uint8), t.view(torch.uint8))
    assert dest["step"] == 3
    (name,) = {info.relative_path for index, info in storage_items(dcpx.reader.load_metadata(str(tmp_path))[0]).items() if index == "t"}
    with safetensors.safe_open(str(tmp_path / name), framework="pt") as f:
        back = f.get_tensor("t")
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_safetensors_cannot_hold_a_scalar_of_packed_float4(tmp_path: Path) -> None:
    """F4 counts 4-bit values: a 0-d ``float4_e2m1fn_x2`` (two of them) has no shape there."""
    t = torch.tensor(7, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(dcpx.ConfigError, match=r"'t'.*float4_e2m1fn_x2"):
        dcpx.save({"t": t}, tmp_path, serialization_format=SerializationFormat.SAFETENSORS)

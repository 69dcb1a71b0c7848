"""End to end: a model's state dict through dcpx.save / dcpx.load, bit for bit, and both
directions of interoperability with stock torch DCP."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.filesystem import SerializationFormat

import dcpx
from dcpx_zstd import ZstdTransform

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def model_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(300, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 256),
        torch.nn.GELU(), torch.nn.Linear(256, 64),
    )
    state: dict[str, Any] = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state["model.4.weight"] = state["model.4.weight"].bfloat16()
    state["model.2.weight"][0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, 3.5, -1e-40])
    state.update({
        "half": torch.randn(1001).half(),
        "double": torch.randn(77, dtype=torch.float64),
        "fp8": torch.randn(4096).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(100).to(torch.float8_e5m2),
        "complex": torch.randn(33, dtype=torch.complex64),
        "ids": torch.arange(5000, dtype=torch.int64),
        "mask": torch.rand(999) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "extra": {"step": 42, "note": "hello"},
    })
    return state


def blank(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v) if not isinstance(v, dict)
                else {kk: None for kk in v}) for k, v in state.items()}


def assert_bit_exact(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
        else:
            assert got[key] == value, key


def descriptors(path: Path) -> set[str]:
    import pickle

    with open(path / ".metadata", "rb") as f:  # our own freshly written file
        md = pickle.load(f)
    return {d for info in md.storage_data.values() for d in (info.transform_descriptors or [])
            if d.startswith("stream.zstd")}


@pytest.mark.parametrize("options, expected", [
    ({}, {"stream.zstd/1;group=float32", "stream.zstd/1;group=bfloat16", "stream.zstd/1;group=float16",
          "stream.zstd/1;group=float64", "stream.zstd/1;group=int64", "stream.zstd/1;group=none"}),
    ({"grouping": "none"}, {"stream.zstd/1;group=none"}),
    ({"grouping": "int32", "level": 1}, {"stream.zstd/1;group=int32"}),
    ({"grouping": torch.bfloat16, "level": -3}, {"stream.zstd/1;group=bfloat16"}),
    ({"raw_threshold": 0.3}, None),
    ({"torch_format": True}, {"stream.zstd/1"}),
])
def test_save_load_bit_exact(tmp_path: Path, options: dict[str, Any], expected: set[str] | None) -> None:
    state = model_state()
    want = copy.deepcopy(state)
    transform = dcpx.transform("zstd", **options) if options else "zstd"
    dcpx.save(state, tmp_path, transforms=[transform], chunk_size=1 << 16)
    if expected is not None:
        assert descriptors(tmp_path) == expected
    got = blank(state)
    dcpx.load(got, tmp_path)
    assert_bit_exact(got, want)


def test_compat_checkpoint_loads_in_stock_torch(tmp_path: Path) -> None:
    state = {k: v for k, v in model_state().items() if isinstance(v, torch.Tensor)}
    want = copy.deepcopy(state)
    dcpx.save(state, tmp_path, transforms=[ZstdTransform(level=5)], compat=True)
    assert descriptors(tmp_path) == {"stream.zstd/1"}
    got = blank(state)
    dcp.load(got, storage_reader=dcp.FileSystemReader(tmp_path))
    assert_bit_exact(got, want)


def test_stock_torch_checkpoint_loads_through_this_plugin(tmp_path: Path) -> None:
    state = {k: v for k, v in model_state().items() if isinstance(v, torch.Tensor)}
    want = copy.deepcopy(state)
    writer = dcp.FileSystemWriter(tmp_path, serialization_format=SerializationFormat.TORCH_SAVE,
                                  _extensions=[ZStandard()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=writer)
    assert dcpx.plugin_host().lookup("stream.zstd").cls is ZstdTransform
    got = blank(state)
    dcpx.load(got, tmp_path)
    assert_bit_exact(got, want)


def test_damaged_checkpoint_names_the_item(tmp_path: Path) -> None:
    state = {"layer.weight": torch.randn(512, 256) * 0.02}
    dcpx.save(state, tmp_path, transforms=["zstd"])
    data = sorted(p for p in tmp_path.iterdir() if p.suffix == ".distcp")[0]
    blob = bytearray(data.read_bytes())
    frame = blob.find(b"\x28\xb5\x2f\xfd")  # the zstd frame of the exponent plane
    assert frame > 0
    blob[frame + 200] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(dcpx.DcpxError, match="layer.weight"):
        dcpx.load({"layer.weight": torch.zeros(512, 256)}, tmp_path)

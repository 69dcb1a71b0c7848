"""Save/load round trips through dcpx.save/load and dcp.save/load with the dcpx writer/reader."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpx
from checkpoint_helpers import assert_same, blank, data_files, storage_items

CHUNK = 4096


def rich_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(42)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "f32": randn(37, 41),  # 6068 bytes: two chunks
        "f64": randn(700).double(),  # 5600 bytes
        "f16": randn(3000).half(),
        "bf16": randn(5000).bfloat16(),  # 10000 bytes: three chunks
        "f8": (randn(9000) * 4).to(torch.float8_e4m3fn),
        "f8e5": randn(100).to(torch.float8_e5m2),
        "i8": torch.randint(-128, 127, (513,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=g),
        "i16": torch.randint(-30000, 30000, (2049,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (1500,), dtype=torch.int32, generator=g),
        "i64": torch.randint(-2**62, 2**62, (1100,), dtype=torch.int64, generator=g),
        "bool": torch.rand(3333, generator=g) > 0.5,
        "c64": torch.complex(randn(800), randn(800)),
        "c128": torch.complex(randn(10), randn(10)).to(torch.complex128),
        "scalar": torch.tensor(3.25),
        "iscalar": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0),
        "empty2d": torch.empty(5, 0, dtype=torch.int32),
        "transposed": randn(30, 50).t(),  # non-contiguous
        "strided": randn(20, 40)[:, ::3],  # non-contiguous with gaps
        "view_of_bigger": randn(1000)[100:300],  # storage larger than the tensor
        "expanded": torch.arange(6.0).expand(4, 6),  # zero strides
        "nested": {
            "layer": {"weight": randn(64, 64), "bias": randn(64)},
            "tensors": {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.int16)},
        },
        "list_of_tensors": [randn(3), torch.arange(4)],
        "int": 12,
        "float": 0.5,
        "str": "a string",
        "none": None,
        "bool_value": True,
        "list": [1, "two", 3.0, [4]],
        "tuple": (1, 2),
        "dict": {"lr": 0.1, "betas": (0.9, 0.999), "names": ["x", "y"]},
    }


def _expected(sd: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(sd)


def _save(api: str, sd: dict[str, Any], path: Path, **kw: Any) -> None:
    if api == "dcpx":
        transforms = kw.pop("transforms", None)
        dcpx.save(sd, path, transforms=transforms, **kw)
    else:
        dcp.save(sd, storage_writer=dcpx.FileSystemWriter(path, **kw))


def _load(api: str, dest: dict[str, Any], path: Path, **kw: Any) -> None:
    if api == "dcpx":
        dcpx.load(dest, path, **kw)
    else:
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(path, **kw))


@pytest.mark.parametrize("api", ["dcpx", "dcp"])
@pytest.mark.parametrize("thread_count", [1, 4])
@pytest.mark.parametrize("single_file_per_rank", [True, False])
@pytest.mark.parametrize("transforms", [None, ["zstd"]], ids=["raw", "zstd"])
def test_round_trip_matrix(tmp_path: Path, api: str, thread_count: int, single_file_per_rank: bool,
                           transforms: list[str] | None) -> None:
    sd = rich_state()
    expected = _expected(sd)
    _save(api, sd, tmp_path, transforms=transforms, thread_count=thread_count,
          single_file_per_rank=single_file_per_rank, chunk_size=CHUNK)
    dest = blank(sd)
    _load(api, dest, tmp_path)
    assert_same(dest, expected)
    files = data_files(tmp_path)
    if single_file_per_rank:
        assert 1 <= len(files) <= thread_count
    else:
        assert len(files) > thread_count
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    if transforms:
        assert items["f32"].transform_descriptors == ["frame@dcpx/1", "stream.zstd/1"]
        assert items["int"].transform_descriptors == ["frame@dcpx/1", "stream.zstd/1"]
    else:
        assert items["f32"].transform_descriptors == ["raw@dcpx/1"]
        assert items["f32"].length == 37 * 41 * 4


def test_zstd_compresses(tmp_path: Path) -> None:
    sd = {"zeros": torch.zeros(1 << 16)}
    dcpx.save(sd, tmp_path / "z", transforms=["zstd"], chunk_size=CHUNK)
    dcpx.save(sd, tmp_path / "r")
    size = lambda d: sum(os.path.getsize(d / f) for f in data_files(d))  # noqa: E731
    assert size(tmp_path / "z") < size(tmp_path / "r") // 10


def _conj_neg_case(tmp_path: Path, name: str, view: torch.Tensor) -> None:
    expected = {name: view.resolve_conj().resolve_neg().clone()}
    dcpx.save({name: view}, tmp_path)
    dest = blank(expected)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)


def test_conjugate_view(tmp_path: Path) -> None:
    """A conjugate *view* must be saved with its logical values (stock DCP does)."""
    c = torch.complex(torch.randn(50), torch.randn(50)).conj()
    assert c.is_conj()
    _conj_neg_case(tmp_path, "conj", c)


def test_negative_view(tmp_path: Path) -> None:
    n = torch.complex(torch.randn(50), torch.randn(50)).conj().imag
    assert n.is_neg()
    _conj_neg_case(tmp_path, "neg", n)


def test_load_into_non_contiguous_and_view_destinations(tmp_path: Path) -> None:
    sd = {"w": torch.randn(30, 50), "v": torch.arange(10.0)}
    for transforms in (None, ["zstd"]):
        d = tmp_path / str(transforms)
        dcpx.save(sd, d, transforms=transforms, chunk_size=512)
        backing = torch.zeros(50, 30)
        big = torch.full((30,), -1.0)
        dest = {"w": backing.t(), "v": big[10:20]}
        dcpx.load(dest, d)
        assert torch.equal(backing.t(), sd["w"])
        assert torch.equal(big[10:20], sd["v"])
        assert torch.all(big[:10] == -1) and torch.all(big[20:] == -1)


def test_load_converts_to_destination_dtype(tmp_path: Path) -> None:
    sd = {"w": torch.randn(100)}
    dcpx.save(sd, tmp_path, transforms=["zstd"])
    dest = {"w": torch.zeros(100, dtype=torch.float64)}
    dcpx.load(dest, tmp_path)
    assert torch.equal(dest["w"], sd["w"].double())


def test_async_save(tmp_path: Path) -> None:
    sd = rich_state()
    expected = _expected(sd)
    writer = dcpx.FileSystemWriter(tmp_path, transforms=["zstd"], chunk_size=CHUNK)
    future = dcp.async_save(sd, storage_writer=writer)
    sd["f32"].add_(1)  # staging copied the state dict before async_save returned
    future.result()
    dest = blank(expected)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)


def test_async_save_with_torch_default_stager(tmp_path: Path) -> None:
    """torch's own stager (a copy staged on a background thread) in place of the writer's."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    sd = rich_state()
    expected = _expected(sd)
    writer = dcpx.FileSystemWriter(tmp_path, transforms=["zstd"], chunk_size=CHUNK)
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=True, use_non_blocking_copy=False))
    try:
        response = dcp.async_save(sd, storage_writer=writer, async_stager=stager)
        response.staging_completion.result()
        sd["f32"].add_(1)  # staged: later changes are not saved
        response.upload_completion.result()
    finally:
        stager.close()
    dest = blank(expected)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)


def test_overwrite_false_refuses_existing_checkpoint(tmp_path: Path) -> None:
    first = {"w": torch.arange(10.0)}
    dcpx.save(first, tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(dcpx.CommitError, match="exists"):
        dcpx.save({"w": torch.zeros(10)}, tmp_path, overwrite=False)
    assert sorted(os.listdir(tmp_path)) == before
    dest = {"w": torch.zeros(10)}
    dcpx.load(dest, tmp_path)
    assert torch.equal(dest["w"], first["w"])
    dcpx.save({"w": torch.ones(3)}, tmp_path / "new", overwrite=False)  # a fresh path is fine


def _expected_listing(path: Path) -> set[str]:
    metadata = dcpx.reader.load_metadata(str(path))[0]
    files = {info.relative_path for info in metadata.storage_data.values()}
    return files | {".metadata", f".dcpx-manifest-{metadata.storage_meta.save_id}.json"}


@pytest.mark.parametrize("single_file_per_rank", [True, False])
def test_resave_same_dir_leaves_no_stale_files(tmp_path: Path, single_file_per_rank: bool) -> None:
    versions = [
        ({"a": torch.randn(100, 100), "b": torch.arange(50), "c": {"x": 1}, "d": torch.ones(3)}, ["zstd"]),
        ({"a": torch.randn(100, 100), "b": torch.arange(50) * 2, "c": {"x": 2}}, None),
        ({"a": torch.randn(10), "e": torch.zeros(7, dtype=torch.int8)}, ["zstd"]),
        ({"a": torch.randn(10), "e": torch.ones(7, dtype=torch.int8)}, None),
    ]
    for sd, transforms in versions:
        expected = _expected(sd)
        dcpx.save(sd, tmp_path, transforms=transforms, single_file_per_rank=single_file_per_rank,
                  thread_count=2, chunk_size=CHUNK)
        dest = blank(expected)
        dcpx.load(dest, tmp_path)
        assert_same(dest, expected)
        listing = set(os.listdir(tmp_path)) - {".dcpx.lock"}
        assert listing == _expected_listing(tmp_path)


def test_resave_with_dcp_api(tmp_path: Path) -> None:
    for step in range(3):
        sd = {"w": torch.full((64,), float(step)), "step": step}
        dcp.save(sd, storage_writer=dcpx.FileSystemWriter(tmp_path, transforms=["zstd"]))
        dest = {"w": torch.zeros(64), "step": None}
        dcp.load(dest, storage_reader=dcpx.FileSystemReader(tmp_path))
        assert torch.equal(dest["w"], sd["w"]) and dest["step"] == step
        assert set(os.listdir(tmp_path)) - {".dcpx.lock"} == _expected_listing(tmp_path)


def test_rules_per_item(tmp_path: Path) -> None:
    sd = {
        "layer.weight": torch.randn(100, 100),
        "layer.bias": torch.randn(100),
        "embed.weight_t": torch.randn(10, 10).half(),
        "ids": torch.arange(100),
        "opts": {"weight_decay": 0.1},
    }
    expected = _expected(sd)
    rules = [dcpx.Rule(["zstd"], match="*weight*", tensors_only=True), dcpx.Rule([])]
    dcpx.save(sd, tmp_path, transforms=rules)
    dest = blank(sd)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    zstd = ["frame@dcpx/1", "stream.zstd/1"]
    assert items["layer.weight"].transform_descriptors == zstd
    assert items["embed.weight_t"].transform_descriptors == zstd
    assert items["layer.bias"].transform_descriptors == ["raw@dcpx/1"]
    assert items["ids"].transform_descriptors == ["raw@dcpx/1"]
    assert not items["opts.weight_decay"].transform_descriptors


def test_rules_by_dtype_and_size(toys: Any, tmp_path: Path) -> None:
    sd = {"f": torch.randn(2000), "tiny": torch.randn(2), "i": torch.arange(2000, dtype=torch.int32), "s": "x"}
    expected = _expected(sd)
    rules = [
        dcpx.Rule(["xor", "zstd"], dtypes=[torch.float32], min_bytes=100),
        dcpx.Rule(["rev"], dtypes=[torch.int32]),
    ]
    dcpx.save(sd, tmp_path, transforms=rules, chunk_size=CHUNK)
    dest = blank(sd)
    dcpx.load(dest, tmp_path)
    assert_same(dest, expected)
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    assert items["f"].transform_descriptors == ["frame@dcpx/1", "stream.zstd/1", "stream.xor@test/1;seed=90"]
    assert items["tiny"].transform_descriptors == ["raw@dcpx/1"]
    assert items["i"].transform_descriptors == ["frame@dcpx/1", "stream.rev@test/1"]
    assert not items["s"].transform_descriptors


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(dcpx.ConfigError):
        dcpx.FileSystemWriter(tmp_path, transforms=["zstd"], _extensions=[])
    with pytest.raises(dcpx.ConfigError):
        dcpx.FileSystemWriter(tmp_path, transforms=["zstd", "zstd"])
    with pytest.raises(dcpx.ConfigError):
        dcpx.FileSystemWriter(tmp_path, transforms=["zstd", dcpx.Rule([])])
    with pytest.raises(dcpx.ConfigError):
        dcpx.FileSystemWriter(tmp_path, chunk_size=0)
    with pytest.raises(dcpx.UnknownTransformError):
        dcpx.FileSystemWriter(tmp_path, transforms=["no-such-transform"])


@pytest.mark.parametrize("transforms", [None, ["zstd"]])
def test_sparse_tensor_is_refused_by_name(tmp_path: Path, transforms: list[str] | None) -> None:
    """DCP stores dense elements; a sparse tensor used to fail deep in torch's .contiguous()."""
    with pytest.raises(dcpx.ConfigError, match=r"^adj: a torch.sparse_coo tensor .*to_dense"):
        dcpx.save({"adj": torch.eye(4).to_sparse(), "w": torch.ones(3)}, tmp_path / "ck", transforms=transforms)
    assert not (tmp_path / "ck" / ".metadata").exists()
    assert not list((tmp_path / "ck").glob("*.distcp"))


def test_empty_and_non_tensor_only_state_dicts(tmp_path: Path) -> None:
    dcpx.save({}, tmp_path / "empty")
    dcpx.load({}, tmp_path / "empty")
    dcpx.save({"a": 1, "b": "x", "c": [1, 2]}, tmp_path / "plain", transforms=["zstd"])
    dest: dict[str, Any] = {"a": None, "b": None, "c": None}
    dcpx.load(dest, tmp_path / "plain")
    assert dest == {"a": 1, "b": "x", "c": [1, 2]}


def test_tied_tensors_and_string_spec(tmp_path: Path) -> None:
    t = torch.randn(100)
    dcpx.save({"a": t, "b": t}, tmp_path, transforms="zstd", chunk_size=64)
    dest = {"a": torch.zeros(100), "b": torch.zeros(100)}
    dcpx.load(dest, tmp_path)
    assert torch.equal(dest["a"], t) and torch.equal(dest["b"], t)
    assert storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])["a"].transform_descriptors[1] == "stream.zstd/1"


def test_one_byte_chunks(tmp_path: Path) -> None:
    t = torch.randn(300)
    dcpx.save({"t": t, "s": "x" * 50}, tmp_path, transforms=["zstd"], chunk_size=1)
    dest: dict[str, Any] = {"t": torch.zeros(300), "s": None}
    dcpx.load(dest, tmp_path)
    assert torch.equal(dest["t"], t) and dest["s"] == "x" * 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("transforms", [None, ["zstd"]], ids=["raw", "zstd"])
def test_cuda_tensors_round_trip(tmp_path: Path, transforms: list[str] | None) -> None:
    sd = {"w": torch.randn(300, 70, device="cuda"), "b": torch.arange(1000, device="cuda").bfloat16(),
          "t": torch.randn(40, 30, device="cuda").t()}
    expected = {k: v.cpu() for k, v in sd.items()}
    dcpx.save(sd, tmp_path, transforms=transforms, chunk_size=CHUNK)
    dest = {k: torch.zeros(v.shape, dtype=v.dtype, device="cuda") for k, v in sd.items()}
    dcpx.load(dest, tmp_path)
    assert all(v.device.type == "cuda" for v in dest.values())
    assert_same({k: v.cpu() for k, v in dest.items()}, expected)


def test_state_dict_mismatch_is_a_dcpx_error(tmp_path: Path) -> None:
    """A key the checkpoint lacks, or an entry of another shape: ``dcpx.load`` says which,
    as a dcpx error; ``allow_partial_load`` leaves missing keys alone."""
    dcpx.save({"w": torch.ones(2, 3)}, tmp_path / "ck")
    with pytest.raises(dcpx.StateDictMismatchError, match="'w'|w") as info:
        dcpx.load({"w": torch.zeros(3, 2)}, tmp_path / "ck")
    assert "torch.Size([2, 3])" in str(info.value) and "another shape" in str(info.value)
    with pytest.raises(dcpx.StateDictMismatchError, match="Missing key .*extra"):
        dcpx.load({"w": torch.zeros(2, 3), "extra": torch.zeros(1)}, tmp_path / "ck")
    dest = {"w": torch.zeros(2, 3), "extra": torch.zeros(1)}
    dcpx.load(dest, tmp_path / "ck", planner=dcpx.SafeLoadPlanner(allow_partial_load=True))
    assert torch.equal(dest["w"], torch.ones(2, 3)) and torch.equal(dest["extra"], torch.zeros(1))

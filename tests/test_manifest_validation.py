"""The manifest is untrusted JSON that anyone can rebind to ``.metadata`` (its SHA-256 is no
secret), so ``manifest.loads`` checks its whole structure once and every consumer (reader,
``inspect``, ``verify``, ``convert``) may then index it without checking again."""

from __future__ import annotations

import glob
import io
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import dcpx
from dcpx import manifest
from dcpx.checkpoint_files import load_manifest, load_metadata
from dcpx.inspect import describe

Edit = Callable[[dict[str, Any]], Any]


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {"model.w": torch.randn(40, 100, generator=g), "model.b": torch.arange(16.0), "extra": {"note": "hi"}}


@pytest.fixture(params=["raw", "zstd"])
def ckpt(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    dcpx.save(_state(), path, transforms=None if request.param == "raw" else ["zstd"], chunk_size=4096)
    return path


def _manifest_file(path: Path) -> Path:
    (name,) = glob.glob(str(path / ".dcpx-manifest-*.json"))
    return Path(name)


def _edited(path: Path, edit: Edit) -> tuple[Path, bytes]:
    """The manifest with ``edit`` applied; its hash of ``.metadata`` still matches."""
    name = _manifest_file(path)
    body = json.loads(name.read_bytes())
    edit(body)
    data = json.dumps(body).encode()
    name.write_bytes(data)
    return name, data


def _item(key: str, value: Any) -> Edit:
    return lambda body: body["items"][0].__setitem__(key, value)


def _drop_item_key(key: str) -> Edit:
    return lambda body: body["items"][0].pop(key)


def _top(key: str, value: Any) -> Edit:
    return lambda body: body.__setitem__(key, value)


BAD: dict[str, tuple[Edit, str]] = {
    "item-not-an-object": (lambda body: body["items"].__setitem__(0, 1), "item 0 is 1, expected an object"),
    "item-lacks-shard-offsets": (_drop_item_key("shard_offsets"), "lacks 'shard_offsets'"),
    "item-lacks-raw-size": (_drop_item_key("raw_size"), "lacks 'raw_size'"),
    "fqn-list": (_item("fqn", ["w"]), "'fqn' is ['w']"),
    "file-int": (_item("file", 3), "'file' is 3"),
    "offset-negative": (_item("offset", -1), "'offset' is -1"),
    "offset-bool": (_item("offset", True), "'offset' is True"),
    "length-too-large": (_item("length", 1 << 63), f"'length' is {1 << 63}"),
    "raw-size-string": (_item("raw_size", "16384"), "'raw_size' is '16384'"),
    "raw-size-float": (_item("raw_size", 16384.0), "'raw_size' is 16384.0"),
    "descriptors-string": (_item("descriptors", "raw@dcpx/1"), "'descriptors' is 'raw@dcpx/1'"),
    "descriptors-int-entry": (_item("descriptors", [1]), "'descriptors' is [1]"),
    "records-list": (_item("records", ["crc32c"]), "'records' is ['crc32c']"),
    "records-int-value": (_item("records", {"crc32c": 5}), "'records' is {'crc32c': 5}"),
    "shard-offsets-int": (_item("shard_offsets", 5), "'shard_offsets' is 5"),
    "shard-offsets-negative": (_item("shard_offsets", [0, -2]), "'shard_offsets' is [0, -2]"),
    "shard-offsets-bool": (_item("shard_offsets", [False]), "'shard_offsets' is [False]"),
    "items-object": (_top("items", {}), "lacks items"),
    "version-bool": (_top("version", True), "version True is not supported"),
    "version-float": (_top("version", 1.0), "version 1.0 is not supported"),
    "checkpoint-id-int": (_top("checkpoint_id", 7), "'checkpoint_id' is 7"),
    "dcpx-version-object": (_top("dcpx_version", {"a": [1, 1, 1]}), "'dcpx_version' is {'a': [1, 1, 1]}"),
    "files-list": (_top("files", ["__0_0.distcp"]), "'files' is ['__0_0.distcp']"),
    "files-string-size": (_top("files", {"__0_0.distcp": "12"}), "'files' is {'__0_0.distcp': '12'}"),
    "hmac-key-list": (_top("hmac_key", ["encrypt"]), "'hmac_key' is ['encrypt']"),
    "hmac-key-int-value": (_top("hmac_key", {"transform": "x", "key_id": 1}), "'hmac_key' is"),
    "hmac-tag-int": (_top("hmac_sha256", 1), "'hmac_sha256' is 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_loads_refuses_malformed_structure(ckpt: Path, case: str) -> None:
    edit, needle = BAD[case]
    name, data = _edited(ckpt, edit)
    with pytest.raises(dcpx.CheckpointFormatError) as info:
        manifest.loads(data, str(name))
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    assert needle in message, message


def test_bad_item_is_named_by_index_and_fqn(ckpt: Path) -> None:
    def edit(body: dict[str, Any]) -> None:
        body["items"][1]["raw_size"] = "big"

    name, data = _edited(ckpt, edit)
    fqn = json.loads(data)["items"][1]["fqn"]
    with pytest.raises(dcpx.CheckpointFormatError, match=rf"item 1 \({fqn!r}\): 'raw_size' is 'big'"):
        manifest.loads(data, str(name))


def test_long_values_are_truncated_in_the_message(ckpt: Path) -> None:
    def edit(body: dict[str, Any]) -> None:
        body["items"][0]["fqn"] = "x" * 100_000
        body["items"][0]["descriptors"] = [[1] * 100_000]

    name, data = _edited(ckpt, edit)
    with pytest.raises(dcpx.CheckpointFormatError) as info:
        manifest.loads(data, str(name))
    assert "'descriptors'" in str(info.value) and "xxxxxxxx" in str(info.value)
    assert len(str(info.value)) < len(str(name)) + 400


@pytest.mark.parametrize("case", ["item-not-an-object", "fqn-list", "shard-offsets-int", "raw-size-string"])
def test_every_reader_refuses_a_malformed_manifest(ckpt: Path, case: str) -> None:
    """The hash still matches, so only the structure check stands between the manifest and
    the code that indexes it: the reader, ``describe`` (``dcpx inspect``) and ``verify``."""
    name, _ = _edited(ckpt, BAD[case][0])
    with pytest.raises(dcpx.CheckpointFormatError, match=str(name)):
        dcpx.FileSystemReader(ckpt).read_metadata()
    with pytest.raises(dcpx.CheckpointFormatError, match=str(name)):
        describe(str(ckpt))
    with pytest.raises(dcpx.CheckpointFormatError, match=str(name)):
        dcpx.verify.verify_checkpoint(str(ckpt))


def test_writer_manifests_pass_and_unknown_fields_are_tolerated(ckpt: Path) -> None:
    """Fields a later version adds, at the top or in an item, do not make a reader refuse it."""
    metadata, data = load_metadata(str(ckpt))
    assert load_manifest(str(ckpt), metadata, data) is not None

    def edit(body: dict[str, Any]) -> None:
        body["added_later"] = {"anything": [1, None]}
        for item in body["items"]:
            item["added_later"] = 3.5

    _edited(ckpt, edit)
    body = load_manifest(str(ckpt), metadata, data)
    assert body is not None and body["added_later"] == {"anything": [1, None]}
    dest = {"model.w": torch.zeros(40, 100), "model.b": torch.zeros(16), "extra": {"note": None}}
    dcpx.load(dest, ckpt)
    assert torch.equal(dest["model.b"], torch.arange(16.0)) and dest["extra"]["note"] == "hi"
    assert describe(str(ckpt))["manifest"] is True


def test_sharded_and_keyed_manifest_fields_pass(tmp_path: Path) -> None:
    """``shard_offsets`` lists, ``files`` and ``hmac_key`` as the writer produces them."""
    body = manifest.build("0" * 32, b"meta", [
        manifest.ItemRecord("w", [0, 64], "__0_0.distcp", 0, 128, 256, ["raw@dcpx/1"], {"crc32c": "0000abcd"}),
        manifest.ItemRecord("step", None, "__0_0.distcp", 128, 9, 9, [], {}),
    ], {"files": {"__0_0.distcp": 137}, "hmac_key": {"transform": "stream.encrypt@dcpx", "key_id": "default"}})
    loaded = manifest.loads(manifest.dumps(body, b"k" * 32), "m.json")
    assert loaded["items"][1]["fqn"] == "w" and loaded["hmac_key"]["key_id"] == "default"


@pytest.mark.parametrize("padding, needle", [
    (b" " * (2 << 20), "manifest of 3 stored items.*more than the limit"),  # larger than 3 items take
    (b"{}," * 20_000, "far more than 3 stored items need"),  # 60 KB: a dict apiece once parsed
], ids=["bytes", "objects"])
def test_manifest_out_of_proportion_to_the_metadata_is_refused(ckpt: Path, padding: bytes, needle: str) -> None:
    """json.loads builds every object before any check: a padded manifest must be refused
    before parsing (``{},`` is 3 bytes on disk, some 80 as a dict: a 1 GiB file, 27 GiB)."""
    name = _manifest_file(ckpt)
    body = name.read_bytes().rstrip()
    assert body.endswith(b"}")
    name.write_bytes(body[:-1] + b', "pad": [' + padding + b"0]}")
    json.loads(name.read_bytes())  # still valid JSON
    for read in (lambda: dcpx.FileSystemReader(ckpt).read_metadata(), lambda: describe(str(ckpt)),
                 lambda: dcpx.verify.verify_checkpoint(str(ckpt))):
        with pytest.raises(dcpx.CheckpointFormatError, match=needle):
            read()


def test_a_framed_entry_decodes_to_the_size_the_manifest_records(tmp_path: Path) -> None:
    """A non-tensor entry has no size in .metadata; the manifest's raw_size binds its frame,
    so an index rewritten to drop the last chunks (and the manifest edited to match the new
    length) cannot hand a planner a shorter entry."""
    path = tmp_path / "ckpt"
    dcpx.save({"blob": io.BytesIO(bytes(range(256)) * 64)}, path, transforms=["zstd"], chunk_size=4096)

    def shrink(body: dict[str, Any]) -> None:
        (entry,) = [e for e in body["items"] if e["fqn"] == "blob"]
        entry["raw_size"] -= 4096

    _edited(path, shrink)
    with pytest.raises(dcpx.CheckpointFormatError, match=r"^blob .*frame holds \d+ raw bytes, the checkpoint records") as info:
        dcpx.load({"blob": io.BytesIO()}, path)
    held, recorded = (int(n) for n in re.findall(r"(\d+) raw bytes, the checkpoint records (\d+)", str(info.value))[0])
    assert held - recorded == 4096


@pytest.mark.parametrize("edit", ["moved", "dropped"])
def test_every_stored_item_must_have_its_manifest_entry(ckpt: Path, edit: str) -> None:
    """An item the reader finds no entry for would be read without the CRC-32C (or item
    digest) its entry records: a changed byte in it loaded as it was."""
    def change(body: dict[str, Any]) -> None:
        (entry,) = [e for e in body["items"] if e["fqn"] == "model.w"]
        if edit == "moved":
            entry["offset"] += 1
        else:
            body["items"].remove(entry)

    name, _ = _edited(ckpt, change)
    needle = rf"{re.escape(str(name))}: records no item at file '[^']+', offset \d+, length \d+, where .metadata stores 'model.w'"
    with pytest.raises(dcpx.CheckpointFormatError, match=needle):
        dcpx.load({"model.w": torch.zeros(40, 100)}, ckpt)
    with pytest.raises(dcpx.CheckpointFormatError, match=needle):
        describe(str(ckpt))
    with pytest.raises(dcpx.CheckpointFormatError, match=needle):
        dcpx.verify.verify_checkpoint(str(ckpt))

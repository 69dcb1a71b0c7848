"""Reader policy: required transforms, expected checkpoint id, manifest binding."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import dcpx
from checkpoint_helpers import rewrite_metadata, storage_items


def _state() -> dict:
    return {"w": torch.randn(64, 32), "b": torch.arange(10), "meta": {"epoch": 3}}


def _blank() -> dict:
    return {"w": torch.zeros(64, 32), "b": torch.zeros(10, dtype=torch.long), "meta": {"epoch": 0}}


@pytest.fixture
def saved(tmp_path, toys):
    path = tmp_path / "ckpt"
    state = _state()
    dcpx.save(state, path, transforms=["xor", "trailer"])
    torch.save(state, path / "expected.pt")  # not a checkpoint file; the reader ignores it
    return path


def test_require_accepts_items_that_carry_the_transform(saved):
    out, expected = _blank(), torch.load(saved / "expected.pt")
    dcpx.load(out, saved, require=["xor", "stream.trailer@test"])
    assert torch.equal(out["w"], expected["w"]) and out["meta"] == {"epoch": 3}


def test_require_refuses_an_item_whose_descriptor_was_removed(saved):
    def drop_xor(md):
        info = storage_items(md)["w"]
        info.transform_descriptors = [d for d in info.transform_descriptors if not d.startswith("stream.xor@test")]

    rewrite_metadata(saved, drop_xor)
    with pytest.raises(dcpx.PolicyError, match=r"w .*stream\.xor@test"):
        dcpx.load(_blank(), saved, require=["xor"])


def test_require_refuses_an_unframed_item(tmp_path, toys):
    dcpx.save(_state(), tmp_path, transforms=[dcpx.Rule(["xor"], match="b"), dcpx.Rule([])])
    with pytest.raises(dcpx.PolicyError, match="lacks required transform"):
        dcpx.load(_blank(), tmp_path, require=["xor"])


def test_editing_metadata_is_detected_through_the_manifest(saved):
    def swap(md):
        items = storage_items(md)
        items["w"].offset, items["b"].offset = items["b"].offset, items["w"].offset

    rewrite_metadata(saved, swap, drop_manifest=False)
    with pytest.raises(dcpx.IntegrityError, match="SHA-256"):
        dcpx.load(_blank(), saved)


def test_expected_checkpoint_id(saved):
    (manifest,) = glob.glob(os.path.join(saved, ".dcpx-manifest-*.json"))
    checkpoint_id = json.load(open(manifest))["checkpoint_id"]
    out = _blank()
    dcpx.load(out, saved, checkpoint_id=checkpoint_id)
    with pytest.raises(dcpx.PolicyError, match="expected"):
        dcpx.load(_blank(), saved, checkpoint_id="0" * 32)


def test_replayed_older_checkpoint_is_refused(tmp_path, toys):
    """Copying an older valid checkpoint over a newer one is caught by checkpoint_id."""
    import shutil

    old, new = tmp_path / "old", tmp_path / "new"
    dcpx.save(_state(), old, transforms=["xor"])
    dcpx.save(_state(), new, transforms=["xor"])
    (manifest,) = glob.glob(os.path.join(new, ".dcpx-manifest-*.json"))
    expected = json.load(open(manifest))["checkpoint_id"]
    shutil.rmtree(new)
    shutil.copytree(old, new)
    with pytest.raises(dcpx.PolicyError):
        dcpx.load(_blank(), new, checkpoint_id=expected)

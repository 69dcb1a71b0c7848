"""The manifest of an encrypted checkpoint is authenticated with a key derived from the
master key, so editing .metadata and the manifest together is caught by a key holder."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import dcpx

KEY = bytes(range(32))


def _enc() -> dcpx.Transform:
    return dcpx.transform("encrypt", keys={"k1": KEY}, primary="k1")


@pytest.fixture
def saved(tmp_path):
    state = {"w": torch.randn(64, 16), "step": 3}
    dcpx.save(state, tmp_path, transforms=[_enc()])
    return tmp_path, state


def _manifest(path) -> str:
    (name,) = glob.glob(os.path.join(path, ".dcpx-manifest-*.json"))
    return name


def test_manifest_is_keyed_and_loads(saved):
    path, state = saved
    body = json.load(open(_manifest(path)))
    assert body["hmac_key"] == {"transform": "stream.encrypt@dcpx", "key_id": "k1"}
    assert len(body["hmac_sha256"]) == 64 and KEY.hex() not in json.dumps(body)
    out = {"w": torch.zeros(64, 16), "step": 0}
    dcpx.load(out, path, transforms=[_enc()])
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3


def test_edited_manifest_fails_the_hmac(saved):
    path, _ = saved
    name = _manifest(path)
    body = json.load(open(name))
    body["items"][0]["length"] += 1
    open(name, "w").write(json.dumps(body))
    with pytest.raises(dcpx.IntegrityError, match="(HMAC|SHA-256)"):
        dcpx.load({"w": torch.zeros(64, 16), "step": 0}, path, transforms=[_enc()])


def test_removed_manifest_is_detected_by_a_key_holder(saved):
    path, _ = saved
    os.remove(_manifest(path))
    with pytest.raises(dcpx.IntegrityError, match="no keyed manifest"):
        dcpx.load({"w": torch.zeros(64, 16), "step": 0}, path, transforms=[_enc()])


def test_wrong_key_fails_the_manifest_before_any_item(saved):
    path, _ = saved
    wrong = dcpx.transform("encrypt", keys={"k1": bytes(32)}, primary="k1")
    with pytest.raises(dcpx.IntegrityError, match="HMAC"):
        dcpx.load({"w": torch.zeros(64, 16), "step": 0}, path, transforms=[wrong])

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


# -- the keyed manifest of an encrypted checkpoint ----------------------------------------
# A keyless forger points item 'w' at plaintext of their choosing, recomputes the manifest's
# SHA-256 of .metadata and edits its key claim; a reader holding a key must not skip the HMAC.

KEY = bytes(range(32))
FORGED = torch.full((64, 32), 1337.0)


@pytest.fixture
def encrypt(fresh_host, monkeypatch):
    dcpx_encrypt = pytest.importorskip("dcpx_encrypt")
    from dcpx_encrypt import plugin

    for name in ("DCPX_ENCRYPT_KEY", "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    dcpx.register_plugin(plugin, name="dcpx-encrypt")
    return dcpx_encrypt


def _keyed() -> dcpx.Transform:
    return dcpx.transform("encrypt", keys={"k1": KEY}, primary="k1")


def _forge(path, claim=None) -> None:
    """Replace item 'w' by plaintext and rebind the manifest; ``claim`` edits its key claim."""
    import hashlib
    import pickle

    with open(path / ".metadata", "rb") as f:
        md = pickle.load(f)
    info = storage_items(md)["w"]
    data_file = path / info.relative_path
    was = (info.relative_path, info.offset, info.length)
    info.offset, info.length = data_file.stat().st_size, FORGED.numel() * 4
    info.transform_descriptors = ["raw@dcpx/1"]
    with open(data_file, "ab") as f:
        f.write(FORGED.numpy().tobytes())
    md_bytes = pickle.dumps(md)
    (path / ".metadata").write_bytes(md_bytes)
    (manifest,) = glob.glob(os.path.join(path, ".dcpx-manifest-*.json"))
    body = json.load(open(manifest))
    body["metadata_sha256"] = hashlib.sha256(md_bytes).hexdigest()
    body.get("files", {})[info.relative_path] = data_file.stat().st_size
    for entry in body["items"]:
        if (entry["file"], entry["offset"], entry["length"]) == was:
            entry.update(offset=info.offset, length=info.length, raw_size=info.length, descriptors=[], records={})
    if claim is None:
        body.pop("hmac_key", None), body.pop("hmac_sha256", None)
    else:
        body["hmac_key"] = claim
    open(manifest, "w").write(json.dumps(body))


def _load_w(path, **kw) -> torch.Tensor:
    out = {"w": torch.zeros(64, 32)}
    dcpx.load(out, path, **kw)
    return out["w"]


def _env_key(monkeypatch) -> None:
    import base64

    monkeypatch.setenv("DCPX_ENCRYPT_KEY", base64.b64encode(KEY).decode())


@pytest.mark.parametrize("claimed", ["bogus", "stream.zstd", "encrypt", "dcpx-encrypt"])
def test_key_claim_naming_another_transform_is_refused_by_a_key_holder(tmp_path, encrypt, claimed):
    """Also the shorthand of the very transform that keyed it: the writer records full names,
    and a shorthand once made the reader look for a default-configured (keyless) transform."""
    dcpx.save(_state(), tmp_path, transforms=[_keyed()])
    _forge(tmp_path, {"transform": claimed, "key_id": "k1"})
    with pytest.raises(dcpx.IntegrityError, match=rf"dcpx-manifest-.*{claimed}.*holds keys"):
        _load_w(tmp_path, transforms=[_keyed()])


def test_key_claim_naming_another_transform_is_refused_with_a_key_from_the_environment(tmp_path, encrypt, monkeypatch):
    _env_key(monkeypatch)
    dcpx.save(_state(), tmp_path, transforms=["encrypt"])
    _forge(tmp_path, {"transform": "bogus", "key_id": "default"})
    with pytest.raises(dcpx.IntegrityError, match="bogus.*holds keys"):
        _load_w(tmp_path)


def test_key_claim_naming_an_unknown_key_id_is_refused(tmp_path, encrypt, monkeypatch):
    _env_key(monkeypatch)
    dcpx.save(_state(), tmp_path, transforms=["encrypt"])
    _forge(tmp_path, {"transform": "stream.encrypt@dcpx", "key_id": "nope"})
    with pytest.raises(encrypt.MissingKeyError, match=r"dcpx-manifest-.*key id 'nope'.*cannot be authenticated"):
        _load_w(tmp_path)


def test_removed_key_claim_is_refused_while_items_are_encrypted(tmp_path, encrypt, monkeypatch):
    _env_key(monkeypatch)
    dcpx.save(_state(), tmp_path, transforms=["encrypt"])
    _forge(tmp_path, None)  # 'b' and 'meta' are still encrypted
    with pytest.raises(dcpx.IntegrityError, match="no keyed manifest"):
        _load_w(tmp_path)


def test_removed_key_claim_of_all_plaintext_items_is_stopped_by_require(tmp_path, encrypt, monkeypatch):
    """Every item replaced and the claim gone: nothing says the checkpoint was keyed, so
    only require= refuses it."""
    _env_key(monkeypatch)
    dcpx.save({"w": torch.randn(64, 32)}, tmp_path, transforms=["encrypt"])
    _forge(tmp_path, None)
    with pytest.raises(dcpx.PolicyError, match="w .*lacks required transform"):
        _load_w(tmp_path, require=["encrypt"])


def test_keyed_manifest_loads_with_explicit_and_environment_keys(tmp_path, encrypt, monkeypatch):
    state = _state()
    dcpx.save(state, tmp_path / "explicit", transforms=[_keyed()])
    assert torch.equal(_load_w(tmp_path / "explicit", transforms=[_keyed()]), state["w"])
    _env_key(monkeypatch)
    dcpx.save(state, tmp_path / "env", transforms=["encrypt"])
    assert torch.equal(_load_w(tmp_path / "env", require=["encrypt"]), state["w"])


def test_keyless_reader_reads_plaintext_items(tmp_path, encrypt):
    """No key anywhere: a plaintext checkpoint loads, and so do the plaintext items of a
    checkpoint whose manifest is keyed (the reader cannot check it, nor decrypt the rest)."""
    state = _state()
    dcpx.save(state, tmp_path / "plain")
    out = _blank()
    dcpx.load(out, tmp_path / "plain")
    assert torch.equal(out["w"], state["w"]) and out["meta"] == {"epoch": 3}
    dcpx.save(state, tmp_path / "mixed", transforms=[dcpx.Rule([_keyed()], match="w"), dcpx.Rule([])])
    out = {"b": torch.zeros(10, dtype=torch.long)}
    dcpx.load(out, tmp_path / "mixed")
    assert torch.equal(out["b"], state["b"])

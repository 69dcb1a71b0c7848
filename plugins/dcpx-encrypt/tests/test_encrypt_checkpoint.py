"""End to end through dcpx.save / dcpx.load: keys reach the reader, and attacks on whole
checkpoints fail with the encrypt plugin's errors."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import dcpx
from dcpx_encrypt import (
    CheckpointMismatchError,
    NoKeyConfiguredError,
    UnknownKeyIdError,
    format_env,
)

K1 = hashlib.sha256(b"checkpoint test key 1").digest()
K2 = hashlib.sha256(b"checkpoint test key 2").digest()
GOLDEN_KEY = hashlib.sha256(b"dcpx-encrypt v1 golden test key; public, protects nothing").digest()
GOLDEN_DIR = Path(__file__).with_name("golden") / "checkpoint-v1"
HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DCPX_ENCRYPT_KEY", "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def state_dict() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(96, 160, generator=g),
        "layer.bias": torch.randn(160, generator=g).to(torch.bfloat16),
        "steps": torch.arange(1000, dtype=torch.int64),
        "scale": torch.tensor(0.5),
        "epoch": 3,
    }


def empty_like(sd: dict[str, object]) -> dict[str, object]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in sd.items()}


def assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k  # type: ignore[arg-type]
        else:
            assert a[k] == b[k], k


def encrypt(**kw: object) -> dcpx.Transform:
    return dcpx.transform("encrypt", segment_size=4096, **kw)


def save(path: Path, sd: dict[str, object], **kw: object) -> None:
    chain = (["zstd"] if HAVE_ZSTD else []) + [encrypt(**kw)]
    dcpx.save(sd, path, transforms=chain, chunk_size=16 << 10)


def test_round_trip_with_reader_keys_and_with_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = state_dict()
    save(tmp_path / "ck", sd, keys={"k1": K1})
    out = empty_like(sd)
    dcpx.load(out, tmp_path / "ck", transforms=[dcpx.transform("encrypt", keys={"k1": K1})])
    assert_same(out, sd)

    name, _, value = format_env("k1", K1).partition("=")
    monkeypatch.setenv(name, value)
    out = empty_like(sd)
    dcpx.load(out, tmp_path / "ck")  # no transforms: rebuilt from descriptors, key from the environment
    assert_same(out, sd)


def test_load_without_key_or_with_the_wrong_one_fails_clearly(tmp_path: Path) -> None:
    sd = state_dict()
    save(tmp_path / "ck", sd, keys={"k1": K1})
    with pytest.raises(NoKeyConfiguredError, match="key id 'k1'.*DCPX_ENCRYPT_KEYS"):
        dcpx.load(empty_like(sd), tmp_path / "ck")
    # the keyed manifest is checked first, so a wrong key fails before any item is read
    with pytest.raises(dcpx.IntegrityError, match="'k1'"):
        dcpx.load(empty_like(sd), tmp_path / "ck", transforms=[dcpx.transform("encrypt", keys={"k1": K2})])
    with pytest.raises(UnknownKeyIdError, match="'k1'"):
        dcpx.load(empty_like(sd), tmp_path / "ck", transforms=[dcpx.transform("encrypt", keys={"k2": K2})])


def test_rotation_across_checkpoints(tmp_path: Path) -> None:
    sd = state_dict()
    save(tmp_path / "old", sd, keys={"k1": K1})
    save(tmp_path / "new", sd, keys={"k1": K1, "k2": K2}, primary="k2")
    ring = {"k1": K1, "k2": K2}
    for name in ("old", "new"):
        out = empty_like(sd)
        dcpx.load(out, tmp_path / name, transforms=[dcpx.transform("encrypt", keys=ring, primary="k2")])
        assert_same(out, sd)
    with pytest.raises(UnknownKeyIdError, match="'k2'"):
        dcpx.load(empty_like(sd), tmp_path / "new", transforms=[dcpx.transform("encrypt", keys={"k1": K1})])


def test_data_file_swapped_between_checkpoints(tmp_path: Path) -> None:
    sd = state_dict()
    save(tmp_path / "a", sd, keys={"k1": K1})
    save(tmp_path / "b", sd, keys={"k1": K1})
    files = sorted(p.name for p in (tmp_path / "a").glob("*.distcp"))
    assert files == sorted(p.name for p in (tmp_path / "b").glob("*.distcp"))
    for name in files:
        assert (tmp_path / "a" / name).stat().st_size == (tmp_path / "b" / name).stat().st_size
        shutil.copyfile(tmp_path / "b" / name, tmp_path / "a" / name)
    with pytest.raises(CheckpointMismatchError):
        dcpx.load(empty_like(sd), tmp_path / "a", transforms=[dcpx.transform("encrypt", keys={"k1": K1})])


def test_verify_authenticates_items_with_the_readers_keys(tmp_path: Path) -> None:
    """Without a checksum the GCM tags are the items' integrity check: ``dcpx verify``
    decrypts with the reader's keys, and without a key reports the items as unchecked."""
    from dcpx.checkpoint_files import load_manifest, load_metadata
    from dcpx.verify import verify_checkpoint

    sd = state_dict()
    path = tmp_path / "ck"
    save(path, sd, keys={"k1": K1})
    keys = [encrypt(keys={"k1": K1})]
    assert {c.status for c in verify_checkpoint(str(path), transforms=keys)} == {"ok"}
    unchecked = verify_checkpoint(str(path))
    assert {c.status for c in unchecked} == {"missing"} and all("no key" in c.detail for c in unchecked)

    metadata, data = load_metadata(str(path))
    (item,) = [i for i in load_manifest(str(path), metadata, data)["items"] if i["fqn"] == "layer.weight"]
    with open(path / item["file"], "r+b") as f:  # one bit of ciphertext in the middle of the item
        f.seek(item["offset"] + item["length"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    checks = verify_checkpoint(str(path), transforms=keys)
    assert [c.fqn for c in checks if c.status == "failed"] == ["layer.weight"]
    assert {c.status for c in checks if c.fqn != "layer.weight"} == {"ok"}


def test_verify_checks_the_keyed_manifest_as_a_load_does(tmp_path: Path) -> None:
    """``dcpx verify`` with a key used to skip the manifest's HMAC: wrong key bytes were only
    seen item by item, and a removed manifest went unnoticed."""
    from dcpx.verify import verify_checkpoint

    path = tmp_path / "ck"
    save(path, state_dict(), keys={"k1": K1})
    with pytest.raises(dcpx.IntegrityError, match="HMAC"):
        verify_checkpoint(str(path), transforms=[encrypt(keys={"k1": K2})])
    for manifest in path.glob(".dcpx-manifest-*.json"):
        manifest.unlink()
    with pytest.raises(dcpx.IntegrityError, match="keyed manifest"):
        verify_checkpoint(str(path), transforms=[encrypt(keys={"k1": K1})])


# -- a committed checkpoint (encrypt only, 4 KiB segments, the published golden test key) ----
def golden_state_dict() -> dict[str, object]:
    return {
        "w": torch.arange(6000, dtype=torch.float32).reshape(60, 100) / 7,
        "ids": torch.arange(3000, dtype=torch.int32),
        "meta": "dcpx-encrypt golden checkpoint v1",
    }


def test_committed_checkpoint_still_loads() -> None:
    if not GOLDEN_DIR.is_dir():
        pytest.skip("golden checkpoint not generated")
    expected = golden_state_dict()
    out = {"w": torch.zeros(60, 100), "ids": torch.zeros(3000, dtype=torch.int32), "meta": ""}
    reader = dcpx.transform("encrypt", keys={"golden-test": GOLDEN_KEY})
    dcpx.load(out, GOLDEN_DIR, transforms=[reader])
    assert_same(out, expected)
    with pytest.raises(dcpx.IntegrityError, match="golden-test"):
        dcpx.load(dict(out), GOLDEN_DIR, transforms=[dcpx.transform("encrypt", keys={"golden-test": K1})])


def write_golden_checkpoint() -> None:
    if GOLDEN_DIR.exists() and "--force" not in sys.argv:
        raise SystemExit(f"{GOLDEN_DIR} exists (use --force to overwrite)")
    shutil.rmtree(GOLDEN_DIR, ignore_errors=True)
    t = dcpx.transform("encrypt", keys={"golden-test": GOLDEN_KEY}, segment_size=4096)
    os.chdir(GOLDEN_DIR.parent)  # a relative path: .metadata records the path it was saved to
    dcpx.save(golden_state_dict(), GOLDEN_DIR.name, transforms=[t], chunk_size=16 << 10)
    for leftover in GOLDEN_DIR.glob(".dcpx.lock*"):
        leftover.unlink()
    print("wrote", sorted(p.name for p in GOLDEN_DIR.iterdir()), base64.b64encode(GOLDEN_KEY).decode())


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_golden_checkpoint()

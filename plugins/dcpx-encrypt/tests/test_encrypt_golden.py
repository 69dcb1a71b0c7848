"""Known-answer files: committed v1 envelopes must keep opening, byte for byte.

``tests/golden/*.bin`` were written once by ``python test_encrypt_golden.py --write``.  If a
test here fails, the envelope format changed: that needs a new format version (and a new
transform version), never regenerated files.  The key in ``expected.json`` is a published
test key; it protects nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from dcpx.transform import ChunkInfo, ItemInfo

import dcpx_encrypt
from dcpx_encrypt import EncryptTransform, parse_header
from dcpx_encrypt import envelope

GOLDEN = Path(__file__).with_name("golden")
SEGMENT = 4096
KEY_ID = "golden-test"
KEY = hashlib.sha256(b"dcpx-encrypt v1 golden test key; public, protects nothing").digest()

CASES: list[dict[str, Any]] = [
    {"name": "empty", "fqn": "golden.empty", "checkpoint_id": "golden-ckpt-1", "offsets": [],
     "index": 0, "offset": 0, "size": 0, "inner": []},
    {"name": "one-segment", "fqn": "model.layer.weight", "checkpoint_id": "golden-ckpt-1", "offsets": [0, 0],
     "index": 0, "offset": 0, "size": 1000, "inner": ["stream.zstd/1"]},
    {"name": "exact-boundary", "fqn": "model.layer.weight", "checkpoint_id": "golden-ckpt-1", "offsets": [128, 0],
     "index": 1, "offset": 8192, "size": 2 * SEGMENT, "inner": []},
    {"name": "boundary-plus-one", "fqn": "optim.state.0.exp_avg", "checkpoint_id": "golden-ckpt-2", "offsets": [0],
     "index": 0, "offset": 0, "size": 2 * SEGMENT + 1, "inner": ["stream.zstd/1"]},
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DCPX_ENCRYPT_KEY", "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def plaintext(case: dict[str, Any]) -> bytes:
    return hashlib.shake_256(f"dcpx-encrypt golden {case['name']}".encode()).digest(case["size"])


def chunk_of(case: dict[str, Any], **override: Any) -> ChunkInfo:
    c = {**case, **override}
    item = ItemInfo(c["fqn"], c["offset"] + c["size"], offsets=tuple(c["offsets"]), checkpoint_id=c["checkpoint_id"])
    return ChunkInfo(item, c["index"], c["index"] + 1, c["offset"], c["size"], tuple(c["inner"]))


def expected() -> dict[str, Any]:
    return json.loads((GOLDEN / "expected.json").read_text())


def reader(key: bytes = KEY, key_id: str = KEY_ID) -> EncryptTransform:
    return EncryptTransform(keys={key_id: key}, segment_size=SEGMENT)


def apply_edit(blob: bytes, edit: dict[str, Any]) -> bytes:
    data = bytearray(blob)
    if "flip" in edit:
        data[edit["flip"]] ^= 0x01
    if "truncate" in edit:
        del data[len(data) - edit["truncate"]:]
    if "append_hex" in edit:
        data += bytes.fromhex(edit["append_hex"])
    if "swap" in edit:  # two equal-length byte ranges [a, a+n) and [b, b+n)
        a, b, n = edit["swap"]
        data[a:a + n], data[b:b + n] = data[b:b + n], data[a:a + n]
    return bytes(data)


def test_golden_files_decrypt() -> None:
    doc = expected()
    assert base64.b64decode(doc["key_base64"]) == KEY and doc["key_id"] == KEY_ID
    for case in doc["cases"]:
        blob = (GOLDEN / case["file"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == case["envelope_sha256"], case["name"]
        h = parse_header(memoryview(blob))
        assert (h.version, h.suite, h.segment_size, h.key_id, h.plaintext_size) == (1, 1, SEGMENT, KEY_ID, case["size"])
        out = bytes(reader().decode(memoryview(blob), chunk_of(case), case["size"]))
        assert hashlib.sha256(out).hexdigest() == case["plaintext_sha256"]
        assert out == plaintext(case)


def test_encoder_reproduces_golden_bytes_from_their_salt() -> None:
    """Same key, salt, context and plaintext must give the committed bytes exactly."""
    for case in expected()["cases"]:
        blob = (GOLDEN / case["file"]).read_bytes()
        salt = parse_header(memoryview(blob)).salt
        again = envelope.seal(KEY, KEY_ID, SEGMENT, memoryview(plaintext(case)),
                              envelope.Context.from_chunk(chunk_of(case)), salt=salt)
        assert bytes(again) == blob, case["name"]


def test_modified_golden_copies_fail_with_the_recorded_error() -> None:
    doc = expected()
    cases = {c["name"]: c for c in doc["cases"]}
    assert len(doc["tampered"]) >= 12
    for t in doc["tampered"]:
        case = cases[t["case"]]
        blob = apply_edit((GOLDEN / case["file"]).read_bytes(), t.get("edit", {}))
        r = reader(base64.b64decode(t["key_base64"]), t.get("key_id", KEY_ID)) if "key_base64" in t else reader()
        error = getattr(dcpx_encrypt, t["error"])
        with pytest.raises(error) as err:
            r.decode(memoryview(blob), chunk_of(case, **t.get("context", {})), case["size"])
        assert type(err.value) is error, (t, type(err.value).__name__, str(err.value))
        assert (t.get("context", {}).get("fqn") or case["fqn"]) in str(err.value)


# -- writing the files (once; see the module docstring) -----------------------------------
def _tampered(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    h = 20 + len(KEY_ID)  # start of the salt
    kc, cc, cm, body = h + 32, h + 48, h + 64, h + 96
    out = [
        {"case": "one-segment", "edit": {"flip": 0}, "error": "EnvelopeHeaderError"},
        {"case": "one-segment", "edit": {"flip": 4}, "error": "EnvelopeHeaderError"},
        {"case": "one-segment", "edit": {"flip": 5}, "error": "EnvelopeHeaderError"},
        {"case": "one-segment", "edit": {"flip": 9}, "error": "EnvelopeHeaderError"},
        {"case": "one-segment", "edit": {"flip": 12}, "error": "SizeMismatchError"},
        {"case": "one-segment", "edit": {"flip": h}, "error": "WrongKeyError"},
        {"case": "one-segment", "edit": {"flip": kc}, "error": "WrongKeyError"},
        {"case": "one-segment", "edit": {"flip": cc}, "error": "CheckpointMismatchError"},
        {"case": "one-segment", "edit": {"flip": cm}, "error": "ContextMismatchError"},
        {"case": "one-segment", "edit": {"flip": body}, "error": "SegmentAuthenticationError"},
        {"case": "empty", "edit": {"flip": body}, "error": "SegmentAuthenticationError"},
        {"case": "boundary-plus-one", "edit": {"truncate": 1}, "error": "TruncatedEnvelopeError"},
        {"case": "boundary-plus-one", "edit": {"truncate": 17}, "error": "TruncatedEnvelopeError"},
        {"case": "exact-boundary", "edit": {"append_hex": "00"}, "error": "TrailingDataError"},
        {"case": "exact-boundary", "edit": {"swap": [body, body + SEGMENT + 16, SEGMENT + 16]},
         "error": "SegmentOrderError"},
        {"case": "exact-boundary", "context": {"fqn": "model.other.weight"}, "error": "ContextMismatchError"},
        {"case": "exact-boundary", "context": {"index": 0, "offset": 0}, "error": "ContextMismatchError"},
        {"case": "exact-boundary", "context": {"offsets": [0, 0]}, "error": "ContextMismatchError"},
        {"case": "one-segment", "context": {"inner": []}, "error": "ContextMismatchError"},
        {"case": "boundary-plus-one", "context": {"checkpoint_id": "golden-ckpt-1"}, "error": "CheckpointMismatchError"},
        {"case": "boundary-plus-one", "key_base64": base64.b64encode(bytes(32)).decode(), "error": "WrongKeyError"},
        {"case": "boundary-plus-one", "key_base64": base64.b64encode(KEY).decode(), "key_id": "other",
         "error": "UnknownKeyIdError"},
    ]
    return out


def write_golden() -> None:
    GOLDEN.mkdir(exist_ok=True)
    if (GOLDEN / "expected.json").exists() and "--force" not in sys.argv:
        raise SystemExit("golden files exist; changing them means a new format version (use --force to overwrite)")
    t = EncryptTransform(keys={KEY_ID: KEY}, segment_size=SEGMENT)
    entries = []
    for case in CASES:
        blob = bytes(t.encode(memoryview(plaintext(case)), chunk_of(case)))
        name = f"{case['name']}.bin"
        (GOLDEN / name).write_bytes(blob)
        entries.append({**case, "file": name, "plaintext": f"shake_256('dcpx-encrypt golden {case['name']}')",
                        "plaintext_sha256": hashlib.sha256(plaintext(case)).hexdigest(),
                        "envelope_sha256": hashlib.sha256(blob).hexdigest()})
    doc = {
        "format": "dcpx-encrypt envelope v1 (stream.encrypt@dcpx/1)",
        "note": "published test key; protects nothing",
        "key_id": KEY_ID,
        "key_base64": base64.b64encode(KEY).decode(),
        "segment_size": SEGMENT,
        "cases": entries,
        "tampered": _tampered(entries),
    }
    (GOLDEN / "expected.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_golden()

"""Key sources (explicit, environment, key file, hook), their order, rotation and helpers."""

from __future__ import annotations

import base64
import json
import os
import threading
import warnings
from pathlib import Path

import pytest
from dcpx.transform import ChunkInfo, ItemInfo

import dcpx
from dcpx_encrypt import (
    EncryptTransform,
    KeyConfigError,
    Keyring,
    NoKeyConfiguredError,
    UnknownKeyIdError,
    WrongKeyError,
    format_env,
    format_keyfile,
    generate_key,
    parse_header,
)
from dcpx_encrypt.keys import load_keyfile, read_env

K1, K2, K3, K4 = (bytes([n]) * 32 for n in (1, 2, 3, 4))
ENV_NAMES = ("DCPX_ENCRYPT_KEY", "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def info(fqn: str = "w") -> ChunkInfo:
    return ChunkInfo(ItemInfo(fqn, 5000, checkpoint_id="c"), 0, 1, 0, 5000)


DATA = os.urandom(5000)


def seal(t: EncryptTransform) -> bytes:
    return bytes(t.encode(memoryview(DATA), info()))


def opens(t: EncryptTransform, blob: bytes) -> bool:
    return bytes(t.decode(memoryview(blob), info(), len(DATA))) == DATA


def write_keyfile(path: Path, keys: dict[str, bytes], primary: str | None = None) -> Path:
    path.write_text(format_keyfile(keys, primary))
    path.chmod(0o600)
    return path


class KeyProvider:
    """An in-process key-provider plugin, shaped like a KMS plugin would be."""

    def __init__(self, keys: dict[str, bytes], primary: str | None = None) -> None:
        self.keys, self.primary, self.calls = keys, primary, []

    @dcpx.hookimpl
    def dcpx_encrypt_get_key(self, key_id: str) -> bytes | None:
        self.calls.append(key_id)
        return self.keys.get(key_id)

    @dcpx.hookimpl
    def dcpx_encrypt_primary_key_id(self) -> str | None:
        return self.primary


@pytest.fixture
def provider():
    registered: list[str] = []

    def add(keys: dict[str, bytes], primary: str | None = None) -> KeyProvider:
        p = KeyProvider(keys, primary)
        name = f"test-key-provider-{len(registered)}"
        dcpx.register_plugin(p, name=name)
        registered.append(name)
        return p

    yield add
    for name in registered:
        dcpx.plugin_host().unregister(name)


# -- sources ------------------------------------------------------------------------------
def test_single_env_key_is_id_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPX_ENCRYPT_KEY", b64(K1))
    t = EncryptTransform()
    assert t.params()["key_id"] == "default"
    blob = seal(t)
    assert parse_header(memoryview(blob)).key_id == "default"
    assert opens(EncryptTransform(), blob)
    assert opens(EncryptTransform(keys={"default": K1}), blob)


def test_several_env_keys_and_primary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPX_ENCRYPT_KEYS", f"a:{b64(K1)}, b:{b64(K2)}")
    assert EncryptTransform().params()["key_id"] == "a"  # first listed
    monkeypatch.setenv("DCPX_ENCRYPT_PRIMARY", "b")
    t = EncryptTransform()
    assert t.params()["key_id"] == "b"
    blob = seal(t)
    assert opens(EncryptTransform(keys={"b": K2}), blob)
    keys, primary = read_env({"DCPX_ENCRYPT_KEYS": f"a:{b64(K1)}", "DCPX_ENCRYPT_KEY": b64(K3)})
    assert keys == {"a": K1, "default": K3} and primary == "a"


@pytest.mark.parametrize(
    "env, match",
    [
        ({"DCPX_ENCRYPT_KEY": "not base64!"}, "not valid base64"),
        ({"DCPX_ENCRYPT_KEY": b64(b"short")}, "is 5 bytes"),
        ({"DCPX_ENCRYPT_KEYS": b64(K1)}, "not '<key id>:<base64 key>'"),
        ({"DCPX_ENCRYPT_KEYS": f"a:{b64(K1)},a:{b64(K2)}"}, "listed twice"),
        ({"DCPX_ENCRYPT_KEYS": f"a,b:{b64(K1)}"}, "entry 1"),
        ({"DCPX_ENCRYPT_KEYS": f"bad id:{b64(K1)}"}, "invalid key id"),
        ({"DCPX_ENCRYPT_KEYS": f"default:{b64(K1)}", "DCPX_ENCRYPT_KEY": b64(K2)}, "different keys"),
        ({"DCPX_ENCRYPT_KEYS": " , "}, "lists no keys"),
    ],
)
def test_malformed_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], match: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(KeyConfigError, match=match) as err:
        EncryptTransform().params()
    assert b64(K1) not in str(err.value) and b64(K2) not in str(err.value)


def test_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_keyfile(tmp_path / "keys.json", {"old": K1, "new": K2}, primary="new")
    monkeypatch.setenv("DCPX_ENCRYPT_KEY_FILE", str(path))
    t = EncryptTransform()
    assert t.params()["key_id"] == "new"
    assert opens(EncryptTransform(), seal(t))
    assert opens(EncryptTransform(), seal(EncryptTransform(keys={"old": K1})))
    assert load_keyfile(path) == ({"old": K1, "new": K2}, "new")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{", "not valid JSON"),
        ("[]", "expected"),
        ('{"keys": {}}', "expected"),
        (json.dumps({"keys": {"a": b64(K1)}, "extra": 1}), "unknown fields"),
        (json.dumps({"keys": {"a": "%%%"}}), "not valid base64"),
        (json.dumps({"keys": {"a": b64(K1[:16])}}), "is 16 bytes"),
        (json.dumps({"keys": {"a": 5}}), "base64 string"),
        (json.dumps({"keys": {"a:b": b64(K1)}}), "invalid key id"),
        (json.dumps({"keys": {"a": b64(K1), "b": b64(K2)}}), "several keys and no \"primary\""),
    ],
)
def test_malformed_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(text)
    path.chmod(0o600)
    monkeypatch.setenv("DCPX_ENCRYPT_KEY_FILE", str(path))
    with pytest.raises(KeyConfigError, match=match):
        EncryptTransform().params()


@pytest.mark.parametrize("size", ["small", "oversized"])
def test_key_file_from_a_pipe(size: str) -> None:
    """A key file may be a pipe (``DCPX_ENCRYPT_KEY_FILE=<(secret-tool ...)``); it has no size
    to check up front, so the read itself stops past the limit."""
    text = format_keyfile({"a": K1}) if size == "small" else " " * (2 << 20)
    read_fd, write_fd = os.pipe()
    writer = threading.Thread(target=_feed, args=(write_fd, text.encode()))
    writer.start()
    try:
        if size == "small":
            assert load_keyfile(f"/dev/fd/{read_fd}") == ({"a": K1}, "a")
        else:
            with pytest.raises(KeyConfigError, match="larger than"):
                load_keyfile(f"/dev/fd/{read_fd}")
    finally:
        os.close(read_fd)  # a writer still blocked on a full pipe gets EPIPE and stops
        writer.join()


def _feed(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def test_missing_key_file_and_loose_permissions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DCPX_ENCRYPT_KEY_FILE", str(tmp_path / "absent.json"))
    with pytest.raises(KeyConfigError, match="cannot be read"):
        EncryptTransform().params()
    path = write_keyfile(tmp_path / "keys.json", {"a": K1})
    path.chmod(0o644)
    with pytest.warns(UserWarning, match="readable by other users"):
        load_keyfile(path)


def test_hook_provider_supplies_keys_and_primary(provider) -> None:  # type: ignore[no-untyped-def]
    kms = provider({"kms-1": K4}, primary="kms-1")
    t = EncryptTransform()
    assert t.params()["key_id"] == "kms-1"
    blob = seal(t)
    reader = EncryptTransform()
    assert opens(reader, blob) and opens(reader, blob)
    assert kms.calls.count("kms-1") == 2  # once per keyring, then cached
    with pytest.raises(UnknownKeyIdError, match="hooks answered None"):
        reader.keyring.get("nope")


def test_hook_result_is_validated(provider) -> None:  # type: ignore[no-untyped-def]
    provider({"bad": b"x" * 31})
    with pytest.raises(KeyConfigError, match="hook: key 'bad' is 31 bytes"):
        Keyring().get("bad")


def test_provider_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, provider) -> None:  # type: ignore[no-untyped-def]
    provider({"x": K4})
    assert Keyring().get("x") == K4
    monkeypatch.setenv("DCPX_ENCRYPT_KEY_FILE", str(write_keyfile(tmp_path / "k.json", {"x": K3})))
    assert Keyring().get("x") == K3
    monkeypatch.setenv("DCPX_ENCRYPT_KEYS", f"x:{b64(K2)}")
    assert Keyring().get("x") == K2
    assert Keyring({"x": K1}).get("x") == K1
    assert Keyring({"y": K1}).get("x") == K2  # explicit keys do not hide other sources


def test_rotation_new_primary_old_ids_readable() -> None:
    old_blob = seal(EncryptTransform(keys={"2024-01": K1}))
    rotated = EncryptTransform(keys={"2024-01": K1, "2024-06": K2}, primary="2024-06")
    new_blob = seal(rotated)
    assert parse_header(memoryview(new_blob)).key_id == "2024-06"
    assert rotated.params()["key_id"] == "2024-06"
    assert opens(rotated, old_blob) and opens(rotated, new_blob)
    with pytest.raises(UnknownKeyIdError, match="'2024-06'"):
        opens(EncryptTransform(keys={"2024-01": K1}), new_blob)
    with pytest.raises(WrongKeyError):
        opens(EncryptTransform(keys={"2024-06": K1}), new_blob)  # right id, wrong bytes


def test_explicit_key_validation() -> None:
    for keys, match in [
        ({"a": "c2VjcmV0"}, "is a str"),
        ({"a": b"x" * 16}, "is 16 bytes"),
        ({"a": 5}, "must be bytes"),
        ({"": K1}, "invalid key id"),
        ({"a" * 65: K1}, "invalid key id"),
        ([("a", K1)], "must be a mapping"),
    ]:
        with pytest.raises(KeyConfigError, match=match):
            EncryptTransform(keys=keys)  # type: ignore[arg-type]
    with pytest.raises(KeyConfigError, match="choose the one for new saves with primary="):
        EncryptTransform(keys={"a": K1, "b": K2}).params()
    with pytest.raises(dcpx.ConfigError, match="segment_size"):
        EncryptTransform(keys={"a": K1}, segment_size=1000)


def test_no_key_anywhere() -> None:
    with pytest.raises(NoKeyConfiguredError, match="DCPX_ENCRYPT_KEY") as err:
        EncryptTransform().params()
    assert isinstance(err.value, dcpx.ConfigError)
    with pytest.raises(NoKeyConfiguredError, match="'k9'"):
        Keyring().get("k9")


def test_has_keys_counts_every_key_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             provider) -> None:  # type: ignore[no-untyped-def]
    """What the core asks before it lets a manifest's key claim go unchecked."""
    assert not EncryptTransform().has_keys() and not Keyring().has_keys()
    assert EncryptTransform(keys={"a": K1}).has_keys()
    monkeypatch.setenv("DCPX_ENCRYPT_KEY", b64(K1))
    assert EncryptTransform().has_keys()
    monkeypatch.delenv("DCPX_ENCRYPT_KEY")
    monkeypatch.setenv("DCPX_ENCRYPT_KEY_FILE", str(write_keyfile(tmp_path / "k.json", {"x": K3})))
    assert Keyring().has_keys()
    monkeypatch.delenv("DCPX_ENCRYPT_KEY_FILE")
    provider({})
    assert Keyring().has_keys()  # a key-provider hook may know any id


# -- helpers ------------------------------------------------------------------------------
def test_generate_and_format_helpers(tmp_path: Path) -> None:
    a, b = generate_key(), generate_key()
    assert len(a) == 32 and a != b
    name, _, value = format_env("default", a).partition("=")
    assert name == "DCPX_ENCRYPT_KEY" and read_env({name: value}) == ({"default": a}, "default")
    name, _, value = format_env("prod-7", b).partition("=")
    assert name == "DCPX_ENCRYPT_KEYS" and read_env({name: value}) == ({"prod-7": b}, "prod-7")
    path = write_keyfile(tmp_path / "k.json", {"one": a, "two": b}, primary="two")
    assert load_keyfile(path) == ({"one": a, "two": b}, "two")
    with pytest.raises(KeyConfigError):
        format_keyfile({"one": a, "two": b})  # primary needed
    with pytest.raises(KeyConfigError):
        format_env("bad:id", a)


def test_reprs_and_descriptors_never_hold_key_material() -> None:
    t = EncryptTransform(keys={"k1": K1, "k2": K2}, primary="k2")
    texts = [repr(t), repr(t.keyring), t.get_descriptor(), str(t.params())]
    for text in texts:
        for key in (K1, K2):
            assert b64(key) not in text and key.hex() not in text and repr(key) not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "k2" in repr(t)


TRACED = r'''
import dcpx, torch, warnings
warnings.filterwarnings("ignore")

class Provider:
    @dcpx.hookimpl
    def dcpx_encrypt_get_key(self, key_id):
        return bytes(range(32))

    @dcpx.hookimpl
    def dcpx_encrypt_primary_key_id(self):
        return "kms"

dcpx.register_plugin(Provider(), name="kms-provider")
dcpx.save({"w": torch.ones(3)}, PATH, transforms=["encrypt"])
'''


def test_plugin_trace_never_prints_keys(tmp_path: Path) -> None:
    """``DCPX_TRACE_PLUGINS`` shows which hooks ran and what they returned by type only: a
    key provider's answer is a key."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    env["DCPX_TRACE_PLUGINS"] = "1"
    code = TRACED.replace("PATH", repr(str(tmp_path / "ck")))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    key = bytes(range(32))
    assert "dcpx_encrypt_get_key" in done.stderr and "returned bytes" in done.stderr
    for shown in (repr(key), key.hex(), base64.b64encode(key).decode(), repr(key)[2:40]):
        assert shown not in done.stderr

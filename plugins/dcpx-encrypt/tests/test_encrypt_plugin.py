"""The plugin as dcpx sees it: registry, descriptors, reader-side rebuild, torch stream API."""

from __future__ import annotations

import base64
import io

import pytest
from dcpx.transform import ChunkInfo, ItemInfo

import dcpx
import dcpx_encrypt.plugin
from dcpx_encrypt import EncryptTransform, parse_header

KEY = bytes(range(100, 132))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DCPX_ENCRYPT_KEY", "DCPX_ENCRYPT_KEYS", "DCPX_ENCRYPT_PRIMARY", "DCPX_ENCRYPT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_registered_under_its_name_with_its_hooks() -> None:
    reg = dcpx.plugin_host().lookup("stream.encrypt@dcpx")
    assert reg.cls is EncryptTransform and reg.source == "dcpx-encrypt"
    assert dcpx.plugin_host().resolve_name("encrypt") == "stream.encrypt@dcpx"
    hook = dcpx.plugin_host().pm.hook
    assert hook.dcpx_encrypt_get_key.spec.opts["firstresult"]
    assert hook.dcpx_encrypt_primary_key_id.spec.opts["firstresult"]
    assert dcpx_encrypt.plugin.dcpx_register_transforms


def test_descriptor_round_trip_and_reader_side_rebuild() -> None:
    writer = dcpx.transform("encrypt", keys={"k1": KEY}, segment_size=65536)
    text = writer.get_descriptor()
    assert text == "stream.encrypt@dcpx/1;key_id=k1;segment_size=65536"
    info = ChunkInfo(ItemInfo("x", 100_000, checkpoint_id="c"), 0, 1, 0, 100_000)
    data = bytes(range(256)) * 390 + b"tail"
    blob = writer.encode(memoryview(data), info)

    reader = dcpx.transform("encrypt", keys={"k1": KEY})
    rebuilt = reader.with_descriptor(dcpx.parse_descriptor(text))
    assert rebuilt.keyring is reader.keyring and rebuilt.segment_size == 65536
    assert rebuilt.get_descriptor() == text
    assert bytes(rebuilt.decode(memoryview(blob), info, len(data))) == data

    plain = dcpx.plugin_host().from_descriptor(text)  # no keys: environment, key file, hooks
    with pytest.raises(dcpx.ConfigError, match="'k1'"):
        plain.decode(memoryview(blob), info, len(data))


def test_descriptor_must_match_the_envelope_header() -> None:
    writer = EncryptTransform(keys={"k1": KEY, "k2": KEY}, primary="k1", segment_size=4096)
    info = ChunkInfo(ItemInfo("x", 10, checkpoint_id="c"), 0, 1, 0, 10)
    blob = writer.encode(memoryview(b"0123456789"), info)
    for text in ("stream.encrypt@dcpx/1;key_id=k2;segment_size=4096",
                 "stream.encrypt@dcpx/1;key_id=k1;segment_size=8192"):
        with pytest.raises(dcpx_encrypt.EnvelopeHeaderError, match="disagrees with the item's descriptor"):
            writer.with_descriptor(dcpx.parse_descriptor(text)).decode(memoryview(blob), info, 10)


@pytest.mark.parametrize(
    "text",
    [
        "stream.encrypt@dcpx/2;key_id=k1;segment_size=4096",
        "stream.encrypt@dcpx/1;key_id=k1",
        "stream.encrypt@dcpx/1;segment_size=4096",
        "stream.encrypt@dcpx/1;key_id=k1;segment_size=4096;suite=2",
        "stream.encrypt@dcpx/1;key_id=k1;segment_size=4000",
        "stream.encrypt@dcpx/1;key_id=k1;segment_size=04096",
        "stream.encrypt@dcpx/1;key_id=k1;segment_size=%2B4096",
        "stream.encrypt@dcpx/1;key_id=k1;segment_size=134217728",
        "stream.encrypt@dcpx/1;key_id=a%3Ab;segment_size=4096",
    ],
)
def test_strict_descriptors(text: str) -> None:
    with pytest.raises(dcpx.DescriptorError):
        dcpx.plugin_host().from_descriptor(text)
    with pytest.raises(dcpx.DescriptorError):
        EncryptTransform(keys={"k1": KEY}).with_descriptor(dcpx.parse_descriptor(text))


def test_torch_stream_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's StreamTransformExtension methods work too (one envelope per stream)."""
    t = dcpx.transform("encrypt", keys={"s": KEY})

    class Sink(io.BytesIO):
        def close(self) -> None:  # keep the value readable after the writer closes it
            pass

    sink = Sink()
    stream = t.transform_to(sink)
    payload = b"stock torch stream " * 1000
    stream.write(payload)
    stream.close()
    raw = sink.getvalue()
    assert parse_header(memoryview(raw)[8:]).key_id == "s"
    assert t.transform_from(io.BytesIO(raw)).read() == payload
    monkeypatch.setenv("DCPX_ENCRYPT_KEYS", "s:" + base64.b64encode(KEY).decode())
    version = t.get_descriptor().partition("/")[2]
    assert EncryptTransform.from_descriptor(version).transform_from(io.BytesIO(raw)).read() == payload

"""Descriptor strings: one canonical spelling per configuration, strict parsing."""

from __future__ import annotations

import pytest

import dcpx
from dcpx.descriptor import MAX_DESCRIPTOR_LEN, Descriptor, parse


@pytest.mark.parametrize(
    "text",
    [
        "stream.zstd/1",
        "frame@dcpx/1",
        "stream.encrypt@dcpx/1;key-id=k1;suite=aes-256-gcm",
        "stream.x@my-org.example/0",
        "stream.x@test/123456789",
        "stream.x@test/2;a=;b=%2F%3B%3D%25%20",
        "stream.x@test/1;level=-3;x_y=a.b~c+d*e",
    ],
)
def test_canonical_strings_round_trip(text: str) -> None:
    desc = parse(text)
    assert desc.format() == text
    assert str(desc) == text
    assert parse(desc.format()) == desc


def test_parsed_fields() -> None:
    desc = parse("stream.encrypt@dcpx/3;key-id=k%2F1;suite=aes")
    assert desc.name == "stream.encrypt@dcpx"
    assert desc.domain == "dcpx"
    assert desc.version == 3
    assert dict(desc.params) == {"key-id": "k/1", "suite": "aes"}
    assert parse("stream.zstd/1").domain is None


def test_format_sorts_and_percent_encodes() -> None:
    text = dcpx.format_descriptor("stream.x@test", 1, {"zeta": "1", "alpha": "a b/c;d=e%f", "mid": "é"})
    assert text == "stream.x@test/1;alpha=a%20b%2Fc%3Bd%3De%25f;mid=%C3%A9;zeta=1"
    desc = parse(text)
    assert desc.params == {"alpha": "a b/c;d=e%f", "mid": "é", "zeta": "1"}
    assert list(desc.params) == ["alpha", "mid", "zeta"]


def test_descriptor_object_orders_params() -> None:
    a = Descriptor("stream.x@test", 1, {"b": "2", "a": "1"})
    b = Descriptor("stream.x@test", 1, {"a": "1", "b": "2"})
    assert a == b and a.format() == b.format() == "stream.x@test/1;a=1;b=2"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "stream.zstd",  # no version
        "stream.zstd/",  # empty version
        "/1",  # no name
        "1stream/1",  # name starts with a digit
        "stream zstd/1",
        "stream.x@/1",  # empty domain
        "stream.x@a@b/1",  # two domains
        "stream.x@test/1/2",
        "stream.x@test/1;",  # empty parameter
        "stream.x@test/1;=v",
        "stream.x@test/1;k",  # no '='
        "stream.x@test/1;K=v",  # upper-case key
        "stream.x@test/1;k=a;b",
        "stream.x@test/1;k=a b",  # unencoded space
        "stream.x@test/1;k=a/b",  # unencoded slash
        "stream.x@test/1;k=%FF",  # not UTF-8
    ],
)
def test_malformed_is_rejected(text: str) -> None:
    with pytest.raises(dcpx.DescriptorError):
        parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "stream.x@test/1;b=1;a=2",  # unsorted
        "stream.x@test/1;k=%2f",  # lower-case hex
        "stream.x@test/1;k=%41",  # encodes a character that needs no encoding
        "stream.x@test/1;k=%7E",
        "stream.x@test/1;k=50%",  # bare percent
    ],
)
def test_non_canonical_is_rejected(text: str) -> None:
    with pytest.raises(dcpx.DescriptorError):
        parse(text)


@pytest.mark.parametrize("version", ["01", "-1", "+1", "1.0", "v1", "1e3", "0x1", " 1", "1 ", "1234567890", "١"])
def test_bad_version_is_rejected(version: str) -> None:
    with pytest.raises(dcpx.DescriptorError):
        parse(f"stream.x@test/{version}")


def test_duplicate_key_is_rejected() -> None:
    with pytest.raises(dcpx.DescriptorError, match="duplicate"):
        parse("stream.x@test/1;a=1;a=1")


@pytest.mark.parametrize(
    "text",
    ["stream.zstd\u00e9/1", "stream.x@tést/1", "stream.x@test/1;k=é", "stream.x@test/1;ké=v", "stream.x@test/1;k=\u0661"],
)
def test_non_ascii_is_rejected(text: str) -> None:
    with pytest.raises(dcpx.DescriptorError):
        parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "stream.x@test\n/1",  # trailing newline in the name
        "stream.x@test/1;k\n=v",  # trailing newline in a key
        "stream.x@test/1\n",
        "stream.x@test/1;k=v\n",
        "stream.x@test/1;k=v\x00",
        "stream.x@test\x00/1",
        "stream.x@test\t/1",
    ],
)
def test_control_characters_are_rejected(text: str) -> None:
    with pytest.raises(dcpx.DescriptorError):
        parse(text)


def test_too_long_is_rejected() -> None:
    head = "stream.x@test/1;k="
    ok = head + "a" * (MAX_DESCRIPTOR_LEN - len(head))
    assert parse(ok).params["k"] == "a" * (MAX_DESCRIPTOR_LEN - len(head))
    with pytest.raises(dcpx.DescriptorError, match="longer"):
        parse(ok + "a")


@pytest.mark.parametrize("value", [None, 1, b"stream.zstd/1", ["stream.zstd/1"]])
def test_non_string_is_rejected(value: object) -> None:
    with pytest.raises(dcpx.DescriptorError):
        parse(value)


def test_constructor_validates() -> None:
    with pytest.raises(dcpx.DescriptorError):
        Descriptor("bad name", 1)
    with pytest.raises(dcpx.DescriptorError):
        Descriptor("stream.x@test", -1)
    with pytest.raises(dcpx.DescriptorError):
        Descriptor("stream.x@test", 1, {"Key": "v"})
    with pytest.raises(dcpx.DescriptorError):
        Descriptor("stream.x@test", 1, {"k": 1})  # type: ignore[dict-item]

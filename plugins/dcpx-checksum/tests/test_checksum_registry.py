"""Descriptors and registration: the transform is found the way any third-party one is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import dcpx
from dcpx_checksum import ChecksumTransform

NAME = "stream.checksum@dcpx"


def test_found_through_its_entry_point() -> None:
    reg = dcpx.plugin_host().lookup(NAME)
    assert reg.cls is ChecksumTransform and reg.source == "dcpx-checksum"
    assert any(p.name == "checksum" and NAME in p.transforms for p in dcpx.plugin_host().plugins())


@pytest.mark.parametrize("name", ["checksum", NAME])
def test_shorthand_builds_the_default(name: str) -> None:
    t = dcpx.transform(name)
    assert isinstance(t, ChecksumTransform)
    assert t.get_descriptor() == f"{NAME}/1;algorithm=crc32c"


def test_descriptor_round_trip(algorithm: str) -> None:
    text = dcpx.transform("checksum", algorithm=algorithm).get_descriptor()
    assert text == f"{NAME}/1;algorithm={algorithm}"
    assert dcpx.parse_descriptor(text).params == {"algorithm": algorithm}
    back = dcpx.plugin_host().from_descriptor(text)
    assert isinstance(back, ChecksumTransform) and back.algorithm.name == algorithm
    assert back.with_descriptor(dcpx.parse_descriptor(text)).algorithm.name == algorithm


@pytest.mark.parametrize(
    "text, match",
    [
        (f"{NAME}/2;algorithm=crc32c", "unsupported version 2"),
        (f"{NAME}/0;algorithm=crc32c", "unsupported version 0"),
        (f"{NAME}/1;algorithm=crc32c;level=3", r"unknown parameters \['level'\]"),
        (f"{NAME}/1", "lacks the 'algorithm' parameter"),
        (f"{NAME}/1;algorithm=md5", "unknown algorithm 'md5'"),
        (f"{NAME}/1;algorithm=CRC32C", "unknown algorithm 'CRC32C'"),
        (f"{NAME}/1;algorithm=", "malformed|unknown algorithm"),
    ],
)
def test_strict_descriptors(text: str, match: str) -> None:
    with pytest.raises(dcpx.DescriptorError, match=match):
        dcpx.plugin_host().from_descriptor(text)


def test_bad_user_options() -> None:
    with pytest.raises(dcpx.ConfigError, match="unknown checksum algorithm 'md5'"):
        dcpx.transform("checksum", algorithm="md5")
    with pytest.raises(dcpx.ConfigError):
        dcpx.transform("checksum", level=3)


def test_no_torch_compat_form() -> None:
    assert ChecksumTransform().torch_compatible() is None


def test_register_plugin_in_process() -> None:
    """With entry points switched off, ``dcpx.register_plugin`` is all it takes."""
    script = textwrap.dedent(
        f"""
        import dcpx, pytest
        with pytest.raises(dcpx.UnknownTransformError, match="dcpx-checksum"):
            dcpx.plugin_host().from_descriptor("{NAME}/1;algorithm=crc32c")
        import dcpx_checksum.plugin
        dcpx.register_plugin(dcpx_checksum.plugin)
        t = dcpx.plugin_host().from_descriptor("{NAME}/1;algorithm=sha256")
        assert type(t).__name__ == "ChecksumTransform" and t.algorithm.name == "sha256"
        assert dcpx.plugin_host().lookup("{NAME}").source.startswith("<in-process")
        assert dcpx.transform("checksum").get_descriptor() == "{NAME}/1;algorithm=crc32c"
        print("ok")
        """
    )
    env = {**os.environ, "DCPX_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

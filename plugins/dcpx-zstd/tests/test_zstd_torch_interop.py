"""``stream.zstd/1`` means exactly torch's format, in both directions and through both APIs."""

from __future__ import annotations

import io
from typing import Callable

import pytest
import torch
from torch.distributed.checkpoint._extension import ExtensionRegistry, ZStandard

import dcpx
from dcpx_zstd import ZstdTransform


class KeepOpen(io.BytesIO):
    """A sink that survives the writer closing it (torch's writers close their output)."""

    def close(self) -> None:
        pass


def torch_write(data: bytes) -> bytes:
    sink = KeepOpen()
    stream = ZStandard().transform_to(sink)
    stream.write(data)
    stream.close()
    return sink.getvalue()


def torch_read(blob: bytes) -> bytes:
    return ZStandard().transform_from(io.BytesIO(blob)).read()


def ours_write(data: bytes, transform: ZstdTransform) -> bytes:
    sink = KeepOpen()
    stream = transform.transform_to(sink)
    for start in range(0, len(data), 100_000):  # several writes, as torch's writer does
        stream.write(data[start:start + 100_000])
    stream.close()
    return sink.getvalue()


def ours_read(blob: bytes, transform: ZstdTransform, step: int = 65_536) -> bytes:
    stream = transform.transform_from(io.BytesIO(blob))
    parts = []
    while piece := stream.read(step):
        parts.append(piece)
    return b"".join(parts)


@pytest.fixture
def plain() -> ZstdTransform:
    """What dcpx builds for the parameterless descriptor torch records."""
    t = dcpx.plugin_host().from_descriptor("stream.zstd/1")
    assert isinstance(t, ZstdTransform) and t.torch_format
    return t


@pytest.fixture(params=[0, 1, 1000, 1_000_003])
def payload(request: pytest.FixtureRequest, weights: Callable[..., bytes]) -> bytes:
    return weights(request.param // 4, torch.float32) + b"x" * (request.param % 4)


def test_stream_torch_to_ours(plain: ZstdTransform, payload: bytes) -> None:
    assert ours_read(torch_write(payload), plain) == payload
    assert plain.transform_from(io.BytesIO(torch_write(payload))).read() == payload


def test_stream_ours_to_torch(plain: ZstdTransform, payload: bytes) -> None:
    for level in (3, 1, -5, 19):
        assert torch_read(ours_write(payload, ZstdTransform(level=level, torch_format=True))) == payload


def test_chunk_torch_stream_to_our_decode(plain: ZstdTransform, payload: bytes, chunk_info) -> None:
    chunk = chunk_info(len(payload), torch.float32)
    assert bytes(plain.decode(memoryview(torch_write(payload)), chunk, len(payload))) == payload


def test_chunk_our_encode_to_torch_stream(plain: ZstdTransform, payload: bytes, chunk_info) -> None:
    chunk = chunk_info(len(payload), torch.float32)
    assert torch_read(bytes(plain.encode(memoryview(payload), chunk))) == payload


def test_torch_compatible_is_the_plain_format() -> None:
    for t in (ZstdTransform(), ZstdTransform(grouping="float32", level=7), dcpx.transform("zstd")):
        compat = t.torch_compatible()
        assert compat.get_descriptor() == "stream.zstd/1" == ZStandard().get_descriptor()
        assert compat.params() == {} and compat.level == t.level
        # stock torch's registry rebuilds its own ZStandard from what we record
        assert isinstance(ExtensionRegistry().from_descriptor_list([compat.get_descriptor()])[0], ZStandard)


def test_stock_torch_refuses_the_dcpx_form() -> None:
    text = ZstdTransform(grouping="float32").get_descriptor()
    assert text == "stream.zstd/1;group=float32"
    with pytest.raises(ValueError):
        ExtensionRegistry().from_descriptor_list([text])


def test_torch_registry_protocol_works_on_our_class() -> None:
    """Registered into torch's own registry, the class rebuilds both forms."""
    registry = ExtensionRegistry()
    registry.register(ZstdTransform)
    plain, grouped = registry.from_descriptor_list(["stream.zstd/1", "stream.zstd/1;group=float16"])
    assert isinstance(plain, ZstdTransform) and plain.torch_format
    assert isinstance(grouped, ZstdTransform) and grouped.layout.name == "float16"


def test_dcpx_form_through_the_stream_api(weights: Callable[..., bytes]) -> None:
    data = weights(30_000, torch.bfloat16)
    t = ZstdTransform(grouping="float16")
    blob = ours_write(data, t)
    assert len(blob) < len(data)
    assert dcpx.plugin_host().from_descriptor(t.get_descriptor()).transform_from(io.BytesIO(blob)).read() == data

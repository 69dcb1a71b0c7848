"""Registration and descriptors: found through its entry point, replaces torch's ZStandard."""

from __future__ import annotations

import pytest
import torch

import dcpx
from dcpx_zstd import ZstdTransform


def test_found_through_its_entry_point_and_replaces_torch() -> None:
    reg = dcpx.plugin_host().lookup("stream.zstd")
    assert reg.cls is ZstdTransform and reg.source == "dcpx-zstd"
    assert any(p.name == "zstd" and "stream.zstd" in p.transforms for p in dcpx.plugin_host().plugins())


@pytest.mark.parametrize("name", ["zstd", "stream.zstd"])
def test_shorthand_builds_the_default(name: str) -> None:
    t = dcpx.transform(name)
    assert isinstance(t, ZstdTransform)
    assert (t.level, t.grouping, t.raw_threshold, t.torch_format) == (3, "auto", 0.95, False)


@pytest.mark.parametrize("text", [
    "stream.zstd/1", "stream.zstd/1;group=none", "stream.zstd/1;group=float16", "stream.zstd/1;group=bfloat16",
    "stream.zstd/1;group=float32", "stream.zstd/1;group=float64", "stream.zstd/1;group=int16",
    "stream.zstd/1;group=int32", "stream.zstd/1;group=int64",
])
def test_descriptor_round_trip(text: str) -> None:
    t = dcpx.plugin_host().from_descriptor(text)
    assert isinstance(t, ZstdTransform) and t.get_descriptor() == text
    assert t.with_descriptor(dcpx.parse_descriptor(text)).get_descriptor() == text


def test_level_and_threshold_stay_out_of_the_descriptor(chunk_info) -> None:
    t = dcpx.transform("zstd", level=-7, raw_threshold=0.5)
    item = chunk_info(8, torch.bfloat16).item
    assert t.for_item(item).get_descriptor() == "stream.zstd/1;group=bfloat16"
    assert t.for_item(item).level == -7 and t.for_item(item).raw_threshold == 0.5


def test_for_item_reuses_variants(chunk_info) -> None:
    t = ZstdTransform()
    a = t.for_item(chunk_info(8, torch.float32, fqn="a").item)
    b = t.for_item(chunk_info(8, torch.float32, fqn="b").item)
    assert a is b and a is not t
    assert ZstdTransform(torch_format=True).for_item(chunk_info(8, torch.float32).item).get_descriptor() == "stream.zstd/1"

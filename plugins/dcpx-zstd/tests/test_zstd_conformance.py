"""The dcpx conformance kit, run against the zstd transform's levels and byte groupings."""

from __future__ import annotations

import torch

from dcpx.testing import TransformConformance

from dcpx_zstd import ZstdTransform


class TestZstdConformance(TransformConformance):
    variants = {
        "auto-level3": lambda: ZstdTransform(),
        "auto-fast": lambda: ZstdTransform(level=-5),
        "float32-level9": lambda: ZstdTransform(level=9, grouping="float32"),
        "bfloat16-dtype": lambda: ZstdTransform(level=1, grouping=torch.bfloat16),
        "none-level1": lambda: ZstdTransform(level=1, grouping="none"),
        "torch-format": lambda: ZstdTransform(torch_format=True),
    }
    entry_point = "zstd"

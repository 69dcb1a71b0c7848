"""dcpx-zstd: zstd compression for dcpx checkpoints, with byte grouping of floating-point
tensors, that reads and (in its plain form) writes torch's own ``stream.zstd`` format."""

from .grouping import LAYOUTS, Layout
from .transform import ZstdTransform, auto_grouping

__all__ = ["LAYOUTS", "Layout", "ZstdTransform", "auto_grouping"]

"""dcpx-checksum: per-chunk CRC-32C, XXH3-128 or SHA-256 for dcpx checkpoints.

Installing the distribution makes ``stream.checksum@dcpx`` readable; a save activates it with
``transforms=["checksum"]`` or ``dcpx.transform("checksum", algorithm="xxh3-128")``.
"""

from .algorithms import ALGORITHMS, DEFAULT_ALGORITHM, Algorithm
from .errors import ChecksumError, ChecksumFramingError, ChecksumMismatchError
from .transform import ChecksumTransform

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "Algorithm",
    "ChecksumError",
    "ChecksumFramingError",
    "ChecksumMismatchError",
    "ChecksumTransform",
]

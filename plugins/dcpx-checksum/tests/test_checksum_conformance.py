"""The dcpx conformance kit, run against every checksum algorithm."""

from __future__ import annotations

from dcpx.testing import TransformConformance

from dcpx_checksum import ALGORITHMS, ChecksumTransform


class TestChecksumConformance(TransformConformance):
    variants = {name: (lambda name=name: ChecksumTransform(algorithm=name)) for name in sorted(ALGORITHMS)}
    entry_point = "checksum"

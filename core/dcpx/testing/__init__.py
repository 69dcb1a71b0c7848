"""The dcpx conformance kit: generic tests every transform plugin should pass.

    from dcpx.testing import TransformConformance

    class TestMine(TransformConformance):
        transform_factory = staticmethod(lambda: MyTransform())

``XorReference`` (``stream.xor@dcpx-testing``) is the reversible toy the kit chains with the
transform under test.  Names are imported on first use, so that loading the kit's pytest
plugin (``dcpx.testing.pytest_plugin``) stays cheap.  See docs/conformance.md.
"""

from __future__ import annotations

import sys
from typing import Any

_EXPORTS = {
    "TransformConformance": "conformance",
    "XorReference": "reference",
    "ReferencePlugin": "reference",
    "plugin_for": "reference",
    "payload": "payloads",
    "KINDS": "payloads",
    "PATTERNS": "payloads",
}
_SUBMODULES = ("conformance", "conformance_support", "payloads", "reference")


def _register_assert_rewrite() -> None:
    """Under pytest, rewrite the kit's asserts so failures show the compared values."""
    pytest = sys.modules.get("pytest")
    pending = [f"{__name__}.{m}" for m in _SUBMODULES if f"{__name__}.{m}" not in sys.modules]
    if pytest is not None and pending:
        pytest.register_assert_rewrite(*pending)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    _register_assert_rewrite()
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)

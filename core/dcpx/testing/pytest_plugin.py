"""The dcpx conformance kit as a pytest plugin (entry point ``dcpx`` in the group ``pytest11``).

Loaded by pytest at start-up in every environment where dcpx is installed, so it defines
no autouse fixtures and imports neither torch nor the kit itself: it only arranges for the
kit's asserts to be rewritten (readable failures) and offers opt-in fixtures.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

_KIT_MODULES = ("dcpx.testing.conformance", "dcpx.testing.conformance_support", "dcpx.testing.payloads",
                "dcpx.testing.reference")

pytest.register_assert_rewrite(*(m for m in _KIT_MODULES if m not in sys.modules))


@pytest.fixture
def dcpx_reference_transform() -> Any:
    """A fresh ``stream.xor@dcpx-testing`` instance, the kit's reversible reference transform."""
    from dcpx.testing.reference import XorReference

    return XorReference()


@pytest.fixture
def dcpx_reference_plugin() -> Any:
    """Register the reference transform in the process-wide plugin host for one test, so
    checkpoints that use it load without passing it to the reader."""
    import dcpx
    from dcpx.testing.reference import ReferencePlugin

    name = "dcpx-testing-reference"
    host = dcpx.plugin_host()
    host.register(ReferencePlugin(), name=name)
    try:
        yield host
    finally:
        host.unregister(name)

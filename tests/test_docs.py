"""Documentation that must not drift from the code."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import dcpx.hookspecs

HOOKS_DOC = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def _specs(module) -> list:
    return [f for name, f in vars(module).items() if name.startswith("dcpx_") and hasattr(f, "dcpx_spec")]


def _modules() -> list:
    modules = [dcpx.hookspecs]
    try:
        modules.append(importlib.import_module("dcpx_encrypt.hookspecs"))
    except ImportError:
        pass
    return modules


@pytest.mark.parametrize("spec", [s for m in _modules() for s in _specs(m)], ids=lambda s: s.__name__)
def test_every_hookspec_signature_is_documented(spec):
    """docs/hooks.md names each hook with its exact parameters, e.g. `dcpx_x(a, b)`."""
    params = ", ".join(inspect.signature(spec).parameters)
    heading = f"`{spec.__name__}({params})`"
    assert heading in HOOKS_DOC.read_text(), f"docs/hooks.md lacks {heading}"


def test_core_hookspecs_are_found():
    assert {s.__name__ for s in _specs(dcpx.hookspecs)} >= {"dcpx_register_transforms", "dcpx_addhooks", "dcpx_safe_globals"}

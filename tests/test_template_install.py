"""The plugin template works as a third party would use it: copy, rename, pip install, use.

The copy is installed into this interpreter's environment (a real wheel install, not an
editable one), exercised from fresh interpreters - which load plugins from entry points as
any user's process does - and uninstalled again whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

TEMPLATE = Path(__file__).resolve().parent.parent / "plugins" / "_template"
DIST, PACKAGE, ENTRY, TRANSFORM = "dcpx-acme", "dcpx_acme", "acme", "stream.acme@acme"
# (old, new) in the order applied; the template's own names must all disappear
RENAMES = [
    ("dcpx-template", DIST),
    ("dcpx_template", PACKAGE),
    ("stream.template@example", TRANSFORM),
    ("TemplateTransform", "AcmeTransform"),
    ('template = "', f'{ENTRY} = "'),             # the entry point in pyproject.toml
    ('entry_point = "template"', f'entry_point = "{ENTRY}"'),  # the conformance subclass
]
LEFTOVERS = ("dcpx-template", "dcpx_template", "stream.template", '"template"', "template =")


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _user_env() -> dict[str, str]:
    """The environment of a user's process: plugins load from entry points, as by default
    (the core's test fixtures switch that off for this process only)."""
    switches = ("DCPX_DISABLE_PLUGIN_AUTOLOAD", "DCPX_LOAD_PLUGINS", "DCPX_TRACE_PLUGINS")
    return {k: v for k, v in os.environ.items() if k not in switches}


def _copy_and_rename(dest: Path) -> Path:
    shutil.copytree(TEMPLATE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    (dest / "src" / "dcpx_template").rename(dest / "src" / PACKAGE)
    (dest / "tests" / "test_template_plugin.py").rename(dest / "tests" / "test_acme_plugin.py")
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8")
        for old, new in RENAMES:
            text = text.replace(old, new)
        left = [word for word in LEFTOVERS if word in text]
        assert not left, f"{path.relative_to(dest)} still names the template: {left}"
        path.write_text(text, encoding="utf-8")
    return dest


@pytest.fixture
def installed_acme(tmp_path: Path) -> Iterator[Path]:
    source = _copy_and_rename(tmp_path / DIST)
    if _pip("show", "-q", DIST).returncode == 0:
        pytest.fail(f"{DIST} is already installed in this environment; uninstall it first")
    result = _pip("install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    try:
        assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
        yield source
    finally:
        removed = _pip("uninstall", "-y", "-q", DIST)
        assert removed.returncode == 0 or "not installed" in removed.stderr, removed.stderr


@pytest.mark.slow
def test_renamed_template_installs_lists_and_round_trips(installed_acme: Path, tmp_path: Path) -> None:
    listed = subprocess.run([sys.executable, "-m", "dcpx", "plugins", "--json"], capture_output=True,
                            text=True, env=_user_env(), cwd=tmp_path, timeout=300)
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    acme = [p for p in report["plugins"] if p["name"] == ENTRY]
    assert len(acme) == 1, f"`dcpx plugins --json` does not list {ENTRY!r}: {report['plugins']}"
    assert acme[0]["distribution"] == DIST and acme[0]["transforms"] == [TRANSFORM], acme[0]
    assert {"name": TRANSFORM, "source": DIST} in report["transforms"]
    assert not [f for f in report["failures"] if f["name"] == ENTRY], report["failures"]

    # The renamed plugin's own tests (the conformance kit, with its entry-point check, and the
    # template's round trip) plus a save that names the transform only by its entry point.
    (installed_acme / "tests" / "test_acme_by_name.py").write_text(BY_NAME, encoding="utf-8")
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         capture_output=True, text=True, env=_user_env(), cwd=installed_acme, timeout=300)
    assert ran.returncode == 0, f"the installed plugin's tests failed:\n{ran.stdout[-6000:]}\n{ran.stderr[-3000:]}"
    assert "failed" not in ran.stdout and " passed" in ran.stdout, ran.stdout[-2000:]


BY_NAME = textwrap.dedent(f"""
    import torch

    import dcpx
    from dcpx.inspect import describe
    from {PACKAGE} import AcmeTransform


    def test_save_by_entry_point_name(tmp_path):
        state = {{"w": torch.randn(64, 33), "ids": torch.arange(900), "step": 7}}
        dcpx.save(state, tmp_path, transforms=["{ENTRY}"], chunk_size=1024)
        out = {{"w": torch.zeros(64, 33), "ids": torch.zeros(900, dtype=torch.int64), "step": 0}}
        dcpx.load(out, tmp_path)  # no transforms: the reader finds the plugin through its entry point
        assert torch.equal(out["w"], state["w"]) and torch.equal(out["ids"], state["ids"])
        assert out["step"] == 7
        assert dcpx.plugin_host().lookup("{TRANSFORM}").cls is AcmeTransform
        assert "{TRANSFORM}" in describe(str(tmp_path))["transforms"]
""")

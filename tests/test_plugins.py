"""The plugin host: in-process plugins, shorthands, conflicts, failures, entry points, switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint._extension import ZStandard

import dcpx
import dcpx.plugins
from checkpoint_helpers import assert_same, blank, storage_items
from toy_transforms import BitFlip
from dcpx.transform import TorchStreamTransform

# -- helpers -------------------------------------------------------------------------------


def _identity_transform(name: str) -> type[dcpx.Transform]:
    class Identity(dcpx.Transform):
        version = 1

        def encode(self, data: memoryview, chunk: Any) -> bytes:
            return bytes(data)

        def decode(self, data: memoryview, chunk: Any, size: int) -> bytes:
            return bytes(data)

    Identity.name = name
    Identity.__name__ = Identity.__qualname__ = f"Identity_{name.replace('.', '_').replace('@', '_')}"
    return Identity


def _plugin_module(modname: str, *classes: type) -> types.ModuleType:
    """A module object whose hook registers ``classes`` (what an installed plugin looks like)."""
    mod = types.ModuleType(modname)

    @dcpx.hookimpl
    def dcpx_register_transforms(register: Any) -> None:
        for cls in classes:
            register(cls)

    mod.dcpx_register_transforms = dcpx_register_transforms  # type: ignore[attr-defined]
    return mod


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 33, generator=g),
        "i": torch.arange(1000, dtype=torch.int32),
        "meta": {"step": 7, "name": "run"},
    }


# -- in-process registration -------------------------------------------------------------------


def test_register_module_and_resolve_shorthand(fresh_host: Any) -> None:
    cls = _identity_transform("stream.inproc@test")
    dcpx.register_plugin(_plugin_module("inproc_plugin", cls), name="inproc")
    t = dcpx.transform("inproc")
    assert isinstance(t, cls)
    assert isinstance(dcpx.transform("stream.inproc@test"), cls)
    reg = fresh_host.lookup("stream.inproc@test")
    assert reg.cls is cls and "inproc" in reg.source
    info = {p.name: p for p in fresh_host.plugins()}["inproc"]
    assert info.transforms == ("stream.inproc@test",)
    assert "dcpx_register_transforms" in info.hooks
    assert isinstance(fresh_host.from_descriptor("stream.inproc@test/1"), cls)


def test_register_object_with_methods(toys: Any) -> None:
    x = dcpx.transform("xor", seed=3)
    assert isinstance(x, toys.XorTransform) and x.get_descriptor() == "stream.xor@test/1;seed=3"
    assert isinstance(dcpx.transform("rev"), toys.RevTransform)


def test_zstd_shorthand_is_torch_zstandard(fresh_host: Any) -> None:
    t = dcpx.transform("zstd")
    assert t.get_descriptor() == "stream.zstd/1"
    if isinstance(t, TorchStreamTransform):
        assert isinstance(t.extension, ZStandard)
    assert fresh_host.resolve_name("zstd") == "stream.zstd"


def test_bad_options_are_config_errors(toys: Any) -> None:
    with pytest.raises(dcpx.ConfigError):
        dcpx.transform("xor", nonsense=1)


def test_ambiguous_shorthand(fresh_host: Any) -> None:
    dcpx.register_plugin(_plugin_module("amb_a", _identity_transform("stream.amb@aaa")), name="amb-a")
    dcpx.register_plugin(_plugin_module("amb_b", _identity_transform("stream.amb@bbb")), name="amb-b")
    with pytest.raises(dcpx.ConfigError, match="ambiguous"):
        dcpx.transform("amb")
    assert dcpx.transform("stream.amb@bbb").name == "stream.amb@bbb"


def test_same_plugin_name_twice(fresh_host: Any) -> None:
    dcpx.register_plugin(_plugin_module("twice", _identity_transform("stream.twice@test")), name="twice")
    with pytest.raises(dcpx.PluginError, match="twice"):
        dcpx.register_plugin(_plugin_module("twice2", _identity_transform("stream.twice2@test")), name="twice")


def test_conflict_names_both_sources(fresh_host: Any) -> None:
    first = _identity_transform("stream.same@test")
    second = _identity_transform("stream.same@test")
    dcpx.register_plugin(_plugin_module("first_plugin", first), name="first-source")
    with pytest.raises(dcpx.PluginError) as info:
        dcpx.register_plugin(_plugin_module("second_plugin", second), name="second-source")
    message = str(info.value)
    assert "stream.same@test" in message
    assert "first-source" in message and "second-source" in message
    # the second plugin is not half-registered, and the name never silently resolves to it:
    # it keeps the first registration or stays an error naming both
    assert "second-source" not in {p.name for p in fresh_host.plugins()}
    try:
        assert fresh_host.lookup("stream.same@test").cls is first
    except dcpx.PluginError as exc:
        assert "first-source" in str(exc) and "second-source" in str(exc)


def test_registering_non_transforms_is_refused(fresh_host: Any) -> None:
    with pytest.raises(dcpx.PluginError):
        dcpx.register_plugin(_plugin_module("notatransform", dict), name="not-a-transform")
    nodomain = _identity_transform("stream.nodomain")
    with pytest.raises(dcpx.PluginError, match="domain"):
        dcpx.register_plugin(_plugin_module("nodomain", nodomain), name="nodomain")


def test_unregister_forgets_transforms(fresh_host: Any) -> None:
    dcpx.register_plugin(_plugin_module("gone", _identity_transform("stream.gone@test")), name="gone")
    fresh_host.unregister("gone")
    with pytest.raises(dcpx.UnknownTransformError):
        fresh_host.lookup("stream.gone@test")
    assert fresh_host.lookup("stream.zstd").cls is ZStandard


# -- unknown transforms ----------------------------------------------------------------------------


@pytest.fixture
def no_autoload(fresh_host: Any) -> Any:
    """A host that sees no installed distributions (conftest disables autoloading), so the
    first-party plugins count as absent even where they are installed."""
    assert os.environ.get("DCPX_DISABLE_PLUGIN_AUTOLOAD") == "1"
    return fresh_host


@pytest.mark.parametrize(
    "descriptor, dist",
    [("stream.encrypt@dcpx/1", "dcpx-encrypt"), ("stream.checksum@dcpx/1;algo=sha256", "dcpx-checksum")],
)
def test_unknown_first_party_descriptor_names_distribution(no_autoload: Any, descriptor: str, dist: str) -> None:
    with pytest.raises(dcpx.UnknownTransformError) as info:
        no_autoload.from_descriptor(descriptor)
    assert descriptor.partition("/")[0] in str(info.value)
    assert dist in str(info.value)


def test_unknown_shorthand_names_distribution(no_autoload: Any) -> None:
    with pytest.raises(dcpx.UnknownTransformError, match="dcpx-encrypt"):
        dcpx.transform("encrypt")


def test_unknown_third_party_descriptor(no_autoload: Any) -> None:
    with pytest.raises(dcpx.UnknownTransformError, match="stream.nothing@nowhere") as info:
        no_autoload.from_descriptor("stream.nothing@nowhere/1")
    assert "install" in str(info.value)


def test_descriptor_with_bad_params_for_known_transform(toys: Any) -> None:
    host = dcpx.plugin_host()
    with pytest.raises(dcpx.DescriptorError):
        host.from_descriptor("stream.rev@test/1;x=1")
    with pytest.raises(dcpx.DescriptorError):
        host.from_descriptor("stream.rev@test/2")
    with pytest.raises(dcpx.DescriptorError):
        host.from_descriptor("stream.zstd/2")
    assert host.from_descriptor("stream.xor@test/1;seed=7").seed == 7


# -- failing plugins ----------------------------------------------------------------------------------


def test_plugin_whose_hook_raises(fresh_host: Any) -> None:
    good_before = _identity_transform("stream.before@test")
    partial = _identity_transform("stream.partial@test")
    good_after = _identity_transform("stream.after@test")
    dcpx.register_plugin(_plugin_module("before", good_before), name="before")

    bad = types.ModuleType("bad_plugin")

    @dcpx.hookimpl
    def dcpx_register_transforms(register: Any) -> None:
        register(partial)
        raise RuntimeError("hook exploded")

    bad.dcpx_register_transforms = dcpx_register_transforms  # type: ignore[attr-defined]
    with pytest.raises(dcpx.PluginError, match="hook exploded"):
        dcpx.register_plugin(bad, name="bad-plugin")
    dcpx.register_plugin(_plugin_module("after", good_after), name="after")

    failures = {f.name: f for f in fresh_host.failures()}
    assert "bad-plugin" in failures and "hook exploded" in failures["bad-plugin"].error
    assert fresh_host.lookup("stream.before@test").cls is good_before
    assert fresh_host.lookup("stream.after@test").cls is good_after
    with pytest.raises(dcpx.UnknownTransformError) as info:
        fresh_host.lookup("stream.partial@test")  # nothing half-registered
    assert "bad-plugin" in str(info.value)  # the error points at the broken plugin
    assert not fresh_host.pm.has_plugin("bad-plugin")


# -- torch extensions ---------------------------------------------------------------------------------


def _roundtrip(path: Path, transforms: list[Any], **kw: Any) -> dict[str, Any]:
    sd = _state()
    dcpx.save(sd, path, transforms=transforms, **kw)
    out = blank(sd)
    dcpx.load(out, path)
    assert_same(out, sd)
    return storage_items(dcpx.reader.load_metadata(str(path))[0])


@pytest.mark.parametrize("spec", ["zstd", "stream.zstd", "instance", "extensions"])
def test_torch_zstandard_round_trip(fresh_host: Any, tmp_path: Path, spec: str) -> None:
    sd = _state()
    if spec == "instance":
        dcpx.save(sd, tmp_path, transforms=[ZStandard()], chunk_size=4096)
    elif spec == "extensions":
        dcp_writer = dcpx.FileSystemWriter(tmp_path, _extensions=[ZStandard()], chunk_size=4096)
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, storage_writer=dcp_writer)
    else:
        dcpx.save(sd, tmp_path, transforms=[spec], chunk_size=4096)
    out = blank(sd)
    dcpx.load(out, tmp_path)
    assert_same(out, sd)
    items = storage_items(dcpx.reader.load_metadata(str(tmp_path))[0])
    assert items["w"].transform_descriptors == ["frame@dcpx/1", "stream.zstd/1"]


def test_user_stream_extension_registers_and_round_trips(fresh_host: Any, tmp_path: Path) -> None:
    dcpx.register_plugin(_plugin_module("user_flip", BitFlip), name="user-flip")
    assert fresh_host.lookup("stream.bitflip@user").cls is BitFlip
    t = dcpx.transform("bitflip")
    assert t.get_descriptor() == "stream.bitflip@user/1"

    items = _roundtrip(tmp_path / "a", ["bitflip"], chunk_size=4096)
    assert items["w"].transform_descriptors == ["frame@dcpx/1", "stream.bitflip@user/1"]
    # the bytes on disk really were transformed
    raw = (tmp_path / "a" / items["i"].relative_path).read_bytes()
    assert np.arange(1000, dtype=np.int32).tobytes()[:64] not in raw

    items = _roundtrip(tmp_path / "b", [BitFlip(), ZStandard()], chunk_size=4096)
    assert items["w"].transform_descriptors == ["frame@dcpx/1", "stream.zstd/1", "stream.bitflip@user/1"]


def test_user_extension_instance_needs_registration_to_load(fresh_host: Any, tmp_path: Path) -> None:
    sd = _state()
    dcpx.save(sd, tmp_path, transforms=[BitFlip()])  # saving with an instance needs no plugin
    with pytest.raises(dcpx.UnknownTransformError, match="stream.bitflip@user"):
        dcpx.load(blank(sd), tmp_path)
    out = blank(sd)
    dcpx.load(out, tmp_path, transforms=[BitFlip()])  # a reader-side instance is enough
    assert_same(out, sd)


# -- real entry points --------------------------------------------------------------------------------

GOOD_PLUGIN = '''
"""A toy plugin installed as a real distribution."""
import dcpx


class ToyGood(dcpx.Transform):
    name = "stream.toygood@test"
    version = 1

    def encode(self, data, chunk):
        return bytes(data)[::-1]

    def decode(self, data, chunk, size):
        return bytes(data)[::-1]


@dcpx.hookimpl
def dcpx_register_transforms(register):
    register(ToyGood)
'''

BROKEN_PLUGIN = '''
raise RuntimeError("toy plugin refuses to import")
'''

CLASH_PLUGIN = '''
import dcpx


class ToyClash(dcpx.Transform):
    name = "stream.toygood@test"
    version = 1

    def encode(self, data, chunk):
        return bytes(data)

    def decode(self, data, chunk, size):
        return bytes(data)


@dcpx.hookimpl
def dcpx_register_transforms(register):
    register(ToyClash)
'''


def _write_project(root: Path, dist: str, ep: str, source: str) -> Path:
    pkg = dist.replace("-", "_")
    proj = root / dist
    (proj / "src" / pkg).mkdir(parents=True)
    (proj / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"
        dependencies = ["dcpx"]

        [project.entry-points.dcpx]
        {ep} = "{pkg}.plugin"

        [tool.setuptools.packages.find]
        where = ["src"]
    '''))
    (proj / "src" / pkg / "__init__.py").write_text("")
    (proj / "src" / pkg / "plugin.py").write_text(source)
    return proj


@pytest.fixture(scope="session")
def toy_dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Throwaway distributions built and installed with pip into private target folders.

    They are installed with ``--target`` rather than into the shared environment, so no
    other process ever sees a plugin that fails on purpose, and nothing needs uninstalling
    if a test dies; Python finds their entry points exactly as for site-packages.
    """
    root = tmp_path_factory.mktemp("toy-dists")
    good = _write_project(root / "src", "dcpx-toy-good", "toygood", GOOD_PLUGIN)
    broken = _write_project(root / "src", "dcpx-toy-broken", "toybroken", BROKEN_PLUGIN)
    clash = _write_project(root / "src", "dcpx-toy-clash", "toyclash", CLASH_PLUGIN)
    targets = {"main": root / "site-main", "clash": root / "site-clash"}
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    for target, projects in ((targets["main"], [good, broken]), (targets["clash"], [clash])):
        proc = subprocess.run([*pip, "--target", str(target), *map(str, projects)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return targets


@pytest.fixture
def entry_point_host(monkeypatch: pytest.MonkeyPatch, toy_dists: dict[str, Path]) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(toy_dists["main"]))
    for var in ("DCPX_DISABLE_PLUGIN_AUTOLOAD", "DCPX_LOAD_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    dcpx.plugins.reset_host()
    yield
    dcpx.plugins.reset_host()


def test_entry_points_load_and_broken_one_is_reported(entry_point_host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPX_LOAD_PLUGINS", "toygood,toybroken")
    host = dcpx.plugin_host()
    with pytest.warns(UserWarning, match="toybroken"):
        failures = host.failures()
    broken = [f for f in failures if f.name == "toybroken"]
    assert len(broken) == 1
    assert broken[0].distribution == "dcpx-toy-broken"
    assert "refuses to import" in broken[0].error
    reg = host.lookup("stream.toygood@test")
    assert reg.source == "dcpx-toy-good"
    info = {p.name: p for p in host.plugins()}["toygood"]
    assert info.distribution == "dcpx-toy-good" and info.version == "0.0.1"
    assert dcpx.transform("toygood").name == "stream.toygood@test"


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_disable_autoload(entry_point_host: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DCPX_DISABLE_PLUGIN_AUTOLOAD", value)
    host = dcpx.plugin_host()
    assert host.failures() == []
    assert [r.name for r in host.registrations()] == ["stream.zstd"]
    with pytest.raises(dcpx.UnknownTransformError):
        host.lookup("stream.toygood@test")
    # in-process plugins still count
    dcpx.register_plugin(_plugin_module("still_here", _identity_transform("stream.here@test")), name="here")
    assert host.lookup("stream.here@test")


def test_autoload_switch_off_values(entry_point_host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPX_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.setenv("DCPX_LOAD_PLUGINS", "toygood")
    assert dcpx.plugin_host().lookup("stream.toygood@test").source == "dcpx-toy-good"


@pytest.mark.parametrize("allow", ["toygood", "dcpx-toy-good", " toygood , nothing-else "])
def test_allow_list(entry_point_host: None, monkeypatch: pytest.MonkeyPatch, allow: str) -> None:
    monkeypatch.setenv("DCPX_LOAD_PLUGINS", allow)
    host = dcpx.plugin_host()
    assert host.failures() == []  # the broken plugin was never imported
    names = {r.name for r in host.registrations()}
    assert names == {"stream.zstd", "stream.toygood@test"}  # nothing else installed was loaded


def test_empty_allow_list_loads_nothing(entry_point_host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPX_LOAD_PLUGINS", "")
    host = dcpx.plugin_host()
    assert host.failures() == []
    assert [r.name for r in host.registrations()] == ["stream.zstd"]


def test_conflict_between_distributions(entry_point_host: None, monkeypatch: pytest.MonkeyPatch,
                                        toy_dists: dict[str, Path]) -> None:
    monkeypatch.syspath_prepend(str(toy_dists["clash"]))
    monkeypatch.setenv("DCPX_LOAD_PLUGINS", "toygood,toyclash")
    dcpx.plugins.reset_host()
    host = dcpx.plugin_host()
    with pytest.raises(dcpx.PluginError) as info:
        host.lookup("stream.toygood@test")
    message = str(info.value)
    assert "stream.toygood@test" in message
    assert "dcpx-toy-good" in message and "dcpx-toy-clash" in message
    # The conflict must not be forgotten after the first call: a later lookup may not
    # silently pick one of the two implementations.
    with pytest.raises(dcpx.PluginError):
        host.lookup("stream.toygood@test")


SUBPROCESS_CHECK = r'''
import json, tempfile, warnings
warnings.simplefilter("ignore")
import torch
import dcpx

host = dcpx.plugin_host()
failures = [vars(f) for f in host.failures()]
regs = {r.name: r.source for r in host.registrations()}
sd = {"t": torch.arange(100, dtype=torch.int64)}
out = {"t": torch.zeros(100, dtype=torch.int64)}
with tempfile.TemporaryDirectory() as d:
    dcpx.save(sd, d, transforms=["toygood"])
    dcpx.load(out, d)
print(json.dumps({"failures": failures, "regs": regs, "ok": bool(torch.equal(out["t"], sd["t"]))}))
'''


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCPX_")}
    env.update(extra)
    return env


def test_broken_entry_point_in_fresh_process(toy_dists: dict[str, Path]) -> None:
    env = _clean_env(PYTHONPATH=str(toy_dists["main"]))
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS_CHECK], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    broken = [f for f in result["failures"] if f["name"] == "toybroken"]
    assert broken and broken[0]["distribution"] == "dcpx-toy-broken"
    assert "refuses to import" in broken[0]["error"]
    assert result["regs"]["stream.toygood@test"] == "dcpx-toy-good"
    assert result["regs"]["stream.zstd"]  # torch's own (or an installed zstd plugin)
    assert result["ok"]

"""The plugin host: finds plugins through entry points, loads them lazily, keeps the registry.

Environment switches (read when plugins are first needed):

* ``DCPX_DISABLE_PLUGIN_AUTOLOAD=1`` - load no entry points; only in-process plugins count.
* ``DCPX_LOAD_PLUGINS=zstd,dcpx-encrypt`` - allow-list of entry-point or distribution names.
* ``DCPX_TRACE_PLUGINS=1`` - print every hook call to stderr: the hook, the plugins that
  answer it and what they return, by type only (key-provider hooks return keys).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy
from torch.distributed.checkpoint._extension import StreamTransformExtension, ZStandard

from . import hookspecs
from .descriptor import parse
from .errors import ConfigError, DescriptorError, PluginError, UnknownTransformError
from .transform import TorchStreamTransform, Transform, descriptor_name

ENTRY_POINT_GROUP = "dcpx"
TORCH = "torch"

# Where to find first-party transforms, so an unknown descriptor names what to install.
KNOWN_DISTRIBUTIONS = {
    "stream.zstd": "dcpx-zstd",
    "stream.encrypt@dcpx": "dcpx-encrypt",
    "stream.checksum@dcpx": "dcpx-checksum",
}


@dataclass(frozen=True)
class Registration:
    """One registered transform class and where it came from."""

    name: str
    cls: type
    source: str  # distribution name, "torch" for torch's built-ins, or "<in-process: x>"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    transforms: tuple[str, ...]
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class PluginFailure:
    name: str
    distribution: str | None
    error: str


class PluginHost:
    """Owns one pluggy ``PluginManager`` and the transform registry built from it."""

    def __init__(self, autoload: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._autoload = autoload
        self._loaded = False
        self._loading = False
        self._trace = False  # DCPX_TRACE_PLUGINS: hook calls are printed
        self._lock = threading.RLock()
        self._registry: dict[str, Registration] = {}
        self._plugins: dict[str, PluginInfo] = {}
        self._failures: list[PluginFailure] = []
        self._conflicts: dict[str, str] = {}
        self._add(TORCH, ZStandard)

    # -- loading ----------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # _loading: re-entered from a plugin's hook
                return
            self._loading = True
            try:
                if _truthy(os.environ.get("DCPX_TRACE_PLUGINS")):
                    self.pm.add_hookcall_monitoring(_trace_call, _trace_result)
                    self._trace = True
                if self._autoload and not _truthy(os.environ.get("DCPX_DISABLE_PLUGIN_AUTOLOAD")):
                    self._load_entry_points()
            finally:
                self._loading = False
                self._loaded = True

    def _load_entry_points(self) -> None:
        allow = _allow_list(os.environ.get("DCPX_LOAD_PLUGINS"))
        eps = sorted(
            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
            key=lambda ep: (_dist_name(ep) or "", ep.name),
        )
        for ep in eps:
            dist = _dist_name(ep)
            if allow is not None and ep.name not in allow and (dist or "") not in allow:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._fail(ep.name, dist, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}")
                continue
            self._register_plugin(plugin, ep.name, dist, _dist_version(ep))

    def _fail(self, name: str, dist: str | None, error: str) -> None:
        self._failures.append(PluginFailure(name, dist, error))
        warnings.warn(f"dcpx plugin {name!r} ({dist or 'no distribution'}) was not loaded: {error}", stacklevel=3)

    def _register_plugin(self, plugin: Any, name: str, dist: str | None, version: str | None) -> None:
        source = dist or f"<in-process: {name}>"
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self._fail(name, dist, f"registration failed: {type(exc).__name__}: {exc}")
            return
        hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
        names: list[str] = []

        def register(cls: type) -> None:
            names.append(self._add(source, cls))

        try:
            for hook_name, kwargs in (("dcpx_addhooks", {"pluginmanager": self.pm}),
                                      ("dcpx_register_transforms", {"register": register})):
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin:
                        if self._trace:
                            _trace_call(hook_name, [impl], kwargs)
                        impl.function(**kwargs)
        except Exception as exc:
            self.pm.unregister(plugin)
            for n in names:
                self._registry.pop(n, None)
            self._fail(name, dist, f"dcpx_register_transforms raised {type(exc).__name__}: {exc}")
            return
        self._plugins[name] = PluginInfo(name, dist, version, tuple(names), hooks)

    def _add(self, source: str, cls: type) -> str:
        if not (isinstance(cls, type) and issubclass(cls, StreamTransformExtension)):
            raise PluginError(f"{source} registered {cls!r}, which is not a transform class")
        name = cls.registry_name()
        parse(f"{name}/0")  # validates the name's syntax
        if issubclass(cls, Transform) and "@" not in name and name != "stream.zstd":
            raise PluginError(f"{source}: transform name {name!r} needs a domain, e.g. {name}@yourorg")
        with self._lock:
            existing = self._registry.get(name)
            if existing is not None and existing.cls is not cls and existing.source != TORCH:
                message = (
                    f"transform {name!r} is registered twice: by {existing.source} and by {source}; "
                    f"uninstall one of them or restrict loading with DCPX_LOAD_PLUGINS"
                )
                self._conflicts[name] = message  # every later lookup of the name fails too
                raise PluginError(message)
            self._registry[name] = Registration(name, cls, source)
        return name

    # -- public API -------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object in-process (notebooks, tests): same hooks as an entry point."""
        self._ensure_loaded()
        name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin):x}"
        if self.pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        with self._lock:
            self._register_plugin(plugin, name, None, None)
            failure = next((f for f in self._failures if f.name == name), None)
        if failure is not None and name not in self._plugins:
            raise PluginError(f"plugin {name!r} failed: {failure.error}")

    def unregister(self, name: str) -> None:
        with self._lock:
            info = self._plugins.pop(name, None)
            plugin = self.pm.get_plugin(name)
            if plugin is not None:
                self.pm.unregister(plugin)
            for tname in info.transforms if info else ():
                self._registry.pop(tname, None)
            if "stream.zstd" not in self._registry:
                self._add(TORCH, ZStandard)

    def registrations(self) -> list[Registration]:
        self._ensure_loaded()
        return sorted(self._registry.values(), key=lambda r: r.name)

    def plugins(self) -> list[PluginInfo]:
        self._ensure_loaded()
        return sorted(self._plugins.values(), key=lambda p: p.name)

    def failures(self) -> list[PluginFailure]:
        self._ensure_loaded()
        return list(self._failures)

    def lookup(self, name: str) -> Registration:
        self._ensure_loaded()
        if name in self._conflicts:
            raise PluginError(self._conflicts[name])
        reg = self._registry.get(name)
        if reg is None:
            raise UnknownTransformError(_unknown_message(name, self._failures))
        return reg

    def resolve_name(self, name: str) -> str:
        """Accept full names (``stream.zstd``) or shorthands (``zstd``, an entry-point name)."""
        self._ensure_loaded()
        if name in self._registry:
            return name
        candidates = [r.name for r in self._registry.values() if _short(r.name) == name]
        if name in self._plugins and len(self._plugins[name].transforms) == 1:
            candidates = list(self._plugins[name].transforms)
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ConfigError(f"transform shorthand {name!r} is ambiguous: {sorted(candidates)}")
        raise UnknownTransformError(_unknown_message(name, self._failures))

    def create(self, name: str, **params: Any) -> Transform:
        """Build a transform for saving: ``create("zstd", level=3)``."""
        reg = self.lookup(self.resolve_name(name))
        try:
            instance = reg.cls(**params)
        except TypeError as exc:
            raise ConfigError(f"transform {reg.name!r} ({reg.source}) does not accept {params}: {exc}") from exc
        return as_transform(instance)

    def from_descriptor(self, text: str) -> Transform:
        """Rebuild the transform a descriptor string describes (strictly)."""
        reg = self.lookup(descriptor_name(text))
        if issubclass(reg.cls, Transform):
            desc = parse(text)
            return reg.cls.from_params(desc.version, desc.params)
        version = text.partition("/")[2]
        try:
            return TorchStreamTransform(reg.cls.from_descriptor(version))
        except ValueError as exc:
            hint = ""
            if reg.source == TORCH and reg.name in KNOWN_DISTRIBUTIONS:
                dist = KNOWN_DISTRIBUTIONS[reg.name]
                hint = f"; this form needs the {dist!r} distribution (pip install {dist})"
            raise DescriptorError(f"{reg.name} ({reg.source}) rejected descriptor {text!r}: {exc}{hint}") from exc


def as_transform(obj: Any) -> Transform:
    """Wrap torch stream extensions; pass dcpx transforms through."""
    if isinstance(obj, Transform):
        return obj
    if isinstance(obj, StreamTransformExtension):
        return TorchStreamTransform(obj)
    raise ConfigError(f"{obj!r} is not a transform (expected dcpx.Transform or a StreamTransformExtension)")


def _short(name: str) -> str:
    base = name.partition("@")[0]
    return base[len("stream."):] if base.startswith("stream.") else base


def _unknown_message(name: str, failures: Iterable[PluginFailure]) -> str:
    msg = f"no installed plugin provides transform {name!r}"
    dist = KNOWN_DISTRIBUTIONS.get(name) or next(
        (d for n, d in KNOWN_DISTRIBUTIONS.items() if _short(n) == name), None
    )
    if dist:
        msg += f"; install the {dist!r} distribution (pip install {dist})"
    else:
        msg += "; install the plugin distribution that provides it"
    broken = [f"{f.name} ({f.error})" for f in failures]
    if broken:
        msg += f". Plugins that failed to load: {'; '.join(broken)}"
    return msg


def _trace_call(hook_name: str, impls: Any, kwargs: dict[str, Any]) -> None:
    plugins = ", ".join(getattr(i, "plugin_name", "?") for i in impls) or "no plugin"
    sys.stderr.write(f"dcpx: hook {hook_name}({', '.join(kwargs)}) -> {plugins}\n")


def _trace_result(outcome: Any, hook_name: str, impls: Any, kwargs: dict[str, Any]) -> None:
    """What a hook returned, by type: values are never printed (key providers return keys)."""
    exc = getattr(outcome, "exception", None)
    if exc is not None:
        sys.stderr.write(f"dcpx: hook {hook_name} raised {type(exc).__name__}\n")
        return
    result = outcome.get_result()
    shown = [type(r).__name__ for r in result] if isinstance(result, list) else type(result).__name__
    sys.stderr.write(f"dcpx: hook {hook_name} returned {shown}\n")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _allow_list(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def _dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _dist_version(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


_host: PluginHost | None = None
_host_lock = threading.Lock()


def host() -> PluginHost:
    """The process-wide plugin host, created on first use."""
    global _host
    with _host_lock:
        if _host is None:
            _host = PluginHost()
        return _host


def reset_host() -> None:
    """Forget all loaded plugins; the next ``host()`` re-reads entry points and environment."""
    global _host
    with _host_lock:
        _host = None

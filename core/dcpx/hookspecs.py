"""The plugin contract, on one screen.

A plugin is any module or object whose functions carry ``@dcpx.hookimpl``; a distribution
exposes it through an entry point in the group ``dcpx``.  Only hooks named here are called
by the core; a plugin may add its own hookspecs with ``dcpx_addhooks`` so that *other*
plugins can serve it (the encrypt plugin's key-provider hook works that way).
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "dcpx"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dcpx_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add a plugin's own hookspecs with ``pluginmanager.add_hookspecs(module)``.

    Called once per plugin, when the plugin is registered, before any other hook.
    """


@hookspec
def dcpx_register_transforms(register: Callable[[type], None]) -> None:
    """Register transform classes by calling ``register(TransformClass)``.

    Classes may subclass ``dcpx.Transform`` or torch's ``StreamTransformExtension``.
    Registering makes a transform *readable*; only a save's configuration makes it active.
    """


@hookspec
def dcpx_safe_globals() -> list[tuple[str, str]]:
    """Return ``(module, qualname)`` pairs that may appear in a checkpoint's ``.metadata``.

    Only needed by plugins that put their own types into DCP metadata (e.g. a custom
    planner's ``planner_data``).  Everything else is refused before any object is built.
    """


def all_hook_names() -> list[str]:
    """Names of the core hookspecs, in the order documented in ``docs/hooks.md``."""
    return [name for name, value in globals().items() if name.startswith("dcpx_") and callable(value)]


__all__: list[Any] = ["hookspec", "hookimpl", "PROJECT", "all_hook_names"]

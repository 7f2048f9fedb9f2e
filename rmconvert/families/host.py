"""The plugin host: load built-in and third-party plugins and collect their architectures."""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from ..errors import CheckpointError, PluginError, UsageError
from . import hookspecs
from .architecture import Architecture

ENTRY_POINT_GROUP = "rmconvert"
DISABLE_AUTOLOAD = "RMCONVERT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PLUGINS = (
    "rmconvert.plugins.llama",
    "rmconvert.plugins.olmo2",
    "rmconvert.plugins.olmoe",
    "rmconvert.plugins.qwen2_vl",
    "rmconvert.plugins.generic",
    "rmconvert.plugins.composite",
)


@dataclass(frozen=True)
class Registered:
    """An architecture and where it came from."""

    architecture: Architecture
    plugin: str
    distribution: str
    version: str


@dataclass
class Registry:
    """All registered architectures; resolves a checkpoint's ``model_type`` to one of them."""

    entries: dict[str, Registered] = field(default_factory=dict)
    #: (plugin name, check function) contributed through ``rmconvert_register_checks``.
    checks: list[tuple[str, Callable]] = field(default_factory=list)

    def add(self, architecture: Architecture, plugin: str, distribution: str, version: str) -> None:
        """Add one architecture; a second claim on a name or model_type fails naming both plugins."""
        if not isinstance(architecture, Architecture) or not architecture.name:
            raise PluginError(f"plugin {plugin!r} registered {architecture!r}, not a named rmconvert.Architecture")
        if architecture.name in self.entries:
            other = self.entries[architecture.name].plugin
            raise PluginError(f"plugins {other!r} and {plugin!r} both register architecture {architecture.name!r}")
        specific = [e for e in self.entries.values() if not e.architecture.fallback]
        # a catch-all shares its model_types by design (and listing them imports transformers)
        for entry in specific if not architecture.fallback else []:
            shared = set(entry.architecture.model_types) & set(architecture.model_types)
            if shared:
                raise PluginError(
                    f"plugins {entry.plugin!r} ({entry.architecture.name}) and {plugin!r} ({architecture.name})"
                    f" both claim model_type {min(shared)!r}"
                )
        self.entries[architecture.name] = Registered(architecture, plugin, distribution, version)

    def get(self, name: str) -> Registered:
        """The architecture registered as ``name`` (a usage error if there is none)."""
        if name not in self.entries:
            raise UsageError(f"unknown architecture {name!r}; installed: {', '.join(sorted(self.entries))}")
        return self.entries[name]

    def for_model_type(self, model_type: str) -> Registered | None:
        """The specific architecture claiming ``model_type``, else a fallback that claims it."""
        ordered = sorted(self.entries.values(), key=lambda e: e.architecture.fallback)
        return next((e for e in ordered if e.architecture.claims(model_type)), None)

    def resolve(self, model_type: str, arch: str = "auto", config_path=None) -> Registered:
        """The architecture for a checkpoint: by ``model_type`` or checked against ``--arch``."""
        claimant = self.for_model_type(model_type)
        if arch == "auto":
            if claimant is None:
                raise CheckpointError(
                    f"no installed plugin converts model_type {model_type!r}"
                    " (see `rmconvert plugins`; encoder and encoder-decoder models are not reward-model backbones)",
                    config_path,
                )
            return claimant
        chosen = self.get(arch)
        if not chosen.architecture.claims(model_type):
            owner = f" (architecture {claimant.architecture.name!r} converts it)" if claimant else ""
            raise CheckpointError(
                f"model_type is {model_type!r}, which --arch {arch} does not convert{owner}", config_path
            )
        return chosen


def _origin(plugin, entry_points: dict[str, metadata.Distribution]) -> tuple[str, str]:
    """(distribution, version) that installed a plugin object, or ("(in-process)", "")."""
    module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    if module.startswith("rmconvert."):
        from .. import __version__

        return "rmconvert", __version__
    dist = entry_points.get(module)
    return (dist.name, dist.version) if dist else ("(in-process)", "")


def get_plugin_manager(autoload: bool | None = None) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the built-ins and (unless disabled) entry-point plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD)
    if autoload:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must name itself, whatever it raised
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
                ) from exc
            if pm.has_plugin(ep.name) or pm.is_registered(plugin):
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) is registered twice")
            pm.register(plugin, name=ep.name)
    check_pending(pm)
    return pm


def check_pending(pm: pluggy.PluginManager) -> None:
    """Fail, naming the plugin, if any hook implementation matches no hookspec (a typo in a hook name)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)!r}: {exc}") from exc


def load_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """Call every plugin's hooks with a ``register`` bound to that plugin; collect what they register."""
    pm = pm or get_plugin_manager()
    check_pending(pm)  # plugins registered in-process after get_plugin_manager() are checked too
    distributions = {ep.module: ep.dist for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.dist}
    registry = Registry()
    for impl in pm.hook.rmconvert_register_architectures.get_hookimpls():
        dist, version = _origin(impl.plugin, distributions)
        _call(impl, lambda architecture, i=impl, d=dist, v=version: registry.add(architecture, i.plugin_name, d, v))
    for impl in pm.hook.rmconvert_register_checks.get_hookimpls():
        _call(impl, lambda check, i=impl: registry.checks.append((i.plugin_name, check)))
    return registry


def _call(impl, register: Callable) -> None:
    """Run one plugin's hook implementation; anything it raises becomes a PluginError naming it."""
    try:
        impl.function(register=register)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {impl.plugin_name!r} failed to register: {type(exc).__name__}: {exc}") from exc

"""The plugin manager and the registry of implementations it builds.

:func:`build_registry` makes a :class:`pluggy.PluginManager`, registers the built-in plugin
(:mod:`dsv4.builtin`, always), then the third-party plugins of the ``dsv4`` entry-point group, and
folds what their hooks return into a :class:`Registry`: per kind (``"attention_backend"``, ...), a
``name → class`` map. Classes are checked against their Protocol when they are registered, so a broken
plugin fails at start-up with its name on the error, not in the middle of a request.

The environment variable ``DSV4_PLUGINS`` is an allow-list of entry-point names (comma-separated):
unset loads every installed plugin, an empty string loads none; built-ins are loaded regardless.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from loguru import logger

from dsv4.core import hookspecs
from dsv4.core.interfaces import INTERFACES, STEP_MODES, StepMode

if typing.TYPE_CHECKING:
    import torch

    from dsv4.core.config import ModelConfig

__all__ = [
    "ALLOW_LIST_ENV",
    "ENTRY_POINT_GROUP",
    "AUTO",
    "PluginChoice",
    "PluginError",
    "PluginInfo",
    "Provider",
    "Registry",
    "build_registry",
    "choose_plugins",
    "get_registry",
    "reset_registry",
]

ENTRY_POINT_GROUP = "dsv4"
ALLOW_LIST_ENV = "DSV4_PLUGINS"
# Named, not imported: core sits below the components the built-ins name, and reaches them only here.
BUILTIN_PLUGIN = "dsv4.builtin"


class PluginError(Exception):
    """A plugin could not be loaded, registered or selected; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Provider:
    """Where a plugin comes from: its registered name and the distribution that installed it."""

    plugin: str
    distribution: str | None = None  # None: registered in-process, not installed
    version: str | None = None

    def __str__(self) -> str:
        if self.distribution is None:
            return f"plugin {self.plugin!r}"
        return f"plugin {self.plugin!r} ({self.distribution} {self.version})"


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One loaded plugin and the names it provides per kind (for ``dsv4 plugins``)."""

    name: str
    distribution: str | None
    version: str | None
    provides: Mapping[str, tuple[str, ...]]  # kind -> names, kinds with nothing left out


class Registry:
    """Implementations by kind and name, each with the plugin that provided it.

    Built once by :func:`build_registry`; read-only afterwards.
    """

    def __init__(self, plugins: Sequence[Provider]) -> None:
        self._plugins = tuple(plugins)
        self._classes: dict[str, dict[str, type[Any]]] = {kind: {} for kind in INTERFACES}
        self._providers: dict[tuple[str, str], Provider] = {}

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager, providers: Mapping[str, Provider]) -> Registry:
        """Call every registration hook of every plugin in ``pm`` and validate what it returns."""
        registry = cls([providers[name] for name, _ in pm.list_name_plugin()])
        for hook_name, kind in hookspecs.REGISTRATION_HOOKS.items():
            # Each implementation is called on its own, not through pm.hook, so every class can be
            # traced to the plugin that returned it. get_hookimpls() is in registration order.
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                provider = providers[impl.plugin_name]
                try:
                    classes = impl.function()
                except Exception as exc:
                    raise PluginError(f"{provider} failed in {hook_name}(): {type(exc).__name__}: {exc}") from exc
                if not isinstance(classes, list | tuple):
                    raise PluginError(f"{provider}: {hook_name}() must return a list of classes, got {classes!r}")
                for impl_cls in classes:
                    registry._add(kind, impl_cls, provider)
        return registry

    def _add(self, kind: str, cls: Any, provider: Provider) -> None:
        problem = _contract_problem(kind, cls)
        if problem is not None:
            raise PluginError(f"{provider} registers an invalid {kind} {_qualname(cls)}: {problem}")
        existing = self._classes[kind].get(cls.name)
        if existing is not None:
            raise PluginError(
                f"{kind} name {cls.name!r} is registered twice: by {self._providers[kind, cls.name]} "
                f"({_qualname(existing)}) and by {provider} ({_qualname(cls)})"
            )
        self._classes[kind][cls.name] = cls
        self._providers[kind, cls.name] = provider

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, in registration order (built-ins first)."""
        return list(self._of(kind))

    def get(self, kind: str, name: str) -> type[Any]:
        """The class registered as ``name``; an unknown name lists the available ones."""
        classes = self._of(kind)
        if name not in classes:
            available = ", ".join(map(repr, classes)) or "none"
            raise PluginError(f"unknown {kind} {name!r}; available: {available}")
        return classes[name]

    def provider(self, kind: str, name: str) -> Provider:
        """The plugin that registered ``name``."""
        self.get(kind, name)
        return self._providers[kind, name]

    def select(self, kind: str, name: str, *refuse_args: Any) -> type[Any]:
        """The class ``name``, provided its ``refuse(*refuse_args)`` accepts the configuration."""
        cls = self.get(kind, name)
        reason = cls.refuse(*refuse_args)
        if reason is not None:
            raise PluginError(f"{kind} {name!r} cannot serve this configuration: {reason}")
        return cls

    def first_available(self, kind: str, *refuse_args: Any, prefer: Sequence[str] = ()) -> type[Any]:
        """The first class, ``prefer`` order then registration order, that does not refuse."""
        classes = self._of(kind)
        reasons: list[str] = []
        for name in dict.fromkeys([*prefer, *classes]):  # ordered and without repeats
            if name not in classes:
                reasons.append(f"{name!r}: not installed")
                continue
            reason = classes[name].refuse(*refuse_args)
            if reason is None:
                return classes[name]
            reasons.append(f"{name!r}: {reason}")
        raise PluginError(f"no {kind} can serve this configuration: " + ("; ".join(reasons) or "none is registered"))

    def describe(self) -> list[PluginInfo]:
        """Every loaded plugin, in load order, with what it provides."""
        provides: dict[Provider, dict[str, list[str]]] = {p: {} for p in self._plugins}
        for (kind, name), provider in self._providers.items():
            provides[provider].setdefault(kind, []).append(name)
        return [
            PluginInfo(p.plugin, p.distribution, p.version, {k: tuple(v) for k, v in provides[p].items()})
            for p in self._plugins
        ]

    def _of(self, kind: str) -> dict[str, type[Any]]:
        if kind not in self._classes:
            raise PluginError(f"unknown kind {kind!r}; kinds: {', '.join(self._classes)}")
        return self._classes[kind]


def build_registry(
    extra_plugins: Iterable[object] = (), *, load_entry_points: bool = True, builtins: bool = True
) -> Registry:
    """Load the built-ins, ``extra_plugins`` (objects with ``@hookimpl`` functions) and the installed
    entry points (subject to ``DSV4_PLUGINS``), and fold their hooks into a new :class:`Registry`.

    ``builtins=False`` is for testing a plugin on its own.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, Provider] = {}

    def register(plugin: object, provider: Provider) -> None:
        if pm.has_plugin(provider.plugin):
            first = providers[provider.plugin]
            raise PluginError(f"plugin name {provider.plugin!r} is used twice: by {first} and by {provider}")
        try:
            pm.register(plugin, name=provider.plugin)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"{provider} cannot be registered: {exc}") from exc
        providers[provider.plugin] = provider

    if builtins:
        register(importlib.import_module(BUILTIN_PLUGIN), Provider("builtin", "dsv4", _dsv4_version()))
    for plugin in extra_plugins:
        register(plugin, Provider(getattr(plugin, "__name__", type(plugin).__name__)))
    if load_entry_points:
        for ep in _selected(_entry_points()):
            provider = Provider(ep.name, *_distribution(ep))
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"{provider} failed to import ({ep.value}): {type(exc).__name__}: {exc}; "
                    f"uninstall it or leave it out of {ALLOW_LIST_ENV}"
                ) from exc
            register(plugin, provider)
    try:
        # A hookimpl whose name matches no hook (a typo) would otherwise be silently ignored.
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{providers[pm.get_name(exc.plugin) or '']}: {exc}") from exc
    return Registry.from_plugin_manager(pm, providers)


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry, built on first use (a cache: call :func:`reset_registry` to rebuild)."""
    return build_registry()


def reset_registry() -> None:
    """Forget the cached registry, so the next :func:`get_registry` reloads plugins."""
    get_registry.cache_clear()


# ------------------------------------------------------------------------------------------------ "auto"
AUTO = "auto"
# Built-in PyTorch implementations that "auto" may swap on a model passed in (other plugins it keeps).
def _built_in(reg: Registry, kind: str, name: str) -> bool:
    """Whether ``name`` is one of dsv4's own implementations (what ``"auto"`` may swap for another)."""
    try:
        return reg.provider(kind, name).plugin == "builtin"
    except PluginError:
        return False


@dataclass(frozen=True, slots=True)
class PluginChoice:
    """The plugins a model runs with, by registry name: attention backend, expert executor and the
    kernel set of each step mode."""

    attention_backend: str
    expert_executor: str
    kernels: Mapping[StepMode, str]


def choose_plugins(
    config: ModelConfig,
    device: torch.device,
    *,
    attention_backend: str = AUTO,
    expert_executor: str = AUTO,
    kernels: str = AUTO,
    native_kernels: bool = True,
    packed_weights: bool = True,
    batch_invariant: bool = False,
    current: PluginChoice | None = None,
    registry: Registry | None = None,
) -> PluginChoice:
    """Resolve the plugin names of a model, ``"auto"`` included: the one place dsv4 decides what runs.

    ``"auto"`` means, for each kind, the first implementation that does not refuse of (*installed*: the
    third-party plugins' implementations, such as a GPU plugin's, in registration order):

    - attention backend: ``cpu`` (native decode kernels; only with ``native_kernels`` and not
      ``batch_invariant``), installed ones (not ``batch_invariant``), ``reference``;
    - expert executor: ``reference`` when ``batch_invariant``; else ``cpu`` (with ``native_kernels``),
      installed ones, ``grouped``;
    - kernel sets: for autograd steps installed ones, ``reference``; for batch-invariant ones
      ``batch_invariant``; for inference ``cpu`` (with ``native_kernels`` or ``packed_weights``), installed
      ones, ``reference``.

    A named kernel set computes every mode it declares; the other modes get the ``"auto"`` choice.
    ``current`` holds the plugins of a model passed in: under ``"auto"`` it keeps any that is not one
    of dsv4's own (a third party's), and swaps dsv4's own for the auto choice (a model an engine ran with
    the native ``cpu`` plugins can then serve a batch-invariant engine). A named plugin that refuses the configuration raises
    :class:`PluginError` with its reason.
    """
    reg = registry or get_registry()

    def pick(kind: str, name: str, prefer: Sequence[str], held: str | None, *args: Any) -> str:
        if name != AUTO:
            return str(reg.select(kind, name, config, device, *args).name)
        if held is not None and not _built_in(reg, kind, held):
            return held
        return str(reg.first_available(kind, config, device, *args, prefer=prefer).name)

    def installed(kind: str) -> tuple[str, ...]:
        """Third-party implementations (a hardware plugin's), tried before the built-in PyTorch ones."""
        return tuple(n for n in reg.names(kind) if reg.provider(kind, n).plugin != "builtin")

    native = native_kernels and not batch_invariant
    backend = pick("attention_backend", attention_backend,
                   ("cpu",) * native + installed("attention_backend") * (not batch_invariant) + ("reference",),
                   current.attention_backend if current else None)
    executor_order = (("reference",) if batch_invariant
                      else ("cpu",) * native + installed("expert_executor") + ("grouped",))
    executor = pick("expert_executor", expert_executor, executor_order,
                    current.expert_executor if current else None)
    third_party = installed("kernel_set")
    auto_kernels: dict[StepMode, tuple[str, ...]] = {
        "autograd": third_party + ("reference",),
        "inference": ("cpu",) * (native_kernels or packed_weights) + third_party + ("reference",),
        "batch_invariant": ("batch_invariant",),
    }
    named = None if kernels == AUTO else reg.get("kernel_set", kernels)
    chosen: dict[StepMode, str] = {}
    for mode in STEP_MODES:
        if named is not None and mode in named.capabilities:
            chosen[mode] = pick("kernel_set", kernels, (), None, mode)
        else:
            chosen[mode] = pick("kernel_set", AUTO, auto_kernels[mode], current.kernels[mode] if current else None,
                                mode)
    if named is not None and not any(m in named.capabilities for m in STEP_MODES):
        raise PluginError(f"kernel set {kernels!r} declares no step mode ({', '.join(STEP_MODES)}) it computes")
    return PluginChoice(backend, executor, chosen)


def _entry_points() -> list[EntryPoint]:
    """The installed entry points of the ``dsv4`` group (the one seam tests replace)."""
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _selected(eps: Sequence[EntryPoint]) -> list[EntryPoint]:
    """``eps`` filtered by the ``DSV4_PLUGINS`` allow-list; allowed names not installed are logged."""
    raw = os.environ.get(ALLOW_LIST_ENV)
    if raw is None:
        return list(eps)
    allowed = {name.strip() for name in raw.split(",") if name.strip()}
    missing = allowed - {ep.name for ep in eps} - {"builtin"}
    if missing:
        logger.warning(f"{ALLOW_LIST_ENV} names plugins that are not installed: {', '.join(sorted(missing))}")
    return [ep for ep in eps if ep.name in allowed]


def _distribution(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = ep.dist
    return (dist.name, dist.version) if dist is not None else (None, None)


def _dsv4_version() -> str | None:
    try:
        return importlib.metadata.version("dsv4")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return None


@functools.cache
def _protocol_methods(kind: str) -> tuple[str, ...]:
    """Public methods ``kind``'s Protocol declares, itself and its Protocol bases (``typing`` has no
    public API for this before 3.12's ``__protocol_attrs__``)."""
    names: dict[str, None] = {}
    for base in INTERFACES[kind].__mro__:
        if base in (object, typing.Protocol, typing.Generic):
            continue
        for attr, value in vars(base).items():
            is_method = inspect.isfunction(value) or isinstance(value, classmethod | staticmethod)
            if is_method and not attr.startswith("_"):
                names[attr] = None
    return tuple(names)


def _contract_problem(kind: str, cls: Any) -> str | None:
    """Why ``cls`` cannot be registered as ``kind`` (checked on the class, never instantiated)."""
    if not isinstance(cls, type):
        return "not a class"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        return f"`name` must be a non-empty str, got {name!r}"
    capabilities = getattr(cls, "capabilities", None)
    if not isinstance(capabilities, frozenset) or not all(isinstance(c, str) for c in capabilities):
        return f"`capabilities` must be a frozenset of str, got {capabilities!r}"
    missing = [m for m in _protocol_methods(kind) if not callable(getattr(cls, m, None))]
    if missing:
        return f"missing {INTERFACES[kind].__name__} method(s): {', '.join(missing)}"
    return None


def _qualname(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)

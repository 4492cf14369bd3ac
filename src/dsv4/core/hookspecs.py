# mypy: disable-error-code="empty-body"
# (hook specifications declare a signature and a docstring; pluggy never calls their bodies)
"""The hooks a dsv4 plugin implements.

A plugin is a module (found through the ``dsv4`` entry-point group, or :mod:`dsv4.builtin`) with
functions marked ``@hookimpl`` whose names are hooks below. Every hook *registers classes*: it returns
a list of implementations of one :mod:`dsv4.core.interfaces` Protocol, and the host folds them into a
registry by their ``name``. Hooks run once, when the registry is built, never on a hot path::

    from dsv4.core.hookspecs import hookimpl

    @hookimpl
    def register_attention_backends():
        from my_package.attention import MyBackend  # lazy: keep plugin import cheap
        return [MyBackend]
"""

from __future__ import annotations

from typing import Any

import pluggy

__all__ = ["REGISTRATION_HOOKS", "hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("dsv4")
hookimpl = pluggy.HookimplMarker("dsv4")

#: Each hook by the registry kind (a key of :data:`dsv4.core.interfaces.INTERFACES`) it fills.
REGISTRATION_HOOKS: dict[str, str] = {
    "register_attention_backends": "attention_backend",
    "register_kv_pools": "kv_pool",
    "register_expert_executors": "expert_executor",
    "register_verifiers": "verifier",
    "register_schedulers": "scheduler",
    "register_kernel_sets": "kernel_set",
}


@hookspec
def register_attention_backends() -> list[type[Any]]:
    """Return :class:`~dsv4.core.interfaces.AttentionBackend` classes to register by their ``name``."""


@hookspec
def register_kv_pools() -> list[type[Any]]:
    """Return :class:`~dsv4.core.interfaces.KVPool` classes to register by their ``name``."""


@hookspec
def register_expert_executors() -> list[type[Any]]:
    """Return :class:`~dsv4.core.interfaces.ExpertExecutor` classes to register by their ``name``."""


@hookspec
def register_verifiers() -> list[type[Any]]:
    """Return :class:`~dsv4.core.interfaces.Verifier` classes to register by their ``name``."""


@hookspec
def register_schedulers() -> list[type[Any]]:
    """Return :class:`~dsv4.core.interfaces.Scheduler` classes to register by their ``name``."""


@hookspec
def register_kernel_sets() -> list[type[Any]]:
    """Return :class:`~dsv4.core.interfaces.KernelSet` classes to register by their ``name``."""

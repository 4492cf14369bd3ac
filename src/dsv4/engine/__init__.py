"""The inference engine: continuous batching over the paged KV pool, sampling, streaming."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv4.engine.async_engine import AsyncEngine, QueueFullError
    from dsv4.engine.config import EngineConfig
    from dsv4.engine.engine import Engine
    from dsv4.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from dsv4.engine.sampling import SamplingParams

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "Logprob",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
]

_WHERE = {
    "AsyncEngine": "async_engine",
    "QueueFullError": "async_engine",
    "Engine": "engine",
    "EngineConfig": "config",
    "CompletionOutput": "outputs",
    "Logprob": "outputs",
    "RequestOutput": "outputs",
    "SamplingParams": "sampling",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that the scheduler plugin (dsv4.engine.scheduler) imports without the whole engine.
    if name in _WHERE:
        return getattr(importlib.import_module(f"dsv4.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'dsv4.engine' has no attribute {name!r}")

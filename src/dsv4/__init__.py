"""dsv4: DeepSeek-V4 in modular PyTorch — model, inference engine, verified RL — extended by plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dsv4.core.batch import ForwardBatch
    from dsv4.engine import AsyncEngine, Engine, SamplingParams
    from dsv4.core.config import ModelConfig
    from dsv4.core.runtime import tune_allocator
    from dsv4.model import Transformer, build_model, load_model, save_model

__all__ = ["AsyncEngine", "Engine", "ForwardBatch", "ModelConfig", "SamplingParams", "Transformer", "__version__", "build_model", "load_model", "save_model", "tune_allocator"]

_LAZY = {
    "AsyncEngine": "dsv4.engine",
    "Engine": "dsv4.engine",
    "SamplingParams": "dsv4.engine",
    "ForwardBatch": "dsv4.core.batch",
    "ModelConfig": "dsv4.core.config",
    "Transformer": "dsv4.model",
    "build_model": "dsv4.model",
    "load_model": "dsv4.model",
    "save_model": "dsv4.model",
    "tune_allocator": "dsv4.core.runtime",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import dsv4` (and plugin discovery) must stay cheap; torch loads on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")

"""``load_model``: config.json + safetensors -> a ready :class:`~dsv4.model.transformer.Transformer`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from loguru import logger

from dsv4.checkpoint.io import check_tensors, read_checkpoint, save_checkpoint
from dsv4.core.config import ModelConfig
from dsv4.core.plugins import get_registry
from dsv4.model.transformer import Transformer

__all__ = ["build_model", "load_model", "save_model"]


def build_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attention_backend: str = "reference",
    expert_executor: str = "reference",
    fake_quant: bool = False,
    init: bool = True,
    seed: int = 0,
) -> Transformer:
    """A model for ``config`` with the named plugins; randomly initialised (seeded) when ``init``.

    ``"auto"`` takes the native-kernel ``"cpu"`` plugins where they serve the configuration (a CPU
    device, kernels built), else the ``"reference"`` attention backend and the ``"grouped"`` executor.
    """
    dev = torch.device(device)
    registry = get_registry()
    if attention_backend == "auto":
        backend_cls = registry.first_available("attention_backend", config, dev, prefer=("cpu", "reference"))
    else:
        backend_cls = registry.select("attention_backend", attention_backend, config, dev)
    backend = backend_cls(config, dev)
    if expert_executor == "auto":
        executor_cls = registry.first_available("expert_executor", config, dev, prefer=("cpu", "grouped"))
    else:
        executor_cls = registry.select("expert_executor", expert_executor, config, dev)
    executor = executor_cls(config, dev)
    with torch.device("meta"):
        model = Transformer(config, attention_backend=backend, expert_executor=executor, fake_quant=fake_quant)
    model.to_empty(device=dev)
    model._rope_buffers()
    if init:
        model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.to(dtype=dtype) if dtype != torch.float32 else model


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attention_backend: str = "reference",
    expert_executor: str = "reference",
    fake_quant: bool = False,
) -> Transformer:
    """Load a DeepSeek-V4 checkpoint directory (official or transformers naming, FP8/FP4 or not).

    Returns the model in eval mode; ``model(input_ids [B, S])`` gives logits ``[B, S, vocab]`` and
    ``model.mtp`` holds the MTP block(s) when the checkpoint has ``mtp.*`` tensors. A checkpoint that
    does not match its config raises :class:`~dsv4.checkpoint.io.CheckpointError` naming every
    missing, unexpected or mis-shaped tensor.
    """
    config = ModelConfig.from_pretrained(Path(path))
    tensors = read_checkpoint(path, dtype=dtype)
    if config.num_nextn_predict_layers and not any(name.startswith("mtp.") for name in tensors):
        # transformers' save_pretrained drops the MTP block but keeps num_nextn_predict_layers.
        logger.warning("{}: config declares {} MTP block(s) but the checkpoint has no mtp.* tensors; "
                       "loading without MTP", path, config.num_nextn_predict_layers)
        config = config.model_copy(update={"num_nextn_predict_layers": 0})
    model = build_model(
        config, dtype=dtype, device=device, attention_backend=attention_backend,
        expert_executor=expert_executor, fake_quant=fake_quant, init=False,
    )
    check_tensors(model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def save_model(
    model: Transformer, path: str | os.PathLike[str], *, layout: Literal["transformers", "official"] = "transformers"
) -> None:
    """Atomically save ``model`` (config.json + safetensors) in a layout :func:`load_model` and
    transformers' ``DeepseekV4ForCausalLM.from_pretrained`` both read."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_checkpoint(state, model.config, Path(path), layout=layout)

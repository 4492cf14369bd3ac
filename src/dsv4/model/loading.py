"""``load_model``: config.json + safetensors -> a ready :class:`~dsv4.model.transformer.Transformer`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger

from dsv4.checkpoint.io import check_tensors, read_checkpoint, save_checkpoint
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import AttentionBackend, ExpertExecutor
from dsv4.core.numerics import KernelChoice
from dsv4.core.plugins import PluginChoice, choose_plugins, get_registry
from dsv4.model.transformer import Transformer

__all__ = ["build_model", "build_plugins", "load_model", "save_model"]

_REFERENCE = PluginChoice("reference", "reference", {"autograd": "reference", "inference": "reference",
                                                     "batch_invariant": "batch_invariant"})


def build_plugins(
    config: ModelConfig,
    device: torch.device,
    choice: PluginChoice = _REFERENCE,
    options: Mapping[str, Any] | None = None,
) -> tuple[AttentionBackend, ExpertExecutor, KernelChoice]:
    """The attention backend, expert executor and per-mode kernel sets named by ``choice`` (default: the
    PyTorch reference implementations), built for ``config`` on ``device``; ``options`` reach the
    kernel sets (e.g. ``native_kernels``, ``packed_weights``)."""
    registry = get_registry()
    backend = registry.select("attention_backend", choice.attention_backend, config, device)(config, device)
    executor = registry.select("expert_executor", choice.expert_executor, config, device)(config, device)
    sets = {mode: registry.select("kernel_set", name, config, device, mode)(config, device, mode, options=options)
            for mode, name in choice.kernels.items()}
    return backend, executor, KernelChoice(sets["autograd"], sets["inference"], sets["batch_invariant"])


def build_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attention_backend: str = "reference",
    expert_executor: str = "reference",
    kernels: str = "reference",
    kernel_options: Mapping[str, Any] | None = None,
    fake_quant: bool = False,
    init: bool = True,
    seed: int = 0,
) -> Transformer:
    """A model for ``config`` with the named plugins; randomly initialised (seeded) when ``init``.

    ``"auto"`` takes what :func:`dsv4.core.plugins.choose_plugins` picks (the native-kernel ``"cpu"``
    plugins where they serve the configuration, else PyTorch ones); ``kernels`` names the kernel set
    (for every step mode it computes) and ``kernel_options`` are the settings kernel sets read
    (``native_kernels``, ``packed_weights``).
    """
    dev = torch.device(device)
    opts = dict(kernel_options or {})
    choice = choose_plugins(
        config, dev, attention_backend=attention_backend, expert_executor=expert_executor, kernels=kernels,
        native_kernels=opts.get("native_kernels", True), packed_weights=opts.get("packed_weights", True),
    )
    backend, executor, kernel_sets = build_plugins(config, dev, choice, opts)
    with torch.device("meta"):
        model = Transformer(config, attention_backend=backend, expert_executor=executor, kernels=kernel_sets,
                            fake_quant=fake_quant)
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
    kernels: str = "reference",
    kernel_options: Mapping[str, Any] | None = None,
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
        config, dtype=dtype, device=device, attention_backend=attention_backend, expert_executor=expert_executor,
        kernels=kernels, kernel_options=kernel_options, fake_quant=fake_quant, init=False,
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

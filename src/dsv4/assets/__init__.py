"""The bundled default model that ``dsv4 serve`` runs when no ``--model`` is given.

``default/`` inside this package is the addition recipe's result: a 3M-parameter DeepSeek-V4 trained
from scratch by ``dsv4 train`` (SFT to an accuracy band, then GRPO with the numeric verifier) that
completes ``"123+456="`` with ``"579"`` and end-of-sequence. It is a normal checkpoint directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template that makes
the last user message the prompt). The README gives the command that reproduces it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL_NAME", "default_model_dir"]

DEFAULT_MODEL_NAME = "dsv4-default"
REPRODUCE = "OMP_NUM_THREADS=1 dsv4 train --recipe addition --output runs/addition export_dir=src/dsv4/assets/default"


def default_model_dir() -> Path:
    """The bundled default model's checkpoint directory."""
    path = Path(__file__).parent / "default"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the bundled default model is missing from {path} (an incomplete install?); reinstall dsv4, "
            f"pass --model DIR, or recreate it from a source checkout with: {REPRODUCE}"
        )
    return path

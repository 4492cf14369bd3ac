"""The GPU suite: the model, the engine, ``dsv4 serve`` and RL steps on CUDA, each against the same on the CPU.

Every test under this directory is skipped, with the reason, where torch sees no CUDA device (a
``skipif`` mark added to each of them at collection, so a module added here later is covered too).
Run it on a GPU machine with ``python -m pytest -q tests/gpu``.

Test modules cannot import this file (``--import-mode=importlib``), so what they share are fixtures:
``checkpoint`` (a tiny random DeepSeek-V4 checkpoint with a 512-id byte tokenizer) and ``prompts``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.core.config import ModelConfig
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_byte_tokenizer

VOCAB = 512
NO_CUDA = not torch.cuda.is_available()
REASON = (f"needs a CUDA device: torch.cuda.is_available() is False "
          f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``skipif`` no CUDA device (the hook sees the whole session's items)."""
    here = Path(__file__).parent
    skip = pytest.mark.skipif(NO_CUDA, reason=REASON)
    for item in items:
        if here in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ModelConfig.tiny()`` (window 8, ratio-4 and ratio-8 compressed layers, hash and learned routing, one
    MTP block) with random weights, saved with a byte tokenizer; the directory name is the model id."""
    path = tmp_path_factory.mktemp("gpu") / "tiny-dsv4"
    path.mkdir()
    dsv4.save_model(random_model(ModelConfig.tiny(vocab_size=VOCAB), seed=5), path)
    write_byte_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Token-id prompts that cross every path: a dense prefill block (32 new tokens or more), short gathered
    ones, and two with a 20-token common start (prefilled once, its cache forked to both)."""
    ids = torch.randint(3, VOCAB, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    start = ids[40:60]
    return [ids[:40], ids[60:69], start + ids[69:72], start + ids[72:74]]

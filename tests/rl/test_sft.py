"""The SFT trainer's learning-rate schedule: warm-up, constant / cosine, a function of the step alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dsv4.core.config import ModelConfig
from dsv4.model import build_model
from dsv4.rl.sft import SFTConfig, SFTTrainer
from dsv4.rl.tasks import ALPHABET, AdditionTask
from dsv4.testing.tokenizers import write_char_tokenizer

TINY = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, head_dim=32, qk_rope_head_dim=16,
            moe_intermediate_size=32, layer_types=["sliding_attention"], mlp_layer_types=["moe"],
            max_position_embeddings=32, num_nextn_predict_layers=0)


def _trainer(tmp_path: Path, **cfg: object) -> SFTTrainer:
    model = build_model(ModelConfig.tiny(**TINY), seed=0)
    model.init_weights(std=0.02)
    tokenizer = write_char_tokenizer(tmp_path, ALPHABET)
    return SFTTrainer(model, tokenizer, lambda n, salt: AdditionTask(1, seed=salt).sample(n),
                      SFTConfig.model_validate(cfg))


def test_constant_with_warmup(tmp_path: Path) -> None:
    t = _trainer(tmp_path, lr=1e-3, warmup_steps=4, max_steps=10)
    assert [t.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_cosine(tmp_path: Path) -> None:
    t = _trainer(tmp_path, lr=1e-3, warmup_steps=2, max_steps=12, schedule="cosine", min_lr_ratio=0.1)
    assert t.lr_at(2) == pytest.approx(1e-3)  # the peak right after warm-up
    assert t.lr_at(7) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert t.lr_at(12) == pytest.approx(1e-4) and t.lr_at(50) == pytest.approx(1e-4)  # floor past the end
    lrs = [t.lr_at(s) for s in range(2, 13)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_step_applies_the_schedule(tmp_path: Path) -> None:
    t = _trainer(tmp_path, lr=1e-3, warmup_steps=4, max_steps=8, batch_size=4)
    metrics = t.step(1)
    assert metrics["lr"] == pytest.approx(5e-4)
    assert all(g["lr"] == pytest.approx(5e-4) for g in t.optimizer.param_groups)

"""Training with the policy on CUDA: one GRPO step and one SFT step give the CPU's rollouts, losses and
gradient norms (within 1e-4), and true on-policy GRPO stays exact (rollout/trainer logprob difference 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import VerifyResult, VerifySample
from dsv4.engine.engine import Engine, EngineConfig
from dsv4.rl.grpo import GRPOConfig, GRPOTrainer
from dsv4.rl.policy import clone_model, weights_checksum
from dsv4.rl.sft import SFTConfig, SFTTrainer
from dsv4.rl.tasks import ALPHABET, AdditionTask
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_char_tokenizer

TOL = 1e-4
# tests/rl/test_grpo.py's model: sliding, compressed sparse (indexer) and heavily compressed attention;
# hash and learned routing
MODEL: dict[str, Any] = dict(
    vocab_size=16, hidden_size=64, num_hidden_layers=3, head_dim=32, qk_rope_head_dim=16, index_head_dim=32,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"], max_position_embeddings=64, num_nextn_predict_layers=0,
)
# every optional path of a step that stays before the first optimizer update (after it, Adam's first step,
# lr · sign(g), makes the devices' weights differ wherever a gradient is ~0)
EVERY_PATH: dict[str, Any] = dict(kl_coef=0.1, micro_batch_groups=2, overlong_buffer=2, dynamic_sampling=True,
                                  seq_balance_loss_coef=1e-4, bias_update_speed=1e-3)


class _FirstDigitVerifier:
    """Rewards completions that start with a digit below 5 (a random model's are right half the time)."""

    name = "first-digit"
    capabilities = frozenset({"async"})

    @classmethod
    def refuse(cls, options: object) -> None:
        return None

    async def verify(self, samples: list[VerifySample]) -> list[VerifyResult]:
        ok = [s.completion[:1] in "01234" and s.completion[:1] != "" for s in samples]
        return [VerifyResult(reward=float(o), correct=o) for o in ok]


def _grpo(tmp: Path, device: str, *, true_on_policy: bool = False, **grpo: Any) -> GRPOTrainer:
    tokenizer = write_char_tokenizer(tmp / device, ALPHABET)
    policy = random_model(ModelConfig.tiny(**MODEL), seed=0).to(device)
    engine = Engine(clone_model(policy), tokenizer=tokenizer,
                    config=EngineConfig(device=device, max_model_len=32, max_num_seqs=256, max_num_batched_tokens=4096,
                                        return_token_logprobs=True, record_routing=True, batch_invariant=true_on_policy,
                                        expert_executor="reference", native_kernels=False, packed_weights=False))
    grpo = {"dynamic_sampling": False, **grpo}
    cfg = GRPOConfig(prompts_per_step=6, group_size=4, max_new_tokens=4, true_on_policy=true_on_policy, lr=1e-2,
                     **grpo)
    return GRPOTrainer(policy, engine, _FirstDigitVerifier(),  # type: ignore[arg-type]
                       lambda n, salt: AdditionTask(1, seed=salt).sample(n), cfg, seed=0)


@pytest.mark.parametrize("options", [{}, EVERY_PATH], ids=["default", "every-path"])
def test_one_grpo_step_matches_the_cpu(tmp_path: Path, options: dict[str, Any]) -> None:
    cpu, gpu = _grpo(tmp_path, "cpu", **options), _grpo(tmp_path, "cuda", **options)
    assert gpu.policy.embed.weight.is_cuda and gpu.engine.model.embed.weight.is_cuda
    want, got = cpu.step(0), gpu.step(0)
    assert got["grad_norm"] > 0  # type: ignore[operator]
    assert gpu.checksum == weights_checksum(gpu.policy) == weights_checksum(gpu.engine.model)
    assert got["rollout_vs_train_logprob_abs_diff_max"] < TOL  # type: ignore[operator]
    for exact in ("reward_mean", "sampled", "dropped_groups", "completion_tokens", "moe/load"):
        assert got.get(exact) == want.get(exact), exact
    for close in ("loss", "policy_ratio_mean", "policy_approx_kl", "policy_kl_ref", "policy_seq_balance_loss"):
        if close in want:
            assert abs(got[close] - want[close]) <= TOL, close  # type: ignore[operator]
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=TOL)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_true_on_policy_grpo_is_exact_on_cuda(tmp_path: Path, share_prompt: bool) -> None:
    trainer = _grpo(tmp_path, "cuda", true_on_policy=True, share_prompt=share_prompt)
    for step in range(2):  # also after an update has been synced into the engine
        metrics = trainer.step(step)
        assert metrics["rollout_vs_train_logprob_abs_diff_max"] == 0.0
        assert metrics["policy_ratio_mean"] == 1.0


def test_one_sft_step_matches_the_cpu(tmp_path: Path) -> None:
    """Main and MTP heads, the indexer objective, the balance loss and the bias update, on each device."""
    results = []
    for device in ("cpu", "cuda"):
        policy = random_model(ModelConfig.tiny(**{**MODEL, "num_nextn_predict_layers": 1}), seed=0).to(device)
        trainer = SFTTrainer(policy, write_char_tokenizer(tmp_path / device, ALPHABET),
                             lambda n, salt: AdditionTask(1, seed=salt).sample(n),
                             SFTConfig(batch_size=8, seq_balance_loss_coef=1e-4, bias_update_speed=1e-3))
        results.append(trainer.step(0))
    want, got = results
    for name in ("loss", "lm_loss", "mtp_loss", "indexer_kl", "seq_balance_loss"):
        assert abs(got[name] - want[name]) <= TOL, name  # type: ignore[operator]
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=TOL)
    assert got["moe/load"] == want["moe/load"]

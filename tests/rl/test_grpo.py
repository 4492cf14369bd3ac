"""The GRPO pipeline verifies itself: weights reach the engine, true on-policy is exact, replay holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import VerifyResult, VerifySample
from dsv4.engine.engine import Engine, EngineConfig
from dsv4.rl.grpo import GRPOConfig, GRPOTrainer
from dsv4.rl.policy import CompletionBatch, _layout, _replay, clone_model, completion_logprobs, weights_checksum
from dsv4.rl.tasks import ALPHABET, AdditionTask, Problem
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_char_tokenizer

MODEL = dict(vocab_size=16, hidden_size=64, num_hidden_layers=3, head_dim=32, qk_rope_head_dim=16,
             index_head_dim=32, layer_types=["sliding_attention", "compressed_sparse_attention",
                                             "heavily_compressed_attention"],
             mlp_layer_types=["hash_moe", "moe", "moe"], max_position_embeddings=64, num_nextn_predict_layers=0)


class _FirstDigitVerifier:
    """Rewards completions that start with a digit below 5: random models get it half the time, so
    every group has reward variance and every step a gradient."""

    name = "first-digit"
    capabilities = frozenset({"async"})

    @classmethod
    def refuse(cls, options: object) -> None:
        return None

    async def verify(self, samples: list[VerifySample]) -> list[VerifyResult]:
        ok = [s.completion[:1] in "01234" and s.completion[:1] != "" for s in samples]
        return [VerifyResult(reward=float(o), correct=o) for o in ok]


def _trainer(tmp: Path, *, true_on_policy: bool, seed: int = 0, **grpo: object) -> GRPOTrainer:
    tokenizer = write_char_tokenizer(tmp / "tok", ALPHABET)
    policy = random_model(ModelConfig.tiny(**MODEL), seed=seed)
    engine = Engine(clone_model(policy), tokenizer=tokenizer,
                    config=EngineConfig(max_model_len=32, max_num_seqs=256, max_num_batched_tokens=4096,
                                        return_token_logprobs=True, record_routing=True,
                                        batch_invariant=true_on_policy, expert_executor="reference"))
    verifier = _FirstDigitVerifier()
    cfg = GRPOConfig(prompts_per_step=6, group_size=4, max_new_tokens=4, true_on_policy=true_on_policy,
                     dynamic_sampling=False, **grpo)  # type: ignore[arg-type]
    return GRPOTrainer(policy, engine, verifier,  # type: ignore[arg-type]
                       lambda n, salt: AdditionTask(1, seed=salt).sample(n), cfg, seed=seed)


def test_one_step_changes_weights_and_syncs_them_to_the_engine(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, true_on_policy=False, lr=1e-2)
    before = weights_checksum(trainer.policy)
    metrics = trainer.step(0)
    assert metrics["grad_norm"] > 0
    after = weights_checksum(trainer.policy)
    assert after != before
    assert trainer.checksum == after == weights_checksum(trainer.engine.model)
    assert metrics["rollout_vs_train_logprob_abs_diff_max"] < 1e-4  # close even without invariance


@pytest.mark.parametrize("share_prompt", [True, False])
def test_true_on_policy_logprob_difference_is_exactly_zero(tmp_path: Path, share_prompt: bool) -> None:
    trainer = _trainer(tmp_path, true_on_policy=True, lr=1e-2, share_prompt=share_prompt)
    for step in range(2):  # also after an update has been synced into the engine
        metrics = trainer.step(step)
        assert metrics["rollout_vs_train_logprob_abs_diff_max"] == 0.0
        assert metrics["policy_ratio_mean"] == 1.0


def _rollout_batch(trainer: GRPOTrainer) -> CompletionBatch:
    rollouts = trainer.rollouts(AdditionTask(1, seed=3).sample(4), step=0, salt=0)
    return CompletionBatch([r.prompt_ids + r.completion_ids for r in rollouts],
                           [len(r.prompt_ids) for r in rollouts], [r.routing for r in rollouts])


@pytest.mark.parametrize("share_prompt", [True, False])
def test_routing_replay_reproduces_the_rollouts_choices(tmp_path: Path, share_prompt: bool) -> None:
    trainer = _trainer(tmp_path, true_on_policy=False)
    batch = _rollout_batch(trainer)
    with torch.no_grad():  # weights drift between rollout and training in a real run
        for p in trainer.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    layout = _layout(batch, share_prompt)
    trace = _replay(batch, layout)
    assert trace is not None and trace.experts and trace.indexer
    from dsv4.core.batch import ForwardBatch

    with torch.no_grad():
        trainer.policy.run(ForwardBatch.from_requests(layout.tokens, layout.prefix_lens, sample="all",
                                                      parents=layout.parents), routing=trace)
    for layer, recorded in trace.experts.items():
        rows = recorded[:, 0] >= 0
        assert rows.sum() >= len(layout.tokens)
        assert torch.equal(trace.applied_experts[layer][rows], recorded[rows])
    # and the replayed logprobs are those of the same expert choices (differentiable as usual)
    logps, _ = completion_logprobs(trainer.policy, batch, replay=True, share_prompts=share_prompt)
    assert all(lp.requires_grad for lp in logps)


@pytest.mark.parametrize("invariant", [True, False])
def test_shared_prompts_give_the_per_sequence_logprobs_and_gradients(tmp_path: Path, invariant: bool) -> None:
    """A group's prompt computed once: the same logprobs (bit for bit in batch-invariant mode) and, for
    the policy loss, the same gradients as every completion recomputing its prompt."""
    trainer = _trainer(tmp_path, true_on_policy=invariant)
    batch = _rollout_batch(trainer)
    assert len({tuple(s[:p]) for s, p in zip(batch.sequences, batch.prompt_lens)}) == 4  # 4 groups of 4
    results = []
    for share in (True, False):
        trainer.policy.zero_grad(set_to_none=True)
        logps, _ = completion_logprobs(trainer.policy, batch, replay=True, share_prompts=share)
        torch.cat(logps).square().sum().backward()
        results.append((logps, {n: p.grad.clone() for n, p in trainer.policy.named_parameters()
                                if p.grad is not None}))
    (shared, g_shared), (alone, g_alone) = results
    for a, b in zip(shared, alone, strict=True):
        assert torch.equal(a, b) if invariant else (a - b).abs().max().item() < 1e-5
    assert g_shared.keys() == g_alone.keys()
    for name, grad in g_shared.items():
        assert (grad - g_alone[name]).abs().max().item() <= 1e-4 * (1 + g_alone[name].abs().max().item()), name


def test_metric_band_stops_a_disagreeing_run(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, true_on_policy=False, max_logprob_diff=0.0)
    with torch.no_grad():  # the engine silently serves different weights
        next(trainer.engine.model.parameters()).add_(0.5)
    with pytest.raises(RuntimeError, match="rollout_vs_train_logprob_abs_diff_max"):
        trainer.step(0)


@pytest.mark.parametrize("loss_norm", ["token", "sequence", "constant"])
def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path: Path, loss_norm: str) -> None:
    """Forwards of one group at a time give the gradient of one forward over all groups."""
    grads: list[dict[str, torch.Tensor]] = []
    losses = []
    for micro in (None, 1):
        trainer = _trainer(tmp_path, true_on_policy=True, loss_norm=loss_norm, micro_batch_groups=micro,
                           grad_clip=1e9)  # no clipping, which would hide a wrong scale
        trainer.optimizer.step = lambda *a, **k: grads.append(  # type: ignore[method-assign]
            {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None})
        metrics = trainer.step(0)
        assert metrics["optimizer_steps"] == 1.0
        losses.append(metrics["loss"])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max().item() <= 1e-5 * (1 + g.abs().max().item()), name
    assert abs(losses[0] - losses[1]) < 1e-6


def test_epochs_and_mini_batches_take_several_clipped_steps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, true_on_policy=True, lr=3e-2, epochs=2, mini_batches=3)
    metrics = trainer.step(0)
    assert metrics["optimizer_steps"] == 6.0
    # measured before the first update, on the sequences it trains: still exactly on-policy
    assert metrics["rollout_vs_train_logprob_abs_diff_max"] == 0.0
    # the later steps see a moved policy: ratios leave 1 and the clip starts to act
    assert metrics["policy_ratio_mean"] != 1.0 and metrics["policy_approx_kl"] > 0
    assert metrics["policy_n_tokens"] == 2 * metrics["completion_tokens"]
    assert trainer.checksum == weights_checksum(trainer.engine.model) == weights_checksum(trainer.policy)


def test_update_options_are_validated() -> None:
    with pytest.raises(ValueError, match="mini_batches"):
        GRPOConfig(mini_batches=0)
    with pytest.raises(ValueError, match="micro_batch_groups"):
        GRPOConfig(micro_batch_groups=0)


def test_learning_rate_schedule(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, true_on_policy=False, lr=1e-3, warmup_steps=2, schedule="cosine", steps=6,
                       min_lr_ratio=0.1)
    lrs = [trainer.step(i)["lr"] for i in range(6)]
    assert lrs[:2] == [5e-4, 1e-3]  # warm-up
    assert lrs[2] == 1e-3 and all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # cosine decay from the peak
    assert trainer.optimizer.param_groups[0]["lr"] == lrs[-1] > 1e-4


def test_shared_layout_covers_one_token_completions_and_repeated_prompts() -> None:
    """A completion of one token needs no row of its own (its prompt's last row predicts it); two groups
    with the same prompt share one prompt request; the prompts' common start (here the BOS) is computed
    once for all of them."""
    model = random_model(ModelConfig.tiny(**MODEL), seed=4)
    model.set_batch_invariant(True, max_context=32)
    p1, p2 = [0, 5, 6, 7], [0, 8, 9]
    batch = CompletionBatch([p1 + [3], p1 + [4, 5, 1], p2 + [2, 2], p1 + [1]], [4, 4, 3, 4])
    layout = _layout(batch, True)
    # BOS, the prompts' rests (p1 once), then completions without their last token
    assert layout.tokens == [[0], [5, 6, 7], [8, 9], [4, 5], [2]]
    assert layout.parents == [-1, 0, 0, 1, 2] and layout.prefix_lens == [0, 1, 1, 4, 3]
    with torch.no_grad():
        shared, _ = completion_logprobs(model, batch, share_prompts=True)
        alone, _ = completion_logprobs(model, batch, share_prompts=False)
    assert [len(x) for x in shared] == [1, 3, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(shared, alone, strict=True))


def test_true_on_policy_with_a_long_common_prompt_start(tmp_path: Path) -> None:
    """Prompts with a shared start (computed once by the engine and once by the trainer) stay exactly on
    policy."""
    trainer = _trainer(tmp_path, true_on_policy=True, lr=1e-2)
    prefix = "1+2=3 4+4=8 5+1=6 "  # 18 characters in common (19 tokens with the BOS)
    trainer.sample_problems = lambda n, salt: [Problem(prefix + p.prompt, p.answer)
                                               for p in AdditionTask(1, seed=salt).sample(n)]
    for step in range(2):
        metrics = trainer.step(step)
        assert metrics["rollout_vs_train_logprob_abs_diff_max"] == 0.0
    assert trainer.engine.stats["prompt_tokens"] < 2 * 6 * len(prefix)  # the start was prefilled once a step

"""Keeping the MTP block's drafts in tune through RL: the MTP loss on rollouts (``grpo.mtp_loss_coef``)
and the accept length the recipe reports."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.engine.engine import Engine, EngineConfig
from dsv4.rl import algorithms
from dsv4.rl.grpo import GRPOConfig, GRPOTrainer, spec_accept_length
from dsv4.rl.policy import CompletionBatch, clone_model, completion_mtp_loss
from dsv4.rl.tasks import ALPHABET, AdditionTask
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_char_tokenizer

MODEL = dict(vocab_size=16, hidden_size=64, num_hidden_layers=3, head_dim=32, qk_rope_head_dim=16,
             index_head_dim=32, layer_types=["sliding_attention", "compressed_sparse_attention",
                                             "heavily_compressed_attention"],
             mlp_layer_types=["hash_moe", "moe", "moe"], max_position_embeddings=64, num_nextn_predict_layers=1)


def test_completion_mtp_loss_is_the_sft_mtp_loss_on_the_completions() -> None:
    """The same number as SFT's MTP loss (one forward with ``mtp_ids``) restricted to completion targets,
    and gradients reach the MTP block but no main-model layer (the streams are computed without them)."""
    model = random_model(ModelConfig.tiny(**MODEL), seed=3)
    seqs = [[1, 5, 6, 7, 8, 9, 2], [1, 3, 4, 10, 11], [1, 12, 13, 14]]
    prompt_lens = [3, 2, 3]
    loss = completion_mtp_loss(model, CompletionBatch(seqs, prompt_lens))
    # SFT's formulation: row i's mtp logits predict x[i + 2]; the target x[i + 2] must be a completion token
    batch = ForwardBatch.from_requests(seqs, sample="all")
    targets = torch.tensor([t for s in seqs for t in [*s[1:], 0]])
    mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
    for start, s, p in zip(batch.starts_host, seqs, prompt_lens, strict=True):
        mask[start + p - 1 : start + len(s) - 1] = True
    with torch.no_grad():
        out = model.run(batch, mtp_ids=targets)
    want = algorithms.mtp_loss(out.mtp_logits[0], targets, mask)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.layers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())


def test_grpo_with_mtp_loss_trains_the_mtp_block(tmp_path: Path) -> None:
    tokenizer = write_char_tokenizer(tmp_path / "tok", ALPHABET)

    class Verifier:
        name, capabilities = "any", frozenset({"async"})

        async def verify(self, samples: list) -> list:  # type: ignore[type-arg]
            from dsv4.core.interfaces import VerifyResult
            return [VerifyResult(reward=float(s.completion[:1] in "01234"), correct=True) for s in samples]

    def trained(coef: float) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        model = random_model(ModelConfig.tiny(**MODEL), seed=0)
        engine = Engine(clone_model(model), tokenizer=tokenizer,
                        config=EngineConfig(max_model_len=32, max_num_seqs=256, return_token_logprobs=True))
        # a clip that bites: the MTP gradients must not rescale the policy's through a shared norm either
        cfg = GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=4, dynamic_sampling=False,
                         mtp_loss_coef=coef, routing_replay=False, lr=1e-2, grad_clip=1e-3)
        trainer = GRPOTrainer(model, engine, Verifier(), lambda n, salt: AdditionTask(1, seed=salt).sample(n),  # type: ignore[arg-type]
                              cfg, seed=0)
        metrics = trainer.step(0)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics

    without, _ = trained(0.0)
    with_mtp, metrics = trained(0.5)
    assert metrics["policy_mtp_loss"] > 0
    for name, value in with_mtp.items():  # the block moved, the policy (head and embedding included) did not
        if name.startswith("mtp."):
            continue
        assert torch.equal(value, without[name]), name
    assert any(not torch.equal(v, without[k]) for k, v in with_mtp.items() if k.startswith("mtp."))
    problems = AdditionTask(1, seed=1).sample(8)
    length = spec_accept_length(random_model(ModelConfig.tiny(**MODEL), seed=0), tokenizer, problems, 4)
    assert length is not None and 1.0 <= length <= 4.0

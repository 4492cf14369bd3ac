"""Supervised warm start: cross-entropy on prompt/response pairs, the MTP head's loss included."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dsv4.core.batch import ForwardBatch
from dsv4.core.device import to_device
from dsv4.engine.tokenizer import Tokenizer
from dsv4.model import Transformer
from dsv4.rl import algorithms
from dsv4.rl.balance import ExpertBalancer
from dsv4.rl.tasks import Problem, encode_sft

__all__ = ["SFTConfig", "SFTTrainer"]


class SFTConfig(BaseModel):
    """SFT hyper-parameters (``sft.<name>=…`` overrides of ``dsv4 train``)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(default=3000, ge=0)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    # Learning-rate schedule: linear warm-up over ``warmup_steps``, then constant or cosine decay to
    # ``min_lr_ratio · lr`` at ``max_steps``. A function of the step alone, so resume is exact.
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    mtp_coef: float = Field(default=0.3, ge=0)  # weight of the MTP head's next-next-token loss
    indexer_coef: float = Field(default=0.1, ge=0)  # weight of the lightning indexer's KL objective
    # MoE balance (dsv4.rl.balance): the gate biases' step after each optimizer step (DeepSeek-V3's γ;
    # 0: frozen) and the weight of the sequence-wise balance loss (DeepSeek-V3 uses 1e-4; 0: off).
    # None: 0 (dsv4 train fills both from model.bias_update_speed / model.seq_balance_loss_coef).
    bias_update_speed: float | None = Field(default=None, ge=0)
    seq_balance_loss_coef: float | None = Field(default=None, ge=0)
    eval_every: int = Field(default=100, ge=1)
    # Stop as soon as held-out greedy accuracy reaches this band's lower edge (the RL phase has to do
    # the rest); an accuracy above the upper edge at that point is reported, not hidden.
    target_accuracy: tuple[float, float] = (0.3, 0.7)


class SFTTrainer:
    """Trains ``policy`` in place on (prompt, answer) pairs drawn by ``sample_problems``."""

    def __init__(
        self,
        policy: Transformer,
        tokenizer: Tokenizer,
        sample_problems: Callable[[int, int], list[Problem]],
        config: SFTConfig,
    ) -> None:
        self.policy, self.tokenizer, self.sample_problems, self.config = policy, tokenizer, sample_problems, config
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.balancer = ExpertBalancer(policy, config.bias_update_speed or 0.0)

    def loss(self, problems: Sequence[Problem]) -> tuple[torch.Tensor, dict[str, float]]:
        """LM loss on the answers (+ EOS), the MTP loss, the indexer objective and the MoE balance loss, for
        one batch (its routed-token counts go to the balancer)."""
        encoded = [encode_sft(p, self.tokenizer) for p in problems]
        seqs = [ids for ids, _ in encoded]
        device = self.policy.embed.weight.device
        batch = ForwardBatch.from_requests(seqs, sample="all", device=device)
        targets = torch.zeros(batch.num_tokens, dtype=torch.long)
        mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
        for start, (ids, n_prompt) in zip(batch.starts_host, encoded, strict=True):
            targets[start : start + len(ids) - 1] = torch.tensor(ids[1:])
            mask[start + n_prompt - 1 : start + len(ids) - 1] = True  # rows that predict the answer
        targets, mask = to_device(targets, device), to_device(mask, device)
        with_mtp = len(self.policy.mtp) > 0 and self.config.mtp_coef > 0
        out = self.policy.run(batch, mtp_ids=targets if with_mtp else None,
                              indexer_loss=self.config.indexer_coef > 0,
                              balance_loss=bool(self.config.seq_balance_loss_coef))
        self.balancer.observe(out.expert_load)
        lm = algorithms.sft_loss(out.logits, targets, mask)
        total = lm
        stats = {"lm_loss": float(lm.detach())}
        if with_mtp:
            mtp = algorithms.mtp_loss(out.mtp_logits[0], targets, mask)
            total = total + self.config.mtp_coef * mtp
            stats["mtp_loss"] = float(mtp.detach())
        if "indexer_kl" in out.aux_losses:
            kl = out.aux_losses["indexer_kl"]
            total = total + self.config.indexer_coef * kl
            stats["indexer_kl"] = float(kl.detach())
        if "seq_balance" in out.aux_losses:
            balance = out.aux_losses["seq_balance"]
            total = total + (self.config.seq_balance_loss_coef or 0.0) * balance
            stats["seq_balance_loss"] = float(balance.detach())
        return total, stats

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) ``step``."""
        cfg = self.config
        return algorithms.lr_at(step, cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                                total_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio)

    def step(self, step: int) -> dict[str, object]:
        """One optimisation step on a fresh batch (then the MoE bias update); its metrics."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.policy.train()
        loss, stats = self.loss(self.sample_problems(self.config.batch_size, step))
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.grad_clip)
        self.optimizer.step()
        balance = self.balancer.step()
        self.policy.eval()
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr, **stats, **balance}

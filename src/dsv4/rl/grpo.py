"""GRPO-family training on dsv4's own engine, with verified rewards and a self-verifying pipeline.

One step: sample prompts → group rollouts on the engine (behaviour logprobs and routing recorded) →
rewards from a verifier → group-relative advantages (dynamic sampling drops zero-variance groups and
refills) → the trainer recomputes the completions' logprobs (routing replayed) → clipped policy loss
(+ KL to a frozen reference) → AdamW → weights synced into the engine and checksummed. Every step
logs ``rollout_vs_train_logprob_abs_diff`` (max, mean); in true-on-policy mode it is exactly 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dsv4.core.device import to_device
from dsv4.core.interfaces import Verifier, VerifySample
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.tokenizer import Tokenizer
from dsv4.model import Transformer
from dsv4.rl import algorithms
from dsv4.rl.balance import ExpertBalancer
from dsv4.rl.policy import CompletionBatch, clone_model, completion_logprobs, completion_mtp_loss, pad, sync_weights
from dsv4.rl.tasks import Problem

__all__ = ["GRPOConfig", "GRPOTrainer", "Rollout"]


class GRPOConfig(BaseModel):
    """GRPO hyper-parameters (every field is a ``grpo.<name>=…`` override of ``dsv4 train``)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=100, ge=0)
    prompts_per_step: int = Field(default=32, ge=1)
    group_size: int = Field(default=8, ge=2)
    max_new_tokens: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    method: Literal["grpo", "drgrpo", "gspo"] = "grpo"
    clip_low: float = Field(default=0.2, ge=0)
    clip_high: float = Field(default=0.28, ge=0)  # clip-higher (DAPO)
    loss_norm: Literal["token", "sequence", "constant"] = "token"
    kl_coef: float = Field(default=0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    lr: float = Field(default=1e-4, gt=0)
    # Linear warm-up over `warmup_steps`, then constant or cosine decay to min_lr_ratio · lr at `steps`.
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(default=1.0, gt=0)
    # Optimizer steps per batch of rollouts: `epochs` passes (PPO epochs, TRL's num_iterations), each in
    # `mini_batches` chunks of whole groups (TRL's steps_per_generation). With more than one step the
    # later ones are off-policy and the clip bounds the ratio to the behaviour (rollout) logprobs.
    epochs: int = Field(default=1, ge=1)
    mini_batches: int = Field(default=1, ge=1)
    # Groups per forward/backward inside a mini-batch (gradient accumulation, for memory); None: all.
    micro_batch_groups: int | None = Field(default=None, ge=1)
    # torch's fused AdamW (one kernel for every tensor: 8 -> 2 ms a step on a 2.4M-parameter model);
    # off: the per-tensor loop, whose rounding differs slightly (the arithmetic of earlier releases)
    fused_optimizer: bool = True
    dynamic_sampling: bool = True  # drop zero-variance groups, refill from more prompts
    max_refills: int = Field(default=2, ge=0)
    overlong_buffer: int = Field(default=0, ge=0)  # DAPO soft overlong penalty over the last N tokens
    overlong_penalty: float = Field(default=1.0, ge=0)
    routing_replay: bool = True
    # The trainer's forward computes a group's prompt once for its G completions (as the engine's
    # rollouts do); off: every completion recomputes its prompt (the arithmetic of earlier releases).
    share_prompt: bool = True
    true_on_policy: bool = False  # batch-invariant numerics on both sides: logprob diff exactly 0
    max_logprob_diff: float | None = None  # stop the run when the rollout/trainer diff exceeds this
    permute_rewards: bool = False  # control experiment: rewards shuffled within each step
    # MoE balance (dsv4.rl.balance): the gate biases' step after each optimizer step (0: frozen, what RL
    # on a released checkpoint usually wants) and the weight of the sequence-wise balance loss (0: off).
    # None: 0 (dsv4 train fills both from model.bias_update_speed / model.seq_balance_loss_coef).
    bias_update_speed: float | None = Field(default=None, ge=0)
    seq_balance_loss_coef: float | None = Field(default=None, ge=0)
    # Weight of the MTP head's loss on the rollouts (dsv4.rl.policy.completion_mtp_loss; 0: off): keeps the
    # MTP block's drafts in tune with the policy RL moves (speculative decoding's acceptance). Trains the
    # block's own weights on the policy's streams, nothing of the policy (not the head and embedding the
    # block shares with it); one more forward per micro-batch.
    mtp_loss_coef: float = Field(default=0.0, ge=0)


@dataclass(slots=True)
class Rollout:
    """One sampled completion with everything the trainer needs."""

    problem: Problem
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    behaviour_logprobs: list[float]
    routing: Any
    finish_reason: str | None
    reward: float = 0.0
    correct: bool = False
    error: str | None = None


@dataclass(slots=True)
class _StepData:
    rollouts: list[Rollout] = field(default_factory=list)
    sampled: int = 0
    dropped_groups: int = 0
    all_rewards: list[float] = field(default_factory=list)  # every sampled completion, before filtering


@dataclass(slots=True)
class _Accumulated:
    """What a step's optimizer updates report: policy-loss statistics weighted by tokens (counts summed),
    each update's loss and gradient norm, and the rollout/trainer logprob differences measured before
    the first update."""

    stats: dict[str, float] = field(default_factory=dict)
    weight: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    diffs: list[torch.Tensor] = field(default_factory=list)
    balance: dict[str, object] = field(default_factory=dict)  # the last update's MoE load metrics

    def add(self, stats: dict[str, float], tokens: float) -> None:
        for k, v in stats.items():
            w = 1.0 if k == "n_tokens" else tokens  # a count adds up; the rest are token means
            self.stats[k] = self.stats.get(k, 0.0) + v * w
            self.weight[k] = 1.0 if k == "n_tokens" else self.weight.get(k, 0.0) + tokens


class GRPOTrainer:
    """Trains ``policy`` in place; ``engine`` holds its own copy of the weights for rollouts."""

    def __init__(
        self,
        policy: Transformer,
        engine: Engine,
        verifier: Verifier,
        sample_problems: Callable[[int, int], list[Problem]],
        config: GRPOConfig,
        *,
        seed: int = 0,
    ) -> None:
        self.policy, self.engine, self.verifier, self.config, self.seed = policy, engine, verifier, config, seed
        self.sample_problems = sample_problems  # (n, salt) -> problems, deterministic
        self.tokenizer = engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("GRPO needs an engine with a tokenizer (prompts and answers are text)")
        if config.true_on_policy:
            policy.set_batch_invariant(True, max_context=engine.max_model_len)
            if not engine.model.invariant:
                raise ValueError("true_on_policy needs an engine built with batch_invariant=True")
        self.optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
            **({"fused": True} if config.fused_optimizer else {}),
        )
        self.reference = clone_model(policy) if config.kl_coef > 0 else None
        self.balancer = ExpertBalancer(policy, config.bias_update_speed or 0.0)
        self.checksum = sync_weights(policy, engine.model)

    # ------------------------------------------------------------------------------------------
    def rollouts(self, problems: Sequence[Problem], step: int, salt: int) -> list[Rollout]:
        """``group_size`` completions per problem, from the engine, seeded by (run seed, step)."""
        assert self.tokenizer is not None
        cfg = self.config
        prompts = [self.tokenizer.encode(p.prompt) for p in problems]
        params = [
            SamplingParams(n=cfg.group_size, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens,
                           seed=(self.seed * 1_000_003 + step * 10_007 + salt * 101 + i) % (1 << 62))
            for i in range(len(problems))
        ]
        outs = self.engine.generate(prompts, params)
        rollouts = []
        for problem, ids, out in zip(problems, prompts, outs, strict=True):
            for c in out.outputs:
                rollouts.append(Rollout(problem, ids, list(c.token_ids), c.text, list(c.token_logprobs or []),
                                        c.routing, c.finish_reason))
        return rollouts

    def score(self, rollouts: Sequence[Rollout]) -> None:
        """Rewards from the verifier, which gets each problem's whole reference (a crashed or timed-out check
        is a recorded failure, reward 0)."""
        samples = [VerifySample(r.problem.prompt, r.text, r.problem.reference) for r in rollouts]
        results = asyncio.run(self.verifier.verify(samples))
        for r, res in zip(rollouts, results, strict=True):
            r.reward, r.correct, r.error = res.reward, res.correct, res.error

    def _collect(self, step: int) -> _StepData:
        cfg = self.config
        data = _StepData()
        for salt in range(cfg.max_refills + 1):
            need = cfg.prompts_per_step - len(data.rollouts) // cfg.group_size
            if need <= 0:
                break
            batch = self.rollouts(self.sample_problems(need, step * 1000 + salt), step, salt)
            self.score(batch)
            data.sampled += len(batch)
            data.all_rewards += [r.reward for r in batch]
            rewards = torch.tensor([r.reward for r in batch])
            keep = algorithms.filter_groups(rewards, cfg.group_size) if cfg.dynamic_sampling else torch.arange(len(batch))
            data.dropped_groups += (len(batch) - len(keep)) // cfg.group_size
            data.rollouts += [batch[i] for i in keep.tolist()]
            if not cfg.dynamic_sampling:
                break
        return data

    # ------------------------------------------------------------------------------------------
    def _update(self, rollouts: list[Rollout], advantages: torch.Tensor, acc: _Accumulated) -> None:
        """One optimizer step on ``rollouts`` (whole groups), in forwards of ``micro_batch_groups`` groups
        whose gradients add up to those of the whole mini-batch's loss; then the MoE bias update for the
        routed tokens of those forwards."""
        cfg = self.config
        size = (cfg.micro_batch_groups or len(rollouts)) * cfg.group_size
        parts = [range(i, min(i + size, len(rollouts))) for i in range(0, len(rollouts), size)]
        tokens = sum(len(r.completion_ids) for r in rollouts)
        first_update = not acc.grad_norms  # the policy is still the one that sampled
        device = self.policy.embed.weight.device
        advantages = to_device(advantages, device)  # rewards are scored on the host; one transfer per update
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for part in parts:
            chunk = [rollouts[i] for i in part]
            batch = CompletionBatch([r.prompt_ids + r.completion_ids for r in chunk],
                                    [len(r.prompt_ids) for r in chunk],
                                    [r.routing for r in chunk] if cfg.routing_replay else None)
            logps, out = completion_logprobs(self.policy, batch, replay=cfg.routing_replay,
                                             balance_loss=bool(cfg.seq_balance_loss_coef), share_prompts=cfg.share_prompt)
            self.balancer.observe(out.expert_load)
            logp, mask = pad(logps)
            old = to_device(pad([torch.tensor(r.behaviour_logprobs) for r in chunk])[0], device)
            if first_update:
                acc.diffs.append((logp.detach() - old).abs()[mask])
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref, _ = pad(completion_logprobs(self.reference, batch, replay=cfg.routing_replay,
                                                     share_prompts=cfg.share_prompt)[0])
            loss, stats = algorithms.policy_loss(
                logp, old, advantages[part.start : part.stop], mask, method=cfg.method, clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, ref_logp=ref, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                loss_norm=cfg.loss_norm, max_len=cfg.max_new_tokens,
            )
            if "seq_balance" in out.aux_losses:
                balance = out.aux_losses["seq_balance"]
                loss = loss + (cfg.seq_balance_loss_coef or 0.0) * balance
                stats["seq_balance_loss"] = float(balance.detach())
            # The mini-batch's loss is this part's, weighted by its share of the normaliser.
            share = float(mask.sum()) / tokens if cfg.loss_norm == "token" else len(chunk) / len(rollouts)
            if cfg.mtp_loss_coef > 0 and len(self.policy.mtp):
                mtp = completion_mtp_loss(self.policy, batch)
                _accumulate_grad(list(self.policy.mtp.parameters()), cfg.mtp_loss_coef * share * mtp)
                stats["mtp_loss"] = float(mtp.detach())
            torch.autograd.backward(loss if len(parts) == 1 else loss * share)
            loss_total += float(loss.detach()) * share
            acc.add(stats, float(mask.sum()))
        # The MTP block is trained by its own loss alone: clipped apart, so that it cannot rescale the policy's step.
        drafter = {id(p) for p in self.policy.mtp.parameters()}
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if id(p) not in drafter],
                                                   cfg.grad_clip)
        if cfg.mtp_loss_coef > 0:
            torch.nn.utils.clip_grad_norm_(list(self.policy.mtp.parameters()), cfg.grad_clip)
        self.optimizer.step()
        acc.balance = self.balancer.step()
        acc.losses.append(loss_total)
        acc.grad_norms.append(float(grad_norm))

    def step(self, step: int) -> dict[str, object]:
        """One GRPO update; returns the step's metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        lr = algorithms.lr_at(step, cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                              total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        data = self._collect(step)
        t_rollout = time.perf_counter() - t0
        metrics: dict[str, object] = {
            # over everything sampled (the policy's quality); the trained-on subset is biased by filtering
            "reward_mean": _mean(data.all_rewards),
            "trained_reward_mean": _mean([r.reward for r in data.rollouts]),
            "sampled": float(data.sampled),
            "dropped_groups": float(data.dropped_groups),
            "verifier_errors": float(sum(r.error is not None for r in data.rollouts)),
        }
        if not data.rollouts:  # every group had equal rewards: nothing to learn from this step
            metrics.update(loss=0.0, rollout_seconds=t_rollout, step_seconds=time.perf_counter() - t0)
            return metrics
        rewards = torch.tensor([r.reward for r in data.rollouts])
        if cfg.permute_rewards:
            rewards = rewards[torch.randperm(len(rewards), generator=torch.Generator().manual_seed(step))]
        if cfg.overlong_buffer:
            lengths = torch.tensor([len(r.completion_ids) for r in data.rollouts])
            rewards = rewards + algorithms.overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer,
                                                             cfg.overlong_penalty)
        advantages = algorithms.group_advantages(rewards, cfg.group_size, method=cfg.method)

        # Optimizer steps: `epochs` passes over the batch, each in `mini_batches` chunks of whole groups
        # (the first pass in sampling order, later ones in a seeded permutation of the groups).
        groups = len(data.rollouts) // cfg.group_size
        self.policy.train()
        acc = _Accumulated()
        for epoch in range(cfg.epochs):
            seed = self.seed * 1_000_003 + step * 101 + epoch
            order = (torch.arange(groups) if epoch == 0
                     else torch.randperm(groups, generator=torch.Generator().manual_seed(seed)))
            for chunk in torch.tensor_split(order, min(cfg.mini_batches, groups)):
                rows = [g * cfg.group_size + j for g in chunk.tolist() for j in range(cfg.group_size)]
                self._update([data.rollouts[i] for i in rows], advantages[rows], acc)
        self.policy.eval()
        self.checksum = sync_weights(self.policy, self.engine.model)
        diff = torch.cat(acc.diffs) if acc.diffs else torch.zeros(0)
        diff_max = float(diff.max()) if diff.numel() else 0.0
        metrics.update(
            {f"policy_{k}": v / acc.weight[k] for k, v in acc.stats.items()},
            loss=_mean(acc.losses),
            grad_norm=_mean(acc.grad_norms),
            optimizer_steps=float(len(acc.grad_norms)),
            lr=lr,
            accuracy=_mean([float(r.correct) for r in data.rollouts]),
            rollout_vs_train_logprob_abs_diff_max=diff_max,
            rollout_vs_train_logprob_abs_diff_mean=float(diff.mean()) if diff.numel() else 0.0,
            completion_tokens=float(sum(len(r.completion_ids) for r in data.rollouts)),
            rollout_seconds=t_rollout,
            step_seconds=time.perf_counter() - t0,
            **acc.balance,
        )
        if cfg.max_logprob_diff is not None and diff_max > cfg.max_logprob_diff:
            raise RuntimeError(
                f"rollout_vs_train_logprob_abs_diff_max = {diff_max:.3g} "
                f"exceeds max_logprob_diff = {cfg.max_logprob_diff}: the engine and the trainer disagree"
            )
        return metrics


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _accumulate_grad(params: list[torch.nn.Parameter], loss: torch.Tensor) -> None:
    """Add ``loss``'s gradient to ``params``' and to nothing else (the MTP loss trains the MTP block's own
    weights, not the head and embedding it shares with the policy)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for param, grad in zip(params, grads, strict=True):
        if grad is not None:
            param.grad = grad if param.grad is None else param.grad + grad


def spec_accept_length(model: Transformer, tokenizer: Tokenizer, problems: Sequence[Problem],
                       max_new_tokens: int) -> float | None:
    """How many tokens a speculative step yields when ``model``'s MTP block drafts (k = 3) for greedy
    completions of ``problems``: what RL has to keep from falling (``grpo.mtp_loss_coef``); ``None``
    without an MTP block."""
    if not len(model.mtp):
        return None
    batch = min(len(problems), 64)
    engine = Engine(clone_model(model), tokenizer=tokenizer, speculative="mtp", speculative_max_batch=batch,
                    max_num_seqs=batch, prefix_cache=False)
    engine.generate([tokenizer.encode(p.prompt) for p in problems],
                    SamplingParams(temperature=0, max_tokens=max_new_tokens))
    return float(engine.spec_stats()["accept_length"])


def greedy_accuracy(engine: Engine, verifier: Verifier, problems: Sequence[Problem], max_new_tokens: int) -> float:
    """Fraction of ``problems`` the engine's greedy completion gets right, by the verifier (which gets each
    problem's whole reference)."""
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(p.prompt) for p in problems]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new_tokens))
    samples = [VerifySample(p.prompt, o.outputs[0].text, p.reference) for p, o in zip(problems, outs)]
    results = asyncio.run(verifier.verify(samples))
    return _mean([float(r.correct) for r in results])


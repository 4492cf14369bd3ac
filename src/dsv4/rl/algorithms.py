"""The RL and SFT objectives as pure tensor functions: advantages, the clipped policy loss, DAPO's overlong
penalty and dynamic-sampling filter, token cross entropy for the main and MTP heads.

Notation used in every docstring below. A batch holds ``n`` groups of ``G`` completions of the same prompt,
laid out group after group (completion ``j`` of group ``g`` is row ``g·G + j``). For completion ``i`` and its
token ``t``: ``r_i`` its reward, ``A_i`` its advantage, ``m_i,t ∈ {0, 1}`` the mask of its valid (generated,
not padding) tokens, ``|y_i| = Σ_t m_i,t`` its length, ``π`` / ``π_old`` / ``π_ref`` the log-probabilities
(``logp``, ``old_logp``, ``ref_logp``) of the sampled token under the policy being trained, the policy that
sampled it, and the frozen reference. ``sg[·]`` is stop-gradient.

References: GRPO (DeepSeekMath, Shao et al. 2024), DAPO (Yu et al. 2025: clip-higher, token-level loss,
dynamic sampling, overlong shaping), Dr.GRPO (Liu et al. 2025: no std and no length normalisation), GSPO
(Zheng et al. 2025: sequence-level ratio), Schulman's "Approximating KL divergence" note (k1, k2, k3).

Everything here is a pure function of its tensors (no module state, no device or dtype changes beyond
``float`` for integer rewards); statistics come back as python floats so a logger can take them as they are.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "AdvantageMethod",
    "KLEstimator",
    "LossNorm",
    "PolicyMethod",
    "filter_groups",
    "group_advantages",
    "kl_estimate",
    "lr_at",
    "mtp_loss",
    "overlong_penalty",
    "policy_loss",
    "sft_loss",
    "zero_variance_groups",
]

AdvantageMethod = Literal["grpo", "drgrpo", "gspo"]
PolicyMethod = Literal["grpo", "drgrpo", "gspo"]
KLEstimator = Literal["k1", "k2", "k3"]
LossNorm = Literal["token", "sequence", "constant"]
Schedule = Literal["constant", "cosine"]


# ------------------------------------------------------------------------------------------------ advantages
def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` as ``[n, G]``: a flat ``[n·G]`` vector (group after group) or already ``[n, G]``."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: a group holds at least one completion")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} is [n, G] with G={rewards.shape[1]}, "
                             f"but group_size={group_size}")
        return rewards
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: expected [n*G] with G={group_size} "
                         "(a multiple of the group size) or [n, G]")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, method: AdvantageMethod, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages, one per completion, in the shape of ``rewards`` (``[n·G]`` or ``[n, G]``).

    - ``"grpo"`` and ``"gspo"``: ``A_i = (r_i − mean_g(r)) / (std_g(r) + eps)``, with the *population* standard
      deviation ``std_g(r) = sqrt(mean_g((r − mean_g(r))²))`` (``unbiased=False``). DeepSeekMath only says
      "normalised by the standard deviation"; the population form keeps a group of two rewards {0, 1} at
      advantages ±1 and does not blow up for ``G = 2``. GSPO uses these same normalised, sequence-level
      advantages.
    - ``"drgrpo"``: ``A_i = r_i − mean_g(r)`` (Dr.GRPO drops the std, which over-weights groups that are nearly
      all right or all wrong).

    A group whose rewards are all equal gets ``A = 0`` with every method (``0 / (0 + eps)``).
    """
    r = _grouped(rewards.float() if not rewards.is_floating_point() else rewards, group_size)  # [n, G]
    centred = r - r.mean(dim=1, keepdim=True)
    if method == "drgrpo":
        adv = centred
    elif method in ("grpo", "gspo"):
        adv = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    else:
        raise ValueError(f"method={method!r}: choose 'grpo', 'drgrpo' or 'gspo'")
    return adv.reshape(rewards.shape)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``BoolTensor [n]``: True for the groups whose ``G`` rewards are all exactly equal.

    Such a group has ``A = 0`` for every completion and so contributes no policy gradient; DAPO's dynamic
    sampling drops these groups (and samples more) so that every group in the batch carries signal.
    """
    r = _grouped(rewards, group_size)
    return r.amax(dim=1) == r.amin(dim=1)


def filter_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``LongTensor``: the flat indices ``g·G + j`` (ascending) of the completions in groups that are *not*
    zero-variance, ready to index any per-completion tensor of the batch (``logp[kept]``, ``rewards.view(-1)[kept]``).
    """
    keep = ~zero_variance_groups(rewards, group_size)  # [n]
    groups = keep.nonzero().view(-1)  # [n_kept]
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).view(-1)


# ---------------------------------------------------------------------------------------------- shaping
def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer_len: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term ``[B]`` to add to the task reward.

    With ``L = max_len``, ``C = buffer_len`` and ``p = penalty``::

        R(|y|) = 0                          if |y| ≤ L − C
               = p · ((L − C) − |y|) / C    if L − C < |y| ≤ L    (linear from 0 down to −p)
               = −p                         if |y| > L

    The ramp tells the policy that "too long" is a matter of degree, instead of punishing a completion cut at
    the limit exactly as hard as a wrong one.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len={buffer_len}: need 0 < buffer_len <= max_len={max_len}")
    y = lengths.float()
    ramp = ((max_len - buffer_len) - y) / buffer_len  # > 0 before the buffer, −1 at max_len
    return penalty * ramp.clamp(min=-1.0, max=0.0)


# ---------------------------------------------------------------------------------------------- policy loss
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from a token sampled from ``π``; with ``d = logp − ref_logp``:

    - ``k1 = d`` (unbiased, high variance, can be negative),
    - ``k2 = ½ d²`` (biased, low variance, ≥ 0),
    - ``k3 = exp(−d) + d − 1 = exp(ref − logp) − (ref − logp) − 1`` (unbiased, ≥ 0 since ``eˣ ≥ 1 + x``; the
      estimator DeepSeekMath uses for GRPO's KL term).
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1.0
    raise ValueError(f"kl_estimator={estimator!r}: choose 'k1', 'k2' or 'k3'")


def _normalise(per_token: torch.Tensor, m: torch.Tensor, loss_norm: LossNorm, max_len: int | None) -> torch.Tensor:
    """Reduce a masked ``[B, L]`` loss to a scalar (see :func:`policy_loss` for the three formulas)."""
    if loss_norm == "token":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if loss_norm == "sequence":
        per_seq = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B]
        return per_seq.mean()
    if loss_norm == "constant":
        length = per_token.shape[1] if max_len is None else max_len
        return (per_token * m).sum() / (per_token.shape[0] * length)
    raise ValueError(f"loss_norm={loss_norm!r}: choose 'token', 'sequence' or 'constant'")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    method: PolicyMethod,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    loss_norm: LossNorm = "token",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss (to minimise) and its statistics.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` are ``[B, L]``, ``advantages`` is ``[B]``. The
    ratio is clipped to ``[1 − clip_low, 1 + clip_high]``; separate bounds are DAPO's clip-higher.

    Per-token loss ``ℓ_i,t = −min(s_i,t · A_i, clip(s_i,t, 1 − clip_low, 1 + clip_high) · A_i)
    + kl_coef · KL_i,t`` with the ratio ``s_i,t``:

    - ``"grpo"``, ``"drgrpo"``: the token ratio ``s_i,t = exp(π_i,t − π_old,i,t)`` (PPO).
    - ``"gspo"``: the length-normalised sequence ratio ``s_i = exp((1/|y_i|) Σ_t m_i,t (π_i,t − π_old,i,t))``,
      in GSPO-token form ``s_i,t = sg[s_i] · exp(π_i,t − sg[π_i,t])``: its value is ``s_i`` on every token, so
      the clip acts on the whole sequence, and ``∂s_i,t / ∂π_i,t = s_i``. With ``loss_norm="sequence"`` the
      gradient is then exactly GSPO's ``−(1/B) Σ_i s_i A_i (1/|y_i|) Σ_t ∇π_i,t`` over unclipped sequences.
      GSPO's clip range is narrow (the paper uses 3e-4 / 4e-4); pass it as ``clip_low`` / ``clip_high``.

    ``KL_i,t`` is :func:`kl_estimate` of ``(logp, ref_logp)`` with ``kl_estimator`` (needs ``ref_logp``).

    Reduction ``loss_norm`` of the masked ``ℓ``:

    - ``"token"`` (DAPO): ``Σ_i,t m ℓ / Σ_i,t m``, every token of the batch weighs the same;
    - ``"sequence"`` (GRPO, GSPO): ``(1/B) Σ_i (1/|y_i|) Σ_t m ℓ``, every sequence weighs the same;
    - ``"constant"`` (Dr.GRPO): ``Σ_i,t m ℓ / (B · max_len)``, with ``max_len`` the generation budget
      (``L``, the padded length, when None), so no length bias enters through the denominator.

    Statistics (floats, over valid tokens): ``loss``; ``clip_frac_low`` / ``clip_frac_high``, the fraction of
    tokens whose gradient the clip removes (``s < 1 − clip_low`` with ``A < 0``, ``s > 1 + clip_high`` with
    ``A > 0``), and ``clip_frac`` their sum; ``ratio_mean`` of ``s`` (the sequence ratio for GSPO);
    ``approx_kl``, k3 of ``π`` against ``π_old`` (how far this update has moved); ``kl_ref``, the chosen
    estimator against ``π_ref``, when ``ref_logp`` is given; ``n_tokens``.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must all be the same [B, L]")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = [{logp.shape[0]}]")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp, the reference policy's log-probabilities")
    valid = mask.bool()
    m = valid.to(logp.dtype)  # [B, L]
    # Padding may hold anything (even ±inf); zeroing the difference there keeps exp() finite, so no NaN can
    # reach the gradient through 0 · inf.
    delta = torch.where(valid, logp - old_logp, torch.zeros_like(logp))  # [B, L]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]

    if method in ("grpo", "drgrpo"):
        ratio = torch.exp(delta)  # [B, L]
    elif method == "gspo":
        seq_log_ratio = delta.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B]
        seq_ratio = torch.exp(seq_log_ratio)[:, None]  # [B, 1]
        # Value s_i on every token, gradient s_i · ∇π_i,t: the token term is exp(π − sg[π]) = 1 with slope 1.
        tok = torch.where(valid, logp, torch.zeros_like(logp))
        ratio = seq_ratio.detach() * torch.exp(tok - tok.detach())  # [B, L]
    else:
        raise ValueError(f"method={method!r}: choose 'grpo', 'drgrpo' or 'gspo'")

    surrogate = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    # min, not max: the loss is the negated objective, and PPO keeps the pessimistic (smaller) objective.
    per_token = -torch.minimum(surrogate, clipped)  # [B, L]
    kl_ref: torch.Tensor | None = None
    if ref_logp is not None:
        ref_delta = torch.where(valid, logp - ref_logp, torch.zeros_like(logp))
        kl_ref = kl_estimate(ref_delta, torch.zeros_like(ref_delta), kl_estimator)  # [B, L]
        per_token = per_token + kl_coef * kl_ref
    loss = _normalise(per_token, m, loss_norm, max_len)

    with torch.no_grad():
        n_tok = m.sum().clamp(min=1.0)
        r = ratio.detach()

        def token_mean(x: torch.Tensor) -> float:
            return float((x * m).sum() / n_tok)

        low = ((r < 1.0 - clip_low) & (adv < 0)).to(m.dtype)
        high = ((r > 1.0 + clip_high) & (adv > 0)).to(m.dtype)
        stats = {
            "loss": float(loss.detach()),
            "clip_frac_low": token_mean(low),
            "clip_frac_high": token_mean(high),
            "clip_frac": token_mean(low + high),
            "ratio_mean": token_mean(r),
            "approx_kl": token_mean(kl_estimate(delta.detach(), torch.zeros_like(delta), "k3")),
            "n_tokens": float(m.sum()),
        }
        if kl_ref is not None:
            stats["kl_ref"] = token_mean(kl_ref.detach())
    return loss, stats


# ---------------------------------------------------------------------------------------------- SFT
def sft_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross entropy ``Σ m · (−log softmax(logits)[target]) / Σ m``.

    ``logits [..., V]``, ``targets [...]``, ``mask [...]`` (bool or 0/1); row ``i``'s logits predict
    ``targets[i]``, so for a sequence of tokens ``x`` the caller passes ``targets[i] = x[i+1]`` and masks the
    last row (and any prompt rows it does not train on). Masked targets may hold any value (e.g. −100).
    """
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}: "
                         "expected [..., V], [...], [...]")
    valid = mask.bool()
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # masked ids may be out of range
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
    m = valid.reshape(-1).to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1.0)


def mtp_loss(mtp_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross entropy of the MTP head, which looks one token further ahead than the main head.

    Takes the *same* ``targets`` and ``mask`` as :func:`sft_loss` (``targets[i] = x[i+1]``, the token that
    follows row ``i``, which is also what ``Transformer.run(..., mtp_ids=targets)`` feeds the MTP block).
    MTP row ``i`` predicts ``x[i+2] = targets[i+1]``, so this is ``sft_loss(mtp_logits[..., :-1, :],
    targets[..., 1:], mask[..., :-1] & mask[..., 1:])`` along the token axis (the one before ``V``; ``[N, V]``
    and ``[B, L, V]`` both work).

    Both masks must hold: ``mask[i+1]`` says the target is trained, ``mask[i]`` that row ``i`` is not the last
    of its sequence, so a flattened ragged batch never pairs a row with the next sequence's first token. The
    price is the first trained token of a span whose preceding row is masked (e.g. the first answer token
    after the prompt), which the MTP head then does not learn from.
    """
    if mtp_logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"mtp_logits {tuple(mtp_logits.shape)}, targets {tuple(targets.shape)}, mask "
                         f"{tuple(mask.shape)}: expected [..., L, V], [..., L], [..., L]")
    valid = mask.bool()
    return sft_loss(mtp_logits[..., :-1, :], targets[..., 1:], valid[..., :-1] & valid[..., 1:])


# ---------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, lr: float, *, warmup_steps: int, schedule: Schedule, total_steps: int,
          min_lr_ratio: float) -> float:
    """The learning rate of (0-based) ``step``: linear warm-up over ``warmup_steps``, then ``lr`` (constant)
    or a cosine decay to ``min_lr_ratio · lr`` at ``total_steps``. A function of the step alone, so a
    resumed run continues exactly."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

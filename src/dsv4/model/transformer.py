"""The DeepSeek-V4 model: embedding, mHC blocks, hc head, norm, head, and the MTP block (spec §3, §7).

The forward is written once over a flat :class:`~dsv4.core.batch.ForwardBatch`: a dense ``[B, S]``
call, a training step and a paged, chunked inference step all run the same layer code; only the
attention backend's plan (and whether a KV pool is attached) differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsv4.attention.rope import rope_inv_freq
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import AttentionBackend, ExpertExecutor, KernelSet, KVPool, RoutingTrace
from dsv4.core.numerics import KernelChoice
from dsv4.core.plugins import PluginChoice
from dsv4.model.attention import Attention, RMSNorm, StepContext
from dsv4.model.linear import Linear
from dsv4.model.moe import MoE

__all__ = ["Block", "MTPBlock", "ModelOutput", "Transformer"]


def _hc_params(rows: int, cols: int, n_scales: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """mHC ``fn [rows, cols]``, ``base [rows]`` and ``scale [n_scales]`` (checkpoint names ``*_fn`` …)."""
    return (
        nn.Parameter(torch.empty(rows, cols, dtype=torch.float32)),
        nn.Parameter(torch.zeros(rows, dtype=torch.float32)),
        nn.Parameter(torch.ones(n_scales, dtype=torch.float32)),
    )


class Block(nn.Module):
    """Attention and MoE sublayers, each wrapped in an mHC pre/post around the residual streams."""

    def __init__(self, config: ModelConfig, layer_id: int, ratio: int, *, hashed: bool, fake_quant: bool) -> None:
        super().__init__()
        self.layer_id = layer_id
        n, dim = config.hc_mult, config.hidden_size
        self.rms_eps, self.hc_eps, self.sinkhorn_iters = config.rms_norm_eps, config.hc_eps, config.hc_sinkhorn_iters
        self.attn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.attn = Attention(config, layer_id, ratio, fake_quant=fake_quant)
        self.ffn = MoE(config, hashed=hashed)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _hc_params((2 + n) * n, n * dim, 3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _hc_params((2 + n) * n, n * dim, 3)

    def forward(
        self, h: torch.Tensor, input_ids: torch.Tensor, ctx: StepContext, executor: ExpertExecutor
    ) -> torch.Tensor:
        """Streams ``h [T, n, D]`` -> ``[T, n, D]``."""
        k = ctx.kernels
        x, post, comb = self._hc_pre(h, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, k)
        h = k.hc_post(self.attn(self.attn_norm(x, k), ctx), h, post, comb)
        x, post, comb = self._hc_pre(h, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, k)
        f = self.ffn(self.ffn_norm(x, k), input_ids, executor, ctx, self.layer_id)
        return k.hc_post(f, h, post, comb)

    def _hc_pre(
        self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, k: KernelSet
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return k.hc_pre(h, fn, base, scale, rms_eps=self.rms_eps, hc_eps=self.hc_eps,
                        sinkhorn_iters=self.sinkhorn_iters)


class MTPBlock(Block):
    """Multi-token prediction: streams at position i + embedding of token i+1 predict token i+2."""

    def __init__(self, config: ModelConfig, layer_id: int, *, fake_quant: bool) -> None:
        super().__init__(config, layer_id, 0, hashed=False, fake_quant=fake_quant)
        dim, n = config.hidden_size, config.hc_mult
        self.e_proj = Linear(dim, dim)
        self.h_proj = Linear(dim, dim)
        self.enorm = RMSNorm(dim, config.rms_norm_eps)
        self.hnorm = RMSNorm(dim, config.rms_norm_eps)
        self.norm = RMSNorm(dim, config.rms_norm_eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(n, n * dim, 1)

    def predict(
        self,
        h: torch.Tensor,
        next_embed: torch.Tensor,
        next_ids: torch.Tensor,
        ctx: StepContext,
        executor: ExpertExecutor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main-model streams ``h [T, n, D]`` and ``embed(next_ids) [T, D]`` -> the normed output ``[T, D]``
        the head reads, and the block's own streams ``[T, n, D]`` (what a recursive draft feeds back as
        ``h`` one position further on)."""
        k = ctx.kernels
        x = self.h_proj(self.hnorm(h, k), k) + self.e_proj(self.enorm(next_embed, k), k).unsqueeze(1)
        x = Block.forward(self, x, next_ids, ctx, executor)
        y = k.hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, rms_eps=self.rms_eps,
                      hc_eps=self.hc_eps)
        out: torch.Tensor = self.norm(y, k)
        return out, x


@dataclass(slots=True)
class ModelOutput:
    """Logits of the batch's sampled rows, the final residual streams of every row, MTP logits."""

    logits: torch.Tensor  # [N, V], N = len(sample_index) (or T)
    hidden: torch.Tensor  # [T, n, D], before hc_head
    mtp_logits: list[torch.Tensor]  # per MTP block, [N, V]
    # "indexer_kl": mean over ratio-4 layers; "seq_balance": mean over learned-routing MoE layers
    aux_losses: dict[str, torch.Tensor]
    expert_load: dict[int, torch.Tensor]  # MoE layer id (MTP blocks' included) -> routed tokens per expert [E]


class Transformer(nn.Module):
    """DeepSeek-V4. Call it on ``input_ids [B, S]`` for logits ``[B, S, vocab]``, or :meth:`run` a batch."""

    main_inv_freq: torch.Tensor
    compress_inv_freq: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        *,
        attention_backend: AttentionBackend | None = None,
        expert_executor: ExpertExecutor | None = None,
        kernels: KernelChoice | None = None,
        fake_quant: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.fake_quant = fake_quant
        dim, n = config.hidden_size, config.hc_mult
        self.embed = nn.Embedding(config.vocab_size, dim)
        self.layers = nn.ModuleList(
            Block(config, i, config.compress_ratio(i), hashed=config.mlp_layer_types[i] == "hash_moe",
                  fake_quant=fake_quant)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(dim, config.rms_norm_eps)
        self.head = Linear(dim, config.vocab_size)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(n, n * dim, 1)
        self.mtp = nn.ModuleList(
            MTPBlock(config, config.num_hidden_layers + i, fake_quant=fake_quant)
            for i in range(config.num_nextn_predict_layers)
        )
        self._rope_buffers()
        if attention_backend is None or expert_executor is None or kernels is None:
            from dsv4.model.loading import build_plugins

            built = build_plugins(config, torch.device("cpu"))
            attention_backend = attention_backend or built[0]
            expert_executor = expert_executor or built[1]
            kernels = kernels or built[2]
        self.attn_backend: AttentionBackend = attention_backend
        self.expert_executor: ExpertExecutor = expert_executor
        self.kernels: KernelChoice = kernels

    def _rope_buffers(self) -> None:
        """(Re)compute the rope tables; they are derived, so not saved with the weights."""
        cfg = self.config
        main = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, None)
        compress = rope_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
        device = self.embed.weight.device
        self.register_buffer("main_inv_freq", main.to(device), persistent=False)
        self.register_buffer("compress_inv_freq", compress.to(device), persistent=False)
        for module in self.modules():
            if isinstance(module, Attention):
                for comp in (module.compressor, module.indexer.compressor if module.indexer else None):
                    if comp is not None:
                        comp.register_buffer("inv_freq", compress.to(device).clone(), persistent=False)

    # ------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` for every position of the whole sequences ``input_ids [B, S]``."""
        b, s = input_ids.shape
        return self.run(ForwardBatch.dense(input_ids)).logits.view(b, s, -1)

    def run(
        self,
        batch: ForwardBatch,
        pool: KVPool | None = None,
        *,
        mtp_ids: torch.Tensor | None = None,
        indexer_loss: bool = False,
        balance_loss: bool = False,
        routing: RoutingTrace | None = None,
    ) -> ModelOutput:
        """One step over a ragged batch; with ``pool`` the KV cache is read and extended.

        ``mtp_ids [T]``, if given, is the token that follows each row (the MTP block's input); the
        MTP logits then predict the token after that. ``indexer_loss`` asks the backend for the
        lightning indexer's training objective (``aux_losses["indexer_kl"]``), the only path by which
        gradients reach the indexer. ``balance_loss`` computes DeepSeek-V3's sequence-wise MoE balance
        loss (``aux_losses["seq_balance"]``; a sequence is a request of the batch). ``routing`` records
        (or, with ``replay``, imposes) every layer's expert and indexer choices.
        """
        if batch.parents is not None:
            if "shared_prefix" not in self.attn_backend.capabilities:
                raise ValueError(f"attention backend {self.attn_backend.name!r} cannot read prefixes from "
                                 "other requests of the batch (capability 'shared_prefix')")
            if mtp_ids is not None:  # a parent's last row would need one next token per child
                raise ValueError("MTP logits are not defined for a batch whose requests share prefixes (parents)")
        ctx = self.step_context(batch, pool)
        ctx.routing = routing
        if indexer_loss:
            ctx.aux = {}
        if balance_loss:
            ctx.balance = []
        k, ids = ctx.kernels, batch.input_ids
        h = self.embed(ids).unsqueeze(1).expand(-1, self.config.hc_mult, -1)  # [T, n, D]
        for layer in self.layers:
            h = layer(h, ids, ctx, self.expert_executor)
        rows = h if batch.sample_index is None else h[batch.sample_index]
        logits = self.head(self.norm(self._hc_head(rows, k), k), k)
        mtp_logits = []
        if mtp_ids is not None:
            next_embed = self.embed(mtp_ids)
            for block in self.mtp:
                assert isinstance(block, MTPBlock)
                y, _ = block.predict(h, next_embed, mtp_ids, ctx, self.expert_executor)
                mtp_logits.append(self.head(y if batch.sample_index is None else y[batch.sample_index], k))
        aux = {name: torch.stack(v).mean() for name, v in (ctx.aux or {}).items()}
        if ctx.balance:
            aux["seq_balance"] = torch.stack(ctx.balance).mean()
        return ModelOutput(logits=logits, hidden=h, mtp_logits=mtp_logits, aux_losses=aux,
                           expert_load=ctx.expert_load)

    def run_mtp(self, batch: ForwardBatch, hidden: torch.Tensor, pool: KVPool | None = None) -> ModelOutput:
        """The first MTP block alone (speculative drafts): row ``i`` holds streams ``hidden[i] [n, D]`` at
        position ``batch.positions[i]`` (the main model's there, or the block's own one position back)
        and ``batch.input_ids[i]``, the token after that position. With ``pool`` the block's window rows
        at those positions are written. ``logits`` (sampled rows) predict the token after the input;
        ``hidden`` is the block's streams, to feed back for the next draft."""
        block = self.mtp[0]
        assert isinstance(block, MTPBlock)
        ctx = self.step_context(batch, pool)
        y, streams = block.predict(hidden, self.embed(batch.input_ids), batch.input_ids, ctx, self.expert_executor)
        rows = y if batch.sample_index is None else y[batch.sample_index]
        return ModelOutput(logits=self.head(rows, ctx.kernels), hidden=streams, mtp_logits=[], aux_losses={},
                           expert_load=ctx.expert_load)

    def step_context(self, batch: ForwardBatch, pool: KVPool | None = None) -> StepContext:
        """Plan the step once: its kernel set (by step mode), backend metadata and the rope tables."""
        k, pos = self.kernels.for_step(), batch.positions
        return StepContext(
            kernels=k,
            backend=self.attn_backend,
            metadata=self.attn_backend.plan(batch, pool, k),
            positions=pos,
            seq_index=batch.req_index,
            num_seqs=batch.num_requests,
            rope={"main": k.rope_cis(pos, self.main_inv_freq), "compress": k.rope_cis(pos, self.compress_inv_freq)},
        )

    @property
    def plugins(self) -> PluginChoice:
        """The names of the plugins this model runs with."""
        return PluginChoice(self.attn_backend.name, self.expert_executor.name, self.kernels.names())

    def use_plugins(self, choice: PluginChoice, options: Mapping[str, Any] | None = None) -> None:
        """Run with the plugins ``choice`` names (see :func:`dsv4.core.plugins.choose_plugins`): an
        attention backend or expert executor of another name is replaced, the kernel sets are rebuilt
        with ``options``; batch-invariant mode is kept."""
        from dsv4.model.loading import build_plugins

        device = self.embed.weight.device
        backend, executor, kernels = build_plugins(self.config, device, choice, options)
        if backend.name != self.attn_backend.name:
            self.attn_backend = backend
        if executor.name != self.expert_executor.name:
            self.expert_executor = executor
        kernels.batch_invariant.max_context = self.kernels.batch_invariant.max_context
        kernels.invariant = self.kernels.invariant
        self.kernels = kernels

    @property
    def invariant(self) -> bool:
        """Whether every step is batch-invariant (:meth:`set_batch_invariant`)."""
        return self.kernels.invariant

    def set_batch_invariant(self, enabled: bool = True, *, max_context: int | None = None) -> None:
        """Make every token's numbers independent of its batch (and of prefill vs decode).

        Every step then runs the ``batch_invariant`` kernel set (matmuls in fixed row tiles), attention
        reads fixed-width gathers sized for ``max_context`` tokens, experts run in a batch-independent
        order. Slower; used so that rollout logprobs equal the trainer's recomputation exactly. The
        attention backend and expert executor must declare the ``"batch_invariant"`` capability.
        """
        if enabled:
            if max_context is None:
                raise ValueError("batch-invariant mode needs max_context (the longest sequence it will see)")
            for plugin in (self.attn_backend, self.expert_executor):
                if "batch_invariant" not in plugin.capabilities:
                    raise ValueError(f"{type(plugin).__name__} ({plugin.name!r}) is not batch-invariant")
        self.kernels.batch_invariant.max_context = max_context if enabled else None
        self.kernels.invariant = enabled

    def _hc_head(self, h: torch.Tensor, k: KernelSet) -> torch.Tensor:
        return k.hc_head(h, self.hc_head_fn, self.hc_head_base, self.hc_head_scale,
                         rms_eps=self.config.rms_norm_eps, hc_eps=self.config.hc_eps)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Deterministic random initialisation for models trained from scratch and for tests."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("_base") or leaf in ("attn_sink", "ape"):
                p.zero_()
            elif leaf.endswith("_scale") or (leaf == "weight" and p.dim() == 1):
                p.fill_(1.0)
            elif generator is None or generator.device == p.device:
                p.normal_(0.0, std, generator=generator)
            else:  # drawn on the generator's device: a CUDA model gets the weights its CPU twin gets
                p.copy_(torch.empty(p.shape, dtype=p.dtype, device=generator.device).normal_(0.0, std, generator=generator))
        for module in self.modules():
            if isinstance(module, MoE):
                gate = module.gate
                if gate.tid2eid is not None:
                    n_exp = gate.weight.shape[0]
                    noise = torch.rand(gate.tid2eid.shape[0], n_exp, generator=generator)
                    gate.tid2eid.copy_(noise.argsort(dim=-1)[:, : gate.top_k])
                if gate.bias is not None:
                    gate.bias.zero_()

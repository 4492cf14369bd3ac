"""MoE load balancing while training: DeepSeek's auxiliary-loss-free bias update, and expert-load metrics.

Each learned-routing gate has a bias added to the affinities for the top-k choice only (never to the
combine weights: :meth:`dsv4.kernels.reference.ReferenceKernels.route`). After every optimizer step
the bias of each expert that got more than its layer's mean number of routed tokens in that step goes
down by ``speed``, and of each that got fewer goes up by ``speed`` (DeepSeek-V3, arXiv 2412.19437,
§2.1.2; γ = 0.001 there). Hash-routed layers have no bias and are left alone. The bias is a buffer of
the model, so checkpoints, resume and weight syncs carry it like any weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dsv4.model import Transformer
from dsv4.model.transformer import Block

__all__ = ["ExpertBalancer", "load_metrics"]


class ExpertBalancer:
    """Collects the routed-token counts of a step's forwards (:meth:`observe`) and, after the optimizer
    step, moves the gate biases and reports the step's load metrics (:meth:`step`)."""

    def __init__(self, model: Transformer, speed: float) -> None:
        if speed < 0:
            raise ValueError(f"bias_update_speed must be >= 0, got {speed}")
        self.speed = speed
        self.gates = {m.layer_id: m.ffn.gate for m in model.modules() if isinstance(m, Block)}  # MTP blocks too
        self.load: dict[int, torch.Tensor] = {}

    def observe(self, load: Mapping[int, torch.Tensor]) -> None:
        """Add one forward's routed tokens per expert (``ModelOutput.expert_load``) to the step's."""
        for layer, counts in load.items():
            counts = counts.detach().to(torch.int64)  # summed where the model runs: no host read per layer
            self.load[layer] = self.load[layer] + counts if layer in self.load else counts

    @torch.no_grad()
    def step(self) -> dict[str, object]:
        """Apply the bias update for the observed load (``speed`` 0: biases frozen) and return the step's
        metrics (:func:`load_metrics`); the next step starts from no load."""
        if self.speed > 0:
            for layer, counts in self.load.items():
                bias = self.gates[layer].bias
                if bias is None:  # hash routing: nothing to balance
                    continue
                counts = counts.to(bias.device, torch.float32)
                bias.add_(torch.sign(counts.mean() - counts), alpha=self.speed)
        # the metrics read the counts on the host: every layer's in one transfer
        host = torch.stack(list(self.load.values())).cpu() if self.load else None
        metrics = load_metrics(dict(zip(self.load, host, strict=True)) if host is not None else {})
        self.load = {}
        return metrics


def load_metrics(load: Mapping[int, torch.Tensor]) -> dict[str, object]:
    """Expert-load metrics of routed-token counts per layer: ``moe/load_max_over_mean`` (the busiest
    expert's tokens over the layer's mean, averaged over layers; 1 is perfectly even), the same per layer
    (``moe/layer<L>/load_max_over_mean``), ``moe/dead_expert_share`` (experts, over all layers, that got
    no token) and ``moe/load`` (the counts themselves, ``{layer: [tokens per expert]}``: the heatmap's)."""
    if not load:
        return {}
    ratios: dict[str, object] = {}
    dead = total = 0
    for layer in sorted(load):
        counts = load[layer].to(torch.float64)
        mean = float(counts.mean())
        ratios[f"moe/layer{layer}/load_max_over_mean"] = float(counts.max()) / mean if mean > 0 else 0.0
        dead += int((counts == 0).sum())
        total += counts.numel()
    per_layer = [float(v) for v in ratios.values() if isinstance(v, float)]
    return {
        "moe/load_max_over_mean": sum(per_layer) / len(per_layer),
        **ratios,
        "moe/dead_expert_share": dead / total,
        "moe/load": {str(layer): load[layer].tolist() for layer in sorted(load)},
    }

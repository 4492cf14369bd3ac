"""The model on CUDA: the same checkpoint's logits as on the CPU (within 1e-4), for inference and training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import RoutingTrace
from dsv4.rl.policy import weights_checksum
from dsv4.testing.models import random_model

TOL = 1e-4
VOCAB = 512


def _ids() -> torch.Tensor:
    # two sequences of 45 tokens: dense blocks (32 new tokens or more), entries in every compressed stream
    return torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("plugins", ["reference", "auto"])
def test_logits_match_the_cpu_model(checkpoint: Path, plugins: str) -> None:
    cpu = dsv4.load_model(checkpoint)
    gpu = dsv4.load_model(checkpoint, device="cuda", attention_backend=plugins, expert_executor=plugins,
                          kernels=plugins)
    assert gpu.embed.weight.is_cuda
    ids = _ids()
    with torch.no_grad():
        want, got = cpu(ids), gpu(ids.cuda())
    assert got.is_cuda
    assert (got.cpu() - want).abs().max().item() <= TOL, gpu.plugins


def test_training_forward_and_backward_match_the_cpu_model(checkpoint: Path) -> None:
    """Autograd kernels, MTP logits, the indexer and balance losses, routing records and gradients."""
    ids = _ids()
    nxt = torch.cat([torch.cat((row[1:], row[:1])) for row in ids])  # the token after each row (MTP input)
    results = []
    for device in ("cpu", "cuda"):
        model = dsv4.load_model(checkpoint, device=device).train()
        batch = ForwardBatch.from_requests([row.to(device) for row in ids], sample="all", device=device)
        trace = RoutingTrace()
        out = model.run(batch, mtp_ids=nxt.to(device), indexer_loss=True, balance_loss=True, routing=trace)
        loss = out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean() + sum(out.aux_losses.values())
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out, trace, grads))
    (want, want_trace, want_grads), (got, got_trace, got_grads) = results
    assert got.logits.is_cuda and got_grads.is_cuda
    assert (got.logits.cpu() - want.logits).abs().max().item() <= TOL
    assert (got.mtp_logits[0].cpu() - want.mtp_logits[0]).abs().max().item() <= TOL
    assert sorted(got.aux_losses) == sorted(want.aux_losses) == ["indexer_kl", "seq_balance"]
    for name, value in want.aux_losses.items():
        assert abs(got.aux_losses[name].item() - value.item()) <= TOL, name
    for layer, counts in want.expert_load.items():  # counted on the device, no bincount
        assert torch.equal(got.expert_load[layer].cpu(), counts), layer
    for layer, picks in want_trace.experts.items():
        assert torch.equal(got_trace.experts[layer].cpu(), picks), layer
    assert (got_grads.cpu() - want_grads).abs().max().item() <= TOL * max(1.0, want_grads.abs().max().item())


def test_a_model_built_on_cuda_has_the_cpu_models_weights() -> None:
    # the seeded initialisation draws on its (CPU) generator: the same bytes on either device
    cfg = ModelConfig.tiny()
    assert weights_checksum(dsv4.build_model(cfg, seed=3, device="cuda")) == weights_checksum(
        dsv4.build_model(cfg, seed=3))
    assert weights_checksum(random_model(cfg, seed=3, device="cuda")) == weights_checksum(random_model(cfg, seed=3))

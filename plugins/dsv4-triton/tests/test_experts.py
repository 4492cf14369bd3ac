"""The ``triton`` expert executor against the reference executor (under the interpreter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv4.kernels import ReferenceKernels
from dsv4.model.moe import Expert
from dsv4.moe.reference import ReferenceExpertExecutor
from dsv4.testing.contracts import check_expert_executor
from dsv4_triton.experts import TritonExpertExecutor

INFERENCE = ReferenceKernels(None, "cpu", "inference")


def _experts(n: int, dim: int, inter: int, limit: float, seed: int = 0) -> nn.ModuleList:
    g = torch.Generator().manual_seed(seed)
    experts = nn.ModuleList(Expert(dim, inter, limit) for _ in range(n))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[1] ** 0.5)
    return experts


def _routing(tokens: int, n_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    busy = max(top_k, n_experts - 2)  # the last experts get no token
    idx = torch.stack([torch.randperm(busy, generator=g)[:top_k] for _ in range(tokens)])
    return idx, torch.rand(tokens, top_k, generator=g)


@pytest.mark.parametrize("tokens", [1, 3, 7, 40])  # 40: experts with several tiles of 16 rows
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_matches_the_reference_executor(tokens: int, top_k: int, limit: float) -> None:
    experts = _experts(5, 37, 21, limit)
    x = torch.randn(tokens, 37, generator=torch.Generator().manual_seed(tokens))
    idx, w = _routing(tokens, 5, top_k, seed=tokens + top_k)
    with torch.no_grad():
        got = TritonExpertExecutor().forward(experts, x, idx, w, limit, INFERENCE)
        want = ReferenceExpertExecutor().forward(experts, x, idx, w, limit, INFERENCE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stacked_weights_follow_weight_updates() -> None:
    experts, executor = _experts(3, 16, 16, 0.0), TritonExpertExecutor()
    x, (idx, w) = torch.randn(5, 16), _routing(5, 3, 2, seed=0)
    with torch.no_grad():
        before = executor.forward(experts, x, idx, w, 0.0, INFERENCE)
        for p in experts.parameters():
            p.mul_(2)  # an optimizer step or a weight sync: the weights' versions change
        after = executor.forward(experts, x, idx, w, 0.0, INFERENCE)
        want = ReferenceExpertExecutor().forward(experts, x, idx, w, 0.0, INFERENCE)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_no_tokens() -> None:
    idx = torch.zeros(0, 2, dtype=torch.long)
    out = TritonExpertExecutor().forward(_experts(3, 16, 16, 0.0), torch.zeros(0, 16), idx, torch.zeros(0, 2), 0.0,
                                         INFERENCE)
    assert out.shape == (0, 16)


def test_contract() -> None:
    check_expert_executor(TritonExpertExecutor)

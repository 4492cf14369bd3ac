"""The mHC Sinkhorn: the native forward/backward kernels are PyTorch's own arithmetic, bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dsv4.core.config import ModelConfig
from dsv4.kernels import mhc
from dsv4.native import available, kernels
from dsv4.testing.models import random_model

pytestmark = pytest.mark.skipif(not available(), reason="native kernels unavailable (no C compiler)")


def _comb(t: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(t, n, n, generator=g) * 5, dim=-1) + 1e-6


def test_the_kernel_path_is_taken_here() -> None:
    assert mhc._kernel_matches_loop()
    assert mhc._exact_kernel(_comb(3, 4, 0))
    assert not mhc._exact_kernel(_comb(3, 5, 0))  # longer sums: PyTorch's loop


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("t, iters", [(1, 20), (2, 1), (129, 3), (1000, 20)])
def test_values_and_gradients_equal_the_autograd_loop(n: int, t: int, iters: int) -> None:
    comb = _comb(t, n, seed=n * 1000 + t).requires_grad_(True)
    grad = torch.randn(t, n, n, generator=torch.Generator().manual_seed(t))
    ref = mhc._sinkhorn_loop(comb, iters, 1e-6)
    ref.backward(grad)
    want = comb.grad
    comb.grad = None
    out = mhc.sinkhorn(comb, iters, 1e-6)
    assert out.grad_fn is not None and "Sinkhorn" in type(out.grad_fn).__name__  # the kernel, not the loop
    out.backward(grad)
    assert torch.equal(out, ref)
    assert torch.equal(comb.grad, want)
    with torch.no_grad():  # inference (and batch-invariant rollouts) take the same kernel
        assert torch.equal(mhc.sinkhorn(comb, iters, 1e-6), ref)


def test_inputs_are_not_modified_and_wrong_shapes_are_refused() -> None:
    comb = _comb(5, 4, 1)
    before = comb.clone()
    mhc.sinkhorn(comb, 20, 1e-6)
    assert torch.equal(comb, before)
    with pytest.raises(ValueError, match="comb must be"):
        kernels.sinkhorn(torch.ones(2, 3, 4), 2, 1e-6)
    out, saved = kernels.sinkhorn(comb, 3, 1e-6, save=True)
    assert saved is not None
    with pytest.raises(ValueError, match="do not fit"):
        kernels.sinkhorn_backward(comb, saved[:1], out, 3, 1e-6)


def test_model_gradients_are_unchanged_by_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole model's loss and every parameter's gradient: kernel on == kernel off, bit for bit."""
    cfg = ModelConfig.tiny()
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = random_model(cfg, seed=1)
        model.train()
        loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    loss_kernel, with_kernel = grads()
    monkeypatch.setattr(mhc, "_exact_kernel", lambda comb: False)
    loss_loop, with_loop = grads()
    assert torch.equal(loss_kernel, loss_loop)
    assert with_kernel.keys() == with_loop.keys()
    for name, g in with_kernel.items():
        assert torch.equal(g, with_loop[name]), name


def test_the_first_call_may_come_under_inference_mode() -> None:
    """The once-per-process check runs its own autograd whatever mode its first caller is in."""
    code = textwrap.dedent("""
        import torch
        from dsv4.kernels import mhc
        with torch.inference_mode():
            c = torch.softmax(torch.randn(3, 4, 4), -1) + 1e-6
            mhc.sinkhorn(c, 20, 1e-6)
        print(mhc._kernel_matches_loop())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"

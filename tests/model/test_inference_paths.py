"""Inference-only fast paths (MKL-packed linears of the ``cpu`` kernel set, in-place Sinkhorn, fused mHC
products, attention over unconcatenated parts) agree with the training arithmetic, and stay out of
training and batch-invariant mode."""

from __future__ import annotations

import pytest
import torch

from dsv4.attention import ops
from dsv4.core.config import ModelConfig
from dsv4.kernels import CpuKernels, ReferenceKernels
from dsv4.kernels.mhc import hc_post, hc_pre
from dsv4.kernels.packed import MAX_PACKED_ROWS, MIN_PACKED_ROWS, PackedWeight, mkl_packing_available
from dsv4.model.fused import FusedProjection
from dsv4.model.linear import Linear
from dsv4.testing.models import random_model

needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")
PACKED = CpuKernels(mode="inference", options={"native_kernels": False})  # MKL packing only
PLAIN = ReferenceKernels(mode="inference")


def _packing(layer: Linear | FusedProjection) -> PackedWeight | None:
    packed = layer.cache.get("mkl_packed")
    assert packed is None or isinstance(packed, PackedWeight)
    return packed


def _linear(n_in: int, n_out: int, seed: int = 0) -> Linear:
    lin = Linear(n_in, n_out)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=torch.Generator().manual_seed(seed))
    return lin


@needs_mkl
@pytest.mark.parametrize("rows", [1, MIN_PACKED_ROWS, 7, 64, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1])
@pytest.mark.parametrize("shape", [(512, 512), (256, 1000), (48, 24)])
def test_packed_linear_matches_plain(rows: int, shape: tuple[int, int]) -> None:
    lin = _linear(*shape)
    x = torch.randn(rows, shape[0], generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        plain = lin(x, PLAIN)
        packed = lin(x, PACKED)
        packed_3d = lin(x.view(1, rows, -1), PACKED)
    if MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS:
        assert _packing(lin) is not None, "the packed path was not taken"
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    else:
        assert _packing(lin) is None, "rows outside the packed range must use the plain product"
        assert torch.equal(packed, plain)
    torch.testing.assert_close(packed_3d.view(rows, -1), packed, rtol=0, atol=0)


@needs_mkl
def test_packed_weight_follows_weight_updates() -> None:
    lin = _linear(64, 32)
    x = torch.randn(8, 64)
    with torch.no_grad():
        first = lin(x, PACKED)
        lin.weight.mul_(-2.0)  # in place, like an optimizer step or a weight sync
        torch.testing.assert_close(lin(x, PACKED), -2.0 * first, rtol=1e-5, atol=1e-5)
        lin.weight.data = torch.randn(32, 64)  # swapped storage
        torch.testing.assert_close(lin(x, PACKED), x @ lin.weight.t(), rtol=1e-5, atol=1e-5)
    lin.weight = torch.nn.Parameter(torch.randn(32, 64))  # a new Parameter object
    with torch.no_grad():
        torch.testing.assert_close(lin(x, PACKED), x @ lin.weight.t(), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_packed_fused_projection_follows_member_updates() -> None:
    a, b = _linear(64, 16, seed=1), _linear(64, 24, seed=2)
    fused = FusedProjection([a, b])
    x = torch.randn(8, 64)
    for _ in range(3):  # repeated updates: a stale packing must never be served
        with torch.inference_mode():
            ya, yb = fused(x, PACKED)
            torch.testing.assert_close(ya, x @ a.weight.t(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(yb, x @ b.weight.t(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            b.weight.add_(1.0)


@needs_mkl
def test_packed_path_never_runs_under_autograd() -> None:
    lin = _linear(64, 32)
    x = torch.randn(8, 64)
    y = lin(x, PACKED)  # grad mode on: the kernel set takes the plain product
    assert _packing(lin) is None
    y.sum().backward()
    assert lin.weight.grad is not None


@needs_mkl
def test_model_packing_is_off_in_batch_invariant_mode() -> None:
    model = random_model(ModelConfig.tiny(num_nextn_predict_layers=0), seed=0)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.set_batch_invariant(True, max_context=32)
    with torch.no_grad():
        before = model(ids)
        model.kernels.inference = PACKED  # what an engine's "auto" would choose for inference steps
        after = model(ids)
    assert torch.equal(before, after), "invariant mode must keep its exact arithmetic"
    assert not any(_packing(m) for m in model.modules() if isinstance(m, Linear))
    model.set_batch_invariant(False)
    with torch.no_grad():
        plain_forward = model(ids)
    torch.testing.assert_close(plain_forward, before, rtol=1e-4, atol=1e-4)


def _mhc_inputs(t: int, n: int = 4, d: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(t)
    h = torch.randn(t, n, d, generator=g)
    fn = torch.randn((2 + n) * n, n * d, generator=g) * 0.1
    base = torch.randn((2 + n) * n, generator=g) * 0.1
    scale = torch.rand(3, generator=g) + 0.5
    return h, fn, base, scale


@pytest.mark.parametrize("t", [1, 5, 64])
def test_inference_mhc_equals_training_mhc(t: int) -> None:
    h, fn, base, scale = _mhc_inputs(t)
    kw = dict(rms_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)
    fn_train = fn.clone().requires_grad_(True)
    x_t, post_t, comb_t = hc_pre(h, fn_train, base, scale, **kw)  # type: ignore[arg-type]
    f = torch.randn(t, h.shape[-1])
    out_t = hc_post(f, h, post_t, comb_t)
    with torch.no_grad():
        x_i, post_i, comb_i = hc_pre(h, fn, base, scale, **kw, inference=True)  # type: ignore[arg-type]
        out_i = hc_post(f, h, post_i, comb_i, inference=True)
    assert torch.equal(comb_i, comb_t.detach()), "the in-place Sinkhorn must be the same arithmetic"
    assert torch.equal(post_i, post_t.detach())
    torch.testing.assert_close(x_i, x_t.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_i, out_t.detach(), rtol=1e-6, atol=1e-6)


def test_sink_attention_parts_equals_concatenated() -> None:
    g = torch.Generator().manual_seed(0)
    t, h, d = 6, 4, 16
    q = torch.randn(t, h, d, generator=g)
    kvs = [torch.randn(t, 9, d, generator=g), torch.randn(t, 5, d, generator=g)]
    valids = [torch.rand(t, 9, generator=g) > 0.3, torch.rand(t, 5, generator=g) > 0.5]
    valids[0][:, -1] = True
    sink = torch.randn(h, generator=g)
    ref, _ = ops.sink_attention(q, torch.cat(kvs, 1), torch.cat(valids, 1), sink, d**-0.5)
    out = ops.sink_attention_parts(q, kvs, valids, sink, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)

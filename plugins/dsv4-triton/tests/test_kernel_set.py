"""The ``triton`` kernel set: each kernel against the reference kernel set on small odd shapes (under
the interpreter), and the shared contract."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import ReferenceKernels
from dsv4.model.fused import FusedProjection
from dsv4.model.linear import Linear
from dsv4.testing.contracts import check_kernel_set
from dsv4_triton.kernel_set import TritonKernels

ROWS = [1, 3, 7]
KS = TritonKernels(None, "cpu", "inference")
REF = ReferenceKernels(None, "cpu", "inference")


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Same dtype and shape, values within ``tol`` of the reference's scale (summation orders differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k, n", [(37, 29), (16, 100), (75, 1)])
def test_linear(rows: int, k: int, n: int) -> None:
    lin = Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(_rand(n, k, seed=k))
        x = _rand(rows, 2, k, seed=rows)  # leading dims are flattened
        _close(KS.linear(x, lin), REF.linear(x, lin))


def test_linear_stacks_the_weights_of_a_fused_projection() -> None:
    parts = [Linear(19, 5), Linear(19, 11)]
    with torch.no_grad():
        for i, p in enumerate(parts):
            p.weight.copy_(_rand(*p.weight.shape, seed=i))
        fused, x = FusedProjection(parts), _rand(7, 19, seed=9)
        got = KS.linear(x, fused)
        _close(got, torch.cat([REF.linear(x, p) for p in parts], dim=-1))


@pytest.mark.parametrize("rows", ROWS)
def test_grouped_linear(rows: int) -> None:
    lin = Linear(19, 3 * 5)  # 3 groups of 5 rows
    with torch.no_grad():
        lin.weight.copy_(_rand(15, 19, seed=0))
        x = _rand(rows, 3, 19, seed=rows)
        _close(KS.grouped_linear(x, lin), REF.grouped_linear(x, lin))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", [1, 33, 100])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(rows: int, d: int, weighted: bool) -> None:
    x = _rand(rows, 3, d, seed=d, scale=3.0)
    w = 1 + 0.1 * _rand(d, seed=1) if weighted else None
    _close(KS.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6))


def test_rms_norm_of_a_strided_view() -> None:
    x = _rand(7, 40, seed=0)[:, ::2]  # last dim not contiguous
    _close(KS.rms_norm(x, None, 1e-6), REF.rms_norm(x, None, 1e-6))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape, pairs", [((3, 14), 3), ((16,), 8), ((2, 5, 10), 1)])  # even d: the reference's
@pytest.mark.parametrize("inverse", [False, True])
def test_rope(rows: int, shape: tuple[int, ...], pairs: int, inverse: bool) -> None:
    x = _rand(rows, *shape, seed=rows)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(pairs, dtype=torch.float32) / pairs))
    cis = REF.rope_cis(torch.arange(rows) * 5 + 2, inv_freq)
    got = KS.rope(x, cis, inverse=inverse)
    _close(got, REF.rope(x, cis, inverse=inverse))
    assert torch.equal(got[..., : shape[-1] - 2 * pairs], x[..., : shape[-1] - 2 * pairs])  # copied as is


@pytest.mark.parametrize("rows", [*ROWS, 17])  # 17: two tiles of tokens
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("iters", [1, 20])
def test_hc_pre(rows: int, n: int, iters: int) -> None:
    d = 24
    h, fn = _rand(rows, n, d, seed=rows), _rand((2 + n) * n, n * d, seed=n, scale=0.3)
    base, scale = _rand((2 + n) * n, seed=2), 1 + 0.1 * _rand(3, seed=3)
    kw = {"rms_eps": 1e-6, "hc_eps": 1e-6, "sinkhorn_iters": iters}
    got, want = KS.hc_pre(h, fn, base, scale, **kw), REF.hc_pre(h, fn, base, scale, **kw)
    for a, b in zip(got, want, strict=True):
        _close(a, b)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [1, 3, 4])
def test_hc_post(rows: int, n: int) -> None:
    d = 37
    f, h = _rand(rows, d, seed=0), _rand(rows, n, d, seed=1)
    post = 2 * torch.sigmoid(_rand(rows, n, seed=2))
    comb = torch.softmax(_rand(rows, n, n, seed=3), dim=-1)
    _close(KS.hc_post(f, h, post, comb), REF.hc_post(f, h, post, comb))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [1, 3, 4])
def test_hc_head(rows: int, n: int) -> None:
    d = 33
    h, fn = _rand(rows, n, d, seed=rows), _rand(n, n * d, seed=n, scale=0.3)
    base, scale = _rand(n, seed=2), 1 + 0.1 * _rand(1, seed=3)
    kw = {"rms_eps": 1e-6, "hc_eps": 1e-6}
    _close(KS.hc_head(h, fn, base, scale, **kw), REF.hc_head(h, fn, base, scale, **kw))


@pytest.mark.parametrize("rows", [*ROWS, 17])
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("routing", ["learned", "replayed", "hashed"])
def test_route(rows: int, score_func: str, routing: str) -> None:
    experts, top_k, d = 7, 3, 37
    x, weight = _rand(rows, d, seed=rows), _rand(experts, d, seed=1, scale=0.5)
    bias = None if routing == "hashed" else 0.3 * _rand(experts, seed=2)
    imposed = None
    if routing != "learned":
        imposed = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(r))[:top_k]
                               for r in range(rows)])
        if routing == "replayed":
            imposed[::2] = -1  # even rows computed, odd rows replayed
    kw = {"score_func": score_func, "top_k": top_k, "route_scale": 1.5}
    (w, ids), (w_ref, ids_ref) = KS.route(x, weight, bias, imposed, **kw), REF.route(x, weight, bias, imposed, **kw)
    assert ids.dtype == ids_ref.dtype and torch.equal(ids, ids_ref)
    _close(w, w_ref)


def test_route_softplus_far_from_zero() -> None:
    # logits beyond softplus's threshold (20: the identity) and far below it (log1p of a tiny exp)
    x, weight = torch.tensor([[30.0], [-30.0], [0.5]]), torch.tensor([[1.0], [0.5], [-1.0], [2.0]])
    bias = torch.zeros(4)
    kw = {"score_func": "sqrtsoftplus", "top_k": 2, "route_scale": 1.0}
    (w, ids), (w_ref, ids_ref) = KS.route(x, weight, bias, None, **kw), REF.route(x, weight, bias, None, **kw)
    assert torch.equal(ids, ids_ref)
    _close(w, w_ref)


def test_route_breaks_ties_by_the_lowest_id() -> None:
    x, weight = torch.zeros(3, 8), torch.randn(6, 8)  # every logit 0: every score the same
    for func in ("sqrtsoftplus", "sigmoid", "softmax"):
        _, ids = KS.route(x, weight, torch.zeros(6), None, score_func=func, top_k=3, route_scale=1.0)
        assert ids.tolist() == [[0, 1, 2]] * 3


def test_route_without_bias_needs_imposed_ids() -> None:
    with pytest.raises(ValueError, match="hash routing"):
        KS.route(torch.zeros(2, 4), torch.zeros(3, 4), None, None, score_func="sigmoid", top_k=2, route_scale=1.0)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("limit", [0.0, 2.5])
def test_swiglu(rows: int, limit: float) -> None:
    h = _rand(rows, 2 * 37, seed=rows, scale=4.0)
    gate, up = h.chunk(2, dim=-1)  # row-strided views, as a fused projection's split gives
    _close(KS.swiglu(gate, up, limit), REF.swiglu(gate, up, limit))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("vocab", [50, 1500])  # 1500: several blocks of the online logsumexp
def test_token_logprobs(rows: int, vocab: int) -> None:
    logits = _rand(rows, vocab, seed=rows, scale=5.0)
    tokens = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0))
    _close(KS.token_logprobs(logits, tokens), REF.token_logprobs(logits, tokens))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_storage(dtype: torch.dtype) -> None:
    # fp32 arithmetic on half-precision tensors, results in their dtype: within two of its roundings.
    rtol = 2 * torch.finfo(dtype).eps
    x, h = _rand(7, 37, seed=0, scale=2.0).to(dtype), _rand(7, 3, 22, seed=1).to(dtype)
    cis = REF.rope_cis(torch.arange(7), torch.rand(5, generator=torch.Generator().manual_seed(0)))
    w = 1 + 0.1 * _rand(37, seed=2)
    for got, want in [
        (KS.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6)),
        (KS.rope(h, cis), REF.rope(h, cis)),
        (KS.swiglu(x, x.flip(0), 2.5), REF.swiglu(x, x.flip(0), 2.5)),
        (KS.token_logprobs(x, torch.arange(7)), REF.token_logprobs(x, torch.arange(7))),
    ]:
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=4 * rtol)
    if dtype == torch.float16:  # bf16 products cannot be checked here: the interpreter's tl.dot reads bf16 as integers
        lin = Linear(37, 29)
        with torch.no_grad():
            lin.weight.copy_(_rand(29, 37, seed=3, scale=0.2))
        lin = lin.to(dtype)
        torch.testing.assert_close(KS.linear(x, lin), REF.linear(x, lin), rtol=rtol, atol=4 * rtol)


def test_empty_inputs() -> None:
    lin = Linear(8, 4)
    assert KS.linear(torch.zeros(0, 8), lin).shape == (0, 4)
    assert KS.rms_norm(torch.zeros(0, 8), None, 1e-6).shape == (0, 8)
    x, post, comb = KS.hc_pre(torch.zeros(0, 2, 8), torch.zeros(8, 16), torch.zeros(8), torch.ones(3),
                              rms_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=3)
    assert (x.shape, post.shape, comb.shape) == ((0, 8), (0, 2), (0, 2, 2))
    w, ids = KS.route(torch.zeros(0, 8), torch.zeros(4, 8), torch.zeros(4), None, score_func="sigmoid", top_k=2,
                      route_scale=1.0)
    assert w.shape == ids.shape == (0, 2)


def test_contract() -> None:
    check_kernel_set(TritonKernels)

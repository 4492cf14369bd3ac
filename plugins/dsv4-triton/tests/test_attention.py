"""The ``triton`` attention backend and its kernels against the reference (under the interpreter)."""

from __future__ import annotations

import pytest
import torch

from dsv4.attention import ops
from dsv4.kernels import ReferenceKernels
from dsv4.testing.contracts import check_attention_backend
from dsv4_triton.attention import TritonAttentionBackend
from dsv4_triton.ops import attention as kernels

INFERENCE = ReferenceKernels(None, "cpu", "inference")


def _gathered(
    q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """ops.sink_attention over the gathered, concatenated rows (the training arithmetic)."""
    kv = torch.cat([store[rows.masked_fill(~valid, 0)] for store, rows, valid in parts], dim=1)
    valid = torch.cat([valid for _, _, valid in parts], dim=1)
    return ops.sink_attention(q, kv, valid, sink, scale)[0]


@pytest.mark.parametrize("heads", [1, 3, 17])  # 17: two programs of 16 heads
@pytest.mark.parametrize("dim", [16, 24])
@pytest.mark.parametrize("n_parts", [1, 2])
def test_sink_attention(heads: int, dim: int, n_parts: int) -> None:
    g = torch.Generator().manual_seed(heads * 100 + dim + n_parts)
    t = 7
    parts = []
    for j, rows in zip(range(n_parts), (37, 70), strict=False):
        store = torch.randn(rows, dim, generator=g)
        slots = torch.randint(0, rows, (t, 5 + 31 * j), generator=g)  # 36 picks: two blocks of 32
        valid = torch.rand(t, 5 + 31 * j, generator=g) > 0.3
        valid[0] = False  # a token that sees nothing but the sink: its output is 0
        slots[1, ~valid[1]] = 10**9  # masked slots may be out of range: they must not be read
        parts.append((store, slots, valid))
    q, sink = torch.randn(t, heads, dim, generator=g) * 2, torch.randn(heads, generator=g)
    got = kernels.sink_attention(q, parts, sink, dim**-0.5)
    torch.testing.assert_close(got, _gathered(q, parts, sink, dim**-0.5), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], torch.zeros_like(got[0]))


def test_sink_attention_extreme_scores() -> None:
    # Scores spanning far more than exp's range: the softmax must stay finite and exact in the limit.
    g = torch.Generator().manual_seed(0)
    store = torch.randn(50, 32, generator=g)
    parts = [(store, torch.arange(50).expand(4, 50), torch.ones(4, 50, dtype=torch.bool))]
    q, sink = torch.randn(4, 2, 32, generator=g) * 200, torch.tensor([-1e4, 1e4])  # no sink mass / all of it
    got = kernels.sink_attention(q, parts, sink, 32**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _gathered(q, parts, sink, 32**-0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overlap, ratio", [(True, 4), (True, 12), (False, 8), (False, 3), (False, 40)])  # 24, 40: chunks
@pytest.mark.parametrize("entries", [1, 3])
@pytest.mark.parametrize("c, rope_dim", [(32, 16), (16, 16), (24, 6)])
def test_compress_entries(overlap: bool, ratio: int, entries: int, c: int, rope_dim: int) -> None:
    g = torch.Generator().manual_seed(ratio * 10 + entries + c)
    coff = 2 if overlap else 1
    rows = torch.randn(40, 2 * coff * c, generator=g)  # stored [kv | score] rows
    slots = torch.randint(0, 40, (entries, coff * ratio), generator=g)
    valid = torch.ones(entries, coff * ratio, dtype=torch.bool)
    if overlap:
        valid[0, :ratio] = False  # block 0 has no previous block
        slots[0, :ratio] = 10**9  # so those slots are never read
    ape, norm = torch.randn(ratio, coff * c, generator=g), 1 + 0.1 * torch.randn(c, generator=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    positions = torch.arange(entries) * ratio + 5
    got = kernels.compress_entries(rows, slots, valid, ape=ape, norm_weight=norm, eps=1e-6,
                                   cis=INFERENCE.rope_cis(positions, inv_freq), overlap=overlap)
    want = ops.compress_entries(rows[slots.masked_fill(~valid, 0)], valid, ape=ape, norm_weight=norm, eps=1e-6,
                                positions=positions, inv_freq=inv_freq, overlap=overlap, kernels=INFERENCE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3, 7])
@pytest.mark.parametrize("heads, dim", [(16, 16), (5, 24)])
def test_index_scores_and_topk(tokens: int, heads: int, dim: int) -> None:
    g = torch.Generator().manual_seed(tokens + heads)
    keys = torch.randn(30, dim, generator=g)
    # Distinct keys per token: one key at two positions ties exactly in the reference's scores (ranked to
    # the lower position) but may differ in the last bit in the kernel's, which would rank them the other way.
    rows = torch.stack([torch.randperm(30, generator=g)[:21] for _ in range(tokens)])
    valid = torch.rand(tokens, 21, generator=g) > 0.4
    rows[~valid] = 10**9  # masked entries are never read
    q, w = torch.randn(tokens, heads, dim, generator=g), torch.randn(tokens, heads, generator=g)
    got = kernels.index_scores(q, w, keys, rows, valid)
    top, top_valid, top_scores = ops.indexer_topk(q, w, keys[rows.masked_fill(~valid, 0)], valid, 5)
    want = torch.relu(torch.einsum("thc,tnc->thn", q, keys[rows.masked_fill(~valid, 0)])) * dim**-0.5
    want = (want * w.unsqueeze(-1)).sum(1).masked_fill(~valid, float("-inf"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    picked = ops.select_topk(got, valid, 5)
    assert torch.equal(picked[1], top_valid)
    assert torch.equal(picked[0], top)  # masked picks too: the ranking is a total order


def test_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    # and each kernel serves it: the inference steps of the check run them (decode, chunks, full forward)
    calls: dict[str, int] = {}
    for name in ("sink_attention", "compress_entries", "index_scores"):
        def counted(*args, _name=name, _f=getattr(kernels, name), **kwargs):  # type: ignore[no-untyped-def]
            calls[_name] = calls.get(_name, 0) + 1
            return _f(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    check_attention_backend(TritonAttentionBackend)
    assert set(calls) == {"sink_attention", "compress_entries", "index_scores"}

"""The cached (paged) path: chunked prefill and token-by-token decode equal the full forward."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.cache.paged import PagedKVPool
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.model import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    return dsv4.build_model(ModelConfig.tiny(), seed=11).eval()


def _pool(model: Transformer, page_size: int = 4) -> PagedKVPool:
    return PagedKVPool.for_capacity(model.attn_backend.kv_streams(), 256, 4, page_size=page_size)


@torch.no_grad()
def _run_chunks(model: Transformer, pool: PagedKVPool, rid: int, ids: torch.Tensor, chunks: Sequence[int]) -> torch.Tensor:
    """Feed ``ids [S]`` through the cache in chunks; logits of every position."""
    out, pos = [], 0
    for n in chunks:
        pool.reserve(rid, pos + n)
        batch = ForwardBatch.from_requests([ids[pos : pos + n]], [pos], rids=[rid], sample="all")
        out.append(model.run(batch, pool).logits)
        pos += n
        pool.release(rid, pos)
    assert pos == ids.shape[0]
    return torch.cat(out)


def _ids(n: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_every_split_point_equals_full_forward(model: Transformer) -> None:
    ids = _ids(21, 0)  # 5 CSA blocks, 2 HCA blocks, window of 8 slides
    with torch.no_grad():
        full = model(ids[None])[0]
    for split in range(1, 21):
        got = _run_chunks(model, _pool(model), 0, ids, [split, 21 - split])
        assert (got - full).abs().max().item() <= 1e-5, f"split at {split}"


def test_token_by_token_decode_equals_full_forward(model: Transformer) -> None:
    ids = _ids(50, 1)
    with torch.no_grad():
        full = model(ids[None])[0]
    pool = _pool(model)
    got = _run_chunks(model, pool, 3, ids, [1] * 50)
    assert (got - full).abs().max().item() <= 1e-5
    # The sliding window recycles pages: a 50-token request holds only the last W(=8) rows + a page.
    assert pool.pages_used("win") <= 3
    pool.release(3)
    assert all(pool.pages_used(s) == 0 for s in pool.streams)


def test_mixed_batch_equals_separate_requests(model: Transformer) -> None:
    """A step mixing a prefill chunk, a decode token and a long extend gives each request's own logits."""
    seqs = [_ids(n, 10 + n) for n in (19, 30, 9)]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
    pool = _pool(model)
    prefix = [13, 29, 0]  # prefill those first, request by request
    for rid, (s, p) in enumerate(zip(seqs, prefix)):
        if p:
            _run_chunks(model, pool, rid, s[:p], [p])
    for rid, s in enumerate(seqs):
        pool.reserve(rid, s.shape[0])
    batch = ForwardBatch.from_requests(
        [s[p:] for s, p in zip(seqs, prefix)], prefix, rids=[0, 1, 2], sample="all"
    )
    with torch.no_grad():
        logits = model.run(batch, pool).logits
    for r, (s, p) in enumerate(zip(seqs, prefix)):
        rows = logits[batch.starts[r] : batch.starts[r] + batch.extend_lens[r]]
        assert (rows - full[r][p:]).abs().max().item() <= 1e-5


def test_dense_batch_equals_unbatched(model: Transformer) -> None:
    ids = torch.stack([_ids(33, 20), _ids(33, 21)])
    with torch.no_grad():
        both = model(ids)
        assert (both[0] - model(ids[:1])[0]).abs().max().item() <= 1e-5
        assert (both[1] - model(ids[1:])[0]).abs().max().item() <= 1e-5


def test_cached_decode_matches_transformers(tmp_path: Path) -> None:
    oracle = pytest.importorskip("dsv4.testing.oracle")
    hf = oracle.make_hf_checkpoint(tmp_path, seed=5)
    model = dsv4.load_model(tmp_path)
    ids = _ids(40, 2, hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids[None], use_cache=False).logits[0]
    got = _run_chunks(model, _pool(model), 0, ids, [11] + [1] * 29)
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_paged_batch_requires_cache_metadata(model: Transformer) -> None:
    batch = ForwardBatch.from_requests([[1, 2]], [3])
    with pytest.raises(ValueError, match="needs a KV pool"):
        model.run(batch)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("paged", [False, True])
def test_dense_and_gather_paths_agree(model: Transformer, paged: bool, backend_name: str) -> None:
    """The backend's two ways to attend (per-token gathers, dense blocks) give the same numbers (the
    ``cpu`` backend's native kernels in both, the indexer's top-k streamed over the keys in dense blocks)."""
    from dsv4.attention.cpu import CpuAttentionBackend
    from dsv4.attention.reference import ReferenceAttentionBackend

    backend_cls = {"reference": ReferenceAttentionBackend, "cpu": CpuAttentionBackend}[backend_name]
    ids = torch.stack([_ids(70, 30), _ids(70, 31)])
    outs = []
    for dense_min in (1, 10**9):
        backend = backend_cls(model.config, dense_min_tokens=dense_min)
        backend.dense_block = 16  # several query blocks per chunk
        model.attn_backend = backend
        with torch.no_grad():
            if not paged:
                outs.append(model(ids).reshape(-1, model.config.vocab_size))
                continue
            pool = _pool(model)
            rows = [_run_chunks(model, pool, r, ids[r], [40, 3, 27]) for r in range(2)]
            outs.append(torch.cat(rows))
    model.attn_backend = ReferenceAttentionBackend(model.config)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_native_chunked_prefill_equals_one_pass() -> None:
    """The ``cpu`` backend: a prompt prefilled in one chunk, in long chunks (queries sharing their keys in
    the streamed top-k) or token by token (each token its own keys) picks the same entries, in the same
    order, everywhere and gives the same logits."""
    from dsv4.attention.cpu import CpuAttentionBackend
    from dsv4.core.interfaces import RoutingTrace
    from dsv4.kernels import CpuKernels

    cfg = ModelConfig.tiny(index_topk=8)
    model = dsv4.build_model(cfg, seed=4).eval()
    model.attn_backend = CpuAttentionBackend(cfg)
    model.kernels.inference = CpuKernels(cfg)
    ids = _ids(150, 7)  # 37 ratio-4 entries: most queries choose 8 of more
    runs = []
    for chunks in ([150], [64, 33, 1, 52], [1] * 150):
        pool, traces, logits, pos = _pool(model), [], [], 0
        for n in chunks:
            pool.reserve(0, pos + n)
            trace = RoutingTrace()
            batch = ForwardBatch.from_requests([ids[pos : pos + n]], [pos], rids=[0], sample="all")
            with torch.no_grad():
                logits.append(model.run(batch, pool, routing=trace).logits)
            traces.append(trace.indexer)
            pos += n
        picks = {lid: torch.cat([t[lid] for t in traces]) for lid in traces[0]}
        runs.append((torch.cat(logits), picks))
    for logits, picks in runs[1:]:
        assert (logits - runs[0][0]).abs().max().item() <= 1e-5
        for lid, got in picks.items():
            assert torch.equal(got, runs[0][1][lid]), f"layer {lid}: picks differ"

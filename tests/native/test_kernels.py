"""dsv4.native: the fused CPU kernels agree with the PyTorch paths they replace, the model and the
engine use them only where they apply, and a machine without a working compiler falls back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dsv4 import native
from dsv4.attention import ops
from dsv4.attention.cpu import CpuAttentionBackend
from dsv4.attention.reference import ReferenceAttentionBackend
from dsv4.core.config import ModelConfig
from dsv4.kernels import CpuKernels, ReferenceKernels
from dsv4.native import kernels
from dsv4.testing.contracts import check_attention_backend
from dsv4.testing.models import random_model


def test_the_kernels_build_here() -> None:
    # CI has a C compiler: a failure here is a real build problem, not a reason to skip.
    assert native.available(), native.unavailable_reason()


def _gather_reference(q, parts, sink, scale):  # type: ignore[no-untyped-def]
    """ops.sink_attention over the gathered, concatenated rows (the training arithmetic)."""
    kv = torch.cat([store[slots.clamp(0, store.shape[0] - 1)] for store, slots, _ in parts], dim=1)
    valid = torch.cat([valid for _, _, valid in parts], dim=1)
    return ops.sink_attention(q, kv, valid, sink, scale)[0]


@pytest.mark.parametrize("heads", [1, 3, 8, 12])
@pytest.mark.parametrize("dim", [16, 64, 128])
@pytest.mark.parametrize("n_parts", [1, 2])
def test_sink_attention_matches_gathered_reference(heads: int, dim: int, n_parts: int) -> None:
    g = torch.Generator().manual_seed(heads * 1000 + dim + n_parts)
    t = 9
    parts = []
    for j, rows in zip(range(n_parts), (37, 70), strict=False):
        store = torch.randn(rows, dim, generator=g)
        slots = torch.randint(0, rows, (t, 5 + 7 * j), generator=g)
        valid = torch.rand(t, 5 + 7 * j, generator=g) > 0.3
        valid[0] = False  # a token that sees nothing but the sink: its output is 0
        slots[1, ~valid[1]] = 10**9  # masked slots may be out of range: they must not be read
        parts.append((store, slots, valid))
    q = torch.randn(t, heads, dim, generator=g) * 2
    sink = torch.randn(heads, generator=g)
    with torch.no_grad():
        got = kernels.sink_attention(q, parts, sink, dim**-0.5)
        clean = [(s, sl.masked_fill(~v, 0), v) for s, sl, v in parts]
        want = _gather_reference(q, clean, sink, dim**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # summation order differs
    assert torch.equal(got[0], torch.zeros_like(got[0]))


def test_sink_attention_extreme_scores() -> None:
    # Scores spanning far more than exp's range: the softmax must stay finite and exact in the limit.
    g = torch.Generator().manual_seed(0)
    store = torch.randn(50, 32, generator=g)
    slots = torch.arange(50).expand(4, 50)
    valid = torch.ones(4, 50, dtype=torch.bool)
    q = torch.randn(4, 2, 32, generator=g) * 200
    sink = torch.tensor([-1e4, 1e4])  # no sink mass / all sink mass
    with torch.no_grad():
        got = kernels.sink_attention(q, [(store, slots, valid)], sink, 32**-0.5)
        want = _gather_reference(q, [(store, slots, valid)], sink, 32**-0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sink_attention_rejects_bad_input() -> None:
    store, slots, valid = torch.randn(4, 24), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad(), pytest.raises(ValueError, match="multiple of 16"):
        kernels.sink_attention(torch.randn(2, 1, 24), [(store, slots, valid)], torch.zeros(1), 1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="float32"):
        kernels.sink_attention(torch.randn(2, 1, 16).double(), [(torch.randn(4, 16), slots, valid)],
                               torch.zeros(1), 1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="slots"):
        kernels.sink_attention(torch.randn(2, 1, 16), [(torch.randn(4, 16), slots[:1], valid)], torch.zeros(1), 1.0)


def _mhc_inputs(t: int, n: int, d: int, seed: int, expanded: bool):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, d, generator=g).unsqueeze(1).expand(-1, n, -1) if expanded else torch.randn(t, n, d, generator=g)
    fn = torch.randn((2 + n) * n, n * d, generator=g) * 0.05
    base = torch.randn((2 + n) * n, generator=g) * 0.3
    scale = torch.rand(3, generator=g) + 0.5
    return h, fn, base, scale


@pytest.mark.parametrize("n", [1, 2, 4, 5])
@pytest.mark.parametrize("expanded", [False, True])
def test_hc_pre_post_match_pytorch(n: int, expanded: bool) -> None:
    h, fn, base, scale = _mhc_inputs(7, n, 48, n, expanded)  # D = 48: three 16-wide vectors
    kw = dict(rms_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)
    f = torch.randn(7, 48)
    plain, fast = ReferenceKernels(mode="inference"), CpuKernels()
    with torch.no_grad():
        want = plain.hc_pre(h, fn, base, scale, **kw)
        got = fast.hc_pre(h, fn, base, scale, **kw)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.hc_post(f, h, want[1], want[2]), plain.hc_post(f, h, want[1], want[2]),
                                   rtol=1e-5, atol=1e-6)


def test_native_kernels_serve_inference_only() -> None:
    cfg = ModelConfig.tiny()
    assert CpuKernels.refuse(cfg, torch.device("cpu"), "inference") is None
    for mode in ("autograd", "batch_invariant"):
        assert "inference" in str(CpuKernels.refuse(cfg, torch.device("cpu"), mode))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cpu"):
            CpuKernels(cfg, "cpu", mode)  # type: ignore[arg-type]
    assert "CPU only" in str(CpuKernels.refuse(cfg, torch.device("meta"), "inference"))
    h, fn, base, scale = _mhc_inputs(5, 4, 32, 0, False)
    fn.requires_grad_(True)
    x, _, comb = CpuKernels().hc_pre(h, fn, base, scale, rms_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)
    assert x.requires_grad and comb.requires_grad  # called with autograd on anyway: the PyTorch path


def test_cpu_backend_meets_the_attention_contract() -> None:
    check_attention_backend(CpuAttentionBackend)


def test_native_model_matches_reference_on_a_paged_decode() -> None:
    """Chunked prefill then decode through the pool: the native model's logits equal the plain one's."""
    from dsv4.cache.paged import PagedKVPool
    from dsv4.core.batch import ForwardBatch

    cfg = ModelConfig.tiny()
    ref = random_model(cfg, seed=3)
    fast = random_model(cfg, seed=3)
    fast.attn_backend = CpuAttentionBackend(cfg, "cpu")
    fast.kernels.inference = CpuKernels(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    pools = [PagedKVPool.for_capacity(m.attn_backend.kv_streams(), 160, 3, page_size=4) for m in (ref, fast)]
    pos = 0
    with torch.no_grad():
        for n in (13, 1, 9, 1, 1, 15):  # prefill chunks and decode steps, some inside compression blocks
            outs = []
            for model, pool in zip((ref, fast), pools, strict=True):
                for rid in range(3):
                    pool.reserve(rid, pos + n)
                batch = ForwardBatch.from_requests([ids[r, pos : pos + n] for r in range(3)], [pos] * 3,
                                                   rids=[0, 1, 2], sample="all")
                outs.append(model.run(batch, pool).logits)
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
            pos += n


def _run(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_disabled_by_environment_falls_back(tmp_path: Path) -> None:
    out = _run("""
        from dsv4 import native
        from dsv4.core.config import ModelConfig
        from dsv4.model import build_model
        print(native.available(), native.unavailable_reason())
        print(build_model(ModelConfig.tiny(), attention_backend="auto").attn_backend.name)
    """, DSV4_NATIVE="0", DSV4_CACHE_DIR=str(tmp_path))
    assert out.splitlines() == ["False disabled by DSV4_NATIVE=0", "reference"]


def test_a_failing_compiler_falls_back_with_its_reason(tmp_path: Path) -> None:
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc: error: no such compiler feature' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = _run("""
        import torch
        from dsv4 import native
        from dsv4.kernels import CpuKernels
        print(native.available())
        print(native.unavailable_reason())
        h = torch.randn(3, 2, 16); fn = torch.randn(8, 32); base = torch.zeros(8); scale = torch.ones(3)
        with torch.no_grad():  # the kernel set takes its PyTorch path
            x, _, _ = CpuKernels().hc_pre(h, fn, base, scale, rms_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=3)
        print(tuple(x.shape))
    """, CC=str(fake), DSV4_CACHE_DIR=str(tmp_path / "cache"))
    lines = out.splitlines()
    assert lines[0] == "False"
    assert "fakecc" in lines[1] and "no such compiler feature" in lines[1]
    assert lines[2] == "(3, 16)"


def test_builds_are_cached_per_source_and_machine(tmp_path: Path) -> None:
    code = """
        from dsv4 import native
        assert native.available(), native.unavailable_reason()
        print(sorted(p.name for p in native.cache_dir().iterdir()))
    """
    first = _run(code, DSV4_CACHE_DIR=str(tmp_path))
    second = _run(code, DSV4_CACHE_DIR=str(tmp_path))
    assert first == second and first.count(".so") == 1  # built once, then reused; no temporary left


def test_rms_norm_matches_pytorch() -> None:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 3, 200, generator=g) * 3
    x = wide[..., 40:140]  # rows with a stride: a split projection's view
    w = torch.randn(100, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
        unit = kernels.rms_norm(x, None, 1e-6)
        torch.testing.assert_close(unit, x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        kernels.rms_norm(x, w[:5], 1e-6)


def test_native_kernels_are_off_in_batch_invariant_mode() -> None:
    model = random_model(ModelConfig.tiny(), seed=0, kernels="auto")
    assert model.kernels.names() == {"autograd": "reference", "inference": "cpu", "batch_invariant": "batch_invariant"}
    with torch.no_grad():
        assert model.kernels.for_step().name == "cpu"
        model.set_batch_invariant(True, max_context=64)
        assert model.kernels.for_step().name == "batch_invariant"


def _experts(cfg: ModelConfig, seed: int = 0):  # type: ignore[no-untyped-def]
    return random_model(cfg, seed=seed).layers[1].ffn.experts


@pytest.mark.parametrize("tokens,k,limit", [(1, 1, 0.0), (5, 2, 7.0), (40, 3, 0.0), (70, 2, 2.5)])
def test_cpu_executor_matches_reference(tokens: int, k: int, limit: float) -> None:
    from dsv4.moe.cpu import CpuExpertExecutor
    from dsv4.moe.reference import ReferenceExpertExecutor

    cfg = ModelConfig.tiny(num_experts_per_tok=k, swiglu_limit=limit)  # the experts' own limit too
    experts = _experts(cfg)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden_size, generator=g) * 3
    # Skewed routing: expert 0 gets more than one 16-row block, the last expert none.
    idx = torch.stack([torch.randperm(len(experts) - 1, generator=g)[:k] for _ in range(tokens)])
    idx[: tokens // 2, 0] = 0
    w = torch.rand(tokens, k, generator=g)
    executor = CpuExpertExecutor(cfg)
    with torch.no_grad():
        inference = ReferenceKernels(cfg, "cpu", "inference")
        want = ReferenceExpertExecutor(cfg).forward(experts, x, idx, w, limit, inference)
        got = executor.forward(experts, x, idx, w, limit, inference)
        again = executor.forward(experts, x, idx, w, limit, inference)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # outputs of magnitude ~10-100
    assert torch.equal(got, again)  # deterministic whatever the thread schedule


def test_cpu_executor_follows_weight_updates() -> None:
    from dsv4.moe.cpu import CpuExpertExecutor
    from dsv4.moe.reference import ReferenceExpertExecutor

    cfg = ModelConfig.tiny()
    experts = _experts(cfg)
    x = torch.randn(6, cfg.hidden_size)
    idx = torch.zeros(6, cfg.num_experts_per_tok, dtype=torch.long)
    idx[:, 1:] = 1
    w = torch.ones(6, cfg.num_experts_per_tok)
    executor = CpuExpertExecutor(cfg)
    ks = ReferenceKernels(cfg, "cpu", "inference")
    with torch.no_grad():
        lim = cfg.swiglu_limit
        before = executor.forward(experts, x, idx, w, lim, ks)
        experts[0].w2.weight.mul_(2.0)  # an optimizer step / weight sync, in place
        after = executor.forward(experts, x, idx, w, lim, ks)
        experts[1].w1.weight = torch.nn.Parameter(experts[1].w1.weight * -1)  # a replaced Parameter
        replaced = executor.forward(experts, x, idx, w, lim, ks)
        want = ReferenceExpertExecutor(cfg).forward(experts, x, idx, w, lim, ks)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(replaced, want, rtol=1e-4, atol=1e-4)


def test_cpu_executor_leaves_training_to_the_reference_loop() -> None:
    from dsv4.moe.cpu import CpuExpertExecutor

    cfg = ModelConfig.tiny()
    experts = _experts(cfg)
    x = torch.randn(4, cfg.hidden_size, requires_grad=True)
    idx = torch.zeros(4, cfg.num_experts_per_tok, dtype=torch.long)
    out = CpuExpertExecutor(cfg).forward(experts, x, idx, torch.ones(4, cfg.num_experts_per_tok), 0.0,
                                         ReferenceKernels(cfg, "cpu", "autograd"))
    out.sum().backward()
    assert x.grad is not None and experts[0].w1.weight.grad is not None


def test_engine_auto_picks_native_plugins(tmp_path: Path) -> None:
    import dsv4
    from dsv4 import Engine

    cfg = ModelConfig.tiny()
    dsv4.save_model(random_model(cfg, seed=0), tmp_path)
    fast = Engine(tmp_path)
    assert (fast.model.attn_backend.name, fast.model.expert_executor.name) == ("cpu", "cpu")
    plain = Engine(tmp_path, native_kernels=False)
    assert (plain.model.attn_backend.name, plain.model.expert_executor.name) == ("reference", "grouped")
    invariant = Engine(tmp_path, batch_invariant=True)
    assert (invariant.model.attn_backend.name, invariant.model.expert_executor.name) == ("reference", "reference")
    prompts = [[5, 6, 7, 8, 9] * 7, [11, 12, 13] * 5]
    params = dsv4.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in fast.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert a == b


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 24), (7, 64)])
def test_rope_matches_pytorch(inverse: bool, shape: tuple[int, ...]) -> None:
    from dsv4.attention.rope import apply_rope, rope_cis, rope_inv_freq

    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g)
    cis = rope_cis(torch.arange(100, 100 + shape[0]) * 37, rope_inv_freq(16, 10000.0, None))
    with torch.no_grad():
        want = apply_rope(x, cis, inverse=inverse)
        got = CpuKernels().rope(x, cis, inverse=inverse)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.data_ptr() != x.data_ptr()  # a copy, as the PyTorch path


@pytest.mark.parametrize("overlap", [False, True])
def test_compress_entries_matches_pytorch(overlap: bool) -> None:
    from dsv4.attention.rope import rope_cis, rope_inv_freq

    g = torch.Generator().manual_seed(int(overlap))
    m, c, rd = 4, 32, 16
    coff = 2 if overlap else 1
    rows = torch.randn(50, 2 * coff * c, generator=g) * 2
    slots = torch.randint(0, 50, (6, coff * m), generator=g)
    valid = torch.ones(6, coff * m, dtype=torch.bool)
    if overlap:
        valid[0, :m] = False  # block 0 has no previous block
        slots[0, :m] = 10**9  # and its missing slots are never read
    ape = torch.randn(m, coff * c, generator=g)
    norm = torch.rand(c, generator=g) + 0.5
    inv_freq = rope_inv_freq(rd, 10000.0, None)
    positions = torch.arange(6) * m
    with torch.no_grad():
        want = ops.compress_entries(rows[slots.clamp(max=49)], valid, ape=ape, norm_weight=norm, eps=1e-6,
                                    positions=positions, inv_freq=inv_freq, overlap=overlap,
                                    kernels=ReferenceKernels(mode="inference"))
        got = kernels.compress_entries(rows, slots, valid, ape=ape, norm_weight=norm, eps=1e-6,
                                       cis=rope_cis(positions, inv_freq), overlap=overlap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_engine_upgrades_a_passed_models_builtin_plugins_only_under_auto() -> None:
    from dsv4 import Engine

    cfg = ModelConfig.tiny()
    model = random_model(cfg, seed=0)
    assert (model.attn_backend.name, model.expert_executor.name) == ("reference", "reference")
    Engine(model)
    assert (model.attn_backend.name, model.expert_executor.name) == ("cpu", "cpu")
    kept = random_model(cfg, seed=0)
    Engine(kept, attention_backend="reference", expert_executor="reference")
    assert (kept.attn_backend.name, kept.expert_executor.name) == ("reference", "reference")
    exact = random_model(cfg, seed=0)
    Engine(exact, batch_invariant=True)
    assert (exact.attn_backend.name, exact.expert_executor.name) == ("reference", "reference")


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("hashed", [False, True])
def test_moe_gate_matches_pytorch(score_func: str, hashed: bool) -> None:
    from dsv4.model.moe import Gate

    cfg = ModelConfig.tiny(scoring_func=score_func, n_routed_experts=8, num_experts_per_tok=3)
    gate = Gate(cfg, hashed=hashed)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.normal_(0, 0.5, generator=g)
        if gate.bias is not None:
            gate.bias.normal_(0, 0.3, generator=g)
        else:
            gate.tid2eid.copy_(torch.rand(cfg.vocab_size, 8, generator=g).argsort(dim=-1)[:, :3])
    x = torch.randn(20, cfg.hidden_size, generator=g) * 4  # large logits: softplus' linear branch too
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=g)
    replay = torch.full((20, 3), -1, dtype=torch.long)
    replay[::3] = torch.tensor([7, 0, 5])
    for imposed in (None, replay):
        with torch.no_grad():
            want_w, want_i = gate(x, ids, ReferenceKernels(mode="inference"), imposed)
            got_w, got_i = gate(x, ids, CpuKernels(), imposed)
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def _indexer_case(t: int, nh: int, c: int, n: int, seed: int, zero_keys: float = 0.0):  # type: ignore[no-untyped-def]
    """Queries, head weights, a key store with ``n`` keys (a ``zero_keys`` share of them zero: scores of
    exactly 0, ties) and each token's visible count, some under k, some all."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, nh, c, generator=g)
    w = torch.randn(t, nh, generator=g) - 0.5  # mostly negative: the zero scores reach the top k
    store = torch.randn(n + 7, c, generator=g)
    store[torch.rand(n + 7, generator=g) < zero_keys] = 0.0
    limit = torch.randint(0, n + 1, (t,), generator=g)
    limit[0], limit[-1] = n, 3
    return q, w, store, limit


def _reference_topk(q, w, store, rows, limit, k):  # type: ignore[no-untyped-def]
    """ops.indexer_topk over each token's gathered keys (the oracle)."""
    rows = rows if rows.dim() == 2 else rows.expand(q.shape[0], -1)
    valid = torch.arange(rows.shape[1]) < limit.unsqueeze(1)
    return ops.indexer_topk(q, w, store[rows], valid, k)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("tokens, heads, dim", [(1, 16, 64), (9, 5, 24), (45, 16, 16), (70, 20, 32)])
def test_indexer_topk_matches_reference(shared: bool, tokens: int, heads: int, dim: int) -> None:
    n, k = 300, 12
    q, w, store, limit = _indexer_case(tokens, heads, dim, n, seed=tokens + heads, zero_keys=0.3)
    g = torch.Generator().manual_seed(dim)
    rows = torch.randperm(store.shape[0], generator=g)[:n]
    if not shared:  # ragged: every token reads its own rows (other requests' pages)
        rows = torch.stack([torch.randperm(store.shape[0], generator=g)[:n] for _ in range(tokens)])
        rows[torch.arange(n) >= limit.unsqueeze(1)] = 10**9  # invisible slots are never read
    with torch.no_grad():
        top, scores = kernels.indexer_topk(q, w, store, rows, limit, k)
        want_top, want_valid, want_scores = _reference_topk(q, w, store, rows.clamp(max=store.shape[0] - 1), limit, k)
    assert torch.equal(top, want_top), "picks, their order and the tie-breaks equal the reference's"
    assert torch.equal(top < limit.unsqueeze(1), want_valid)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)  # -inf where invisible, as there


def test_indexer_topk_ties_go_to_the_lower_entry() -> None:
    q, w, store, _ = _indexer_case(6, 16, 32, 200, seed=0)
    rows = torch.arange(200)
    limit = torch.tensor([200, 150, 12, 5, 0, 200])
    with torch.no_grad():
        top, scores = kernels.indexer_topk(q, torch.zeros_like(w), store, rows, limit, 8)  # every score 0
        dup, _ = kernels.indexer_topk(q, w, store, torch.zeros(200, dtype=torch.long), limit, 8)  # one key
    assert torch.equal(top, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]).expand(6, -1))
    assert torch.equal(dup, top)
    assert torch.equal(scores[3, 5:], torch.full((3,), float("-inf")))  # 5 visible, then the lowest invisible
    assert (scores[:3] == 0).all()


def test_indexer_topk_is_bit_identical_however_the_work_is_split() -> None:
    """A token's picks and scores do not depend on its batch, on whether its keys are shared, or on how
    many pieces its keys are split into (a decode step splits them over the threads)."""
    n, k = 2500, 16
    q, w, store, limit = _indexer_case(37, 16, 64, n, seed=5, zero_keys=0.1)
    rows = torch.randperm(store.shape[0], generator=torch.Generator().manual_seed(1))[:n]
    with torch.no_grad():
        shared = kernels.indexer_topk(q, w, store, rows, limit, k)
        own = kernels.indexer_topk(q, w, store, rows.expand(37, -1), limit, k)
        alone = [kernels.indexer_topk(q[i : i + 1], w[i : i + 1], store, rows, limit[i : i + 1], k) for i in range(37)]
    for got in (own, tuple(torch.cat(x) for x in zip(*alone, strict=True))):
        assert torch.equal(got[0], shared[0]) and torch.equal(got[1], shared[1])


def test_indexer_topk_rejects_bad_input() -> None:
    q, w, store = torch.randn(2, 2, 16), torch.ones(2, 2), torch.randn(10, 16)
    rows = torch.arange(5)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"outside \[0, 5\]"):
            kernels.indexer_topk(q, w, store, rows, torch.tensor([2, 6]), 3)
        with pytest.raises(ValueError, match="k = 6"):
            kernels.indexer_topk(q, w, store, rows, torch.tensor([2, 5]), 6)
        with pytest.raises(ValueError, match="slots"):
            kernels.indexer_topk(q, w, store, rows.expand(3, -1), torch.tensor([2, 5]), 3)


def test_slots_lookup_matches_the_page_tables() -> None:
    g = torch.Generator().manual_seed(5)
    table = torch.randint(1, 50, (4, 6), generator=g)
    rows = torch.tensor([2, -1, 0, 3])  # request 1 has no pages
    p = 16
    logical = torch.randint(-3, 6 * p + 40, (4, 9), generator=g)  # negatives and pages past the table
    req = torch.arange(4).unsqueeze(1)
    got = kernels.slots(req, logical, rows, table, p)
    assert got is not None
    for t in range(4):
        for j in range(9):
            r, pos = int(rows[t]), int(logical[t, j])
            page = int(table[r, pos // p]) if r >= 0 and 0 <= pos and pos // p < 6 else 0
            assert int(got[t, j]) == page * p + (pos % p if pos >= 0 else 0)
    flat = kernels.slots(torch.tensor([0, 7, -2]), torch.tensor([5, 5, 5]), rows, table, p)  # bad request ids
    assert flat is not None and flat.tolist() == [int(table[2, 0]) * p + 5, 5, 5]
    assert kernels.slots(torch.zeros(2, 3, dtype=torch.long), logical[:2, :3], rows, table, p) is None


def test_out_of_range_ids_raise_and_are_never_read() -> None:
    from dsv4.attention.rope import rope_cis, rope_inv_freq

    store = torch.randn(10, 16)
    ok = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        for bad in (10, -1):
            slots = torch.tensor([[0, 1, 2], [3, bad, 4]])
            with pytest.raises(ValueError, match="outside"):
                kernels.sink_attention(torch.randn(2, 1, 16), [(store, slots, ok)], torch.zeros(1), 1.0)
            with pytest.raises(ValueError, match="outside"):
                kernels.indexer_topk(torch.randn(2, 2, 16), torch.ones(2, 2), store, slots, torch.tensor([3, 3]), 2)
        with pytest.raises(ValueError, match="outside"):
            kernels.compress_entries(torch.randn(10, 32), torch.tensor([[0, 1, 2, 99]]), torch.ones(1, 4, dtype=torch.bool),
                                     ape=torch.zeros(4, 16), norm_weight=torch.ones(16), eps=1e-6,
                                     cis=rope_cis(torch.zeros(1), rope_inv_freq(8, 10000.0, None)), overlap=False)
        gate_up = kernels.pack_panels(torch.randn(2 * 16, 16)).expand(3, -1, -1, -1).contiguous()
        down = kernels.pack_panels(torch.randn(16, 16)).expand(3, -1, -1, -1).contiguous()
        with pytest.raises(ValueError, match="expert ids"):
            kernels.moe_experts(torch.randn(2, 16), gate_up, down, torch.tensor([[0], [3]]), torch.ones(2, 1), 0.0)
        with pytest.raises(ValueError, match="imposed"):
            kernels.moe_gate(torch.randn(2, 16), torch.randn(3, 16), None, "sigmoid", 1, 1.0, torch.tensor([[5], [-1]]))


def test_a_read_only_cache_dir_falls_back_to_a_temp_dir(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    (tmp_path / "tmp").mkdir()
    out = _run("""
        from dsv4 import native
        print(native.available(), native.library()._name)
    """, DSV4_CACHE_DIR=str(blocked), TMPDIR=str(tmp_path / "tmp"))
    ok, path = out.split()
    assert ok == "True" and path.startswith(str(tmp_path / "tmp"))

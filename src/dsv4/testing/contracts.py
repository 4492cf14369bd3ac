"""Contract checks every implementation of a core interface must pass.

dsv4 runs them over every registered implementation (``tests/test_contracts.py``); a third-party
plugin runs them on its own classes::

    from dsv4.testing.contracts import check_attention_backend
    check_attention_backend(MyBackend)

Each check compares against the pure-PyTorch reference on a tiny random model.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from dsv4.cache.paged import PagedKVPool
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.core.kv import StreamSpec
from dsv4.moe.reference import ReferenceExpertExecutor

__all__ = ["check_attention_backend", "check_expert_executor", "check_kv_pool"]


def _model(**build: Any) -> Any:
    from dsv4.testing.models import random_model

    return random_model(ModelConfig.tiny(), seed=0, **build)


def check_attention_backend(cls: type[Any], *, atol: float = 1e-4) -> None:
    """Full forward, a prefix shared in the batch (``"shared_prefix"``), chunked cached prefill and decode
    all match the reference backend (logits within ``atol``: the engine's bar; fused kernels legitimately
    sum in another order than the reference)."""
    cfg = ModelConfig.tiny()
    device = torch.device("cpu")
    if (reason := cls.refuse(cfg, device)) is not None:
        raise AssertionError(f"{cls.__name__} refuses the tiny config: {reason}")
    ref, model = _model(), _model()
    model.attn_backend = cls(cfg, device)
    ids = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids)
        assert (model(ids) - expected).abs().max().item() <= atol, "full forward differs from the reference"
        if "shared_prefix" in cls.capabilities:
            # Two continuations of ids[0]'s first 17 tokens, that prefix computed once (ForwardBatch.parents).
            other = torch.cat((ids[0, :17], ids[1, 17:])).unsqueeze(0)
            batch = ForwardBatch.from_requests([ids[0, :17], ids[0, 17:], ids[1, 17:]], [0, 17, 17], sample="all",
                                               parents=[-1, 0, 0])
            want = torch.cat((expected[0], ref(other)[0, 17:]))
            assert (model.run(batch).logits - want).abs().max().item() <= atol, "a prefix shared in the batch differs"
        if "paged" not in cls.capabilities:
            return
        streams = model.attn_backend.kv_streams()
        pool = PagedKVPool.for_capacity(streams, 128, 2, page_size=4)
        pos = 0
        for n in (7, 1, 5, 1, 1, 14):
            for rid in (0, 1):
                pool.reserve(rid, pos + n)
            batch = ForwardBatch.from_requests([ids[0, pos : pos + n], ids[1, pos : pos + n]], [pos, pos],
                                               rids=[0, 1], sample="all")
            got = model.run(batch, pool).logits.view(2, n, -1)
            assert (got - expected[:, pos : pos + n]).abs().max().item() <= atol, f"cached chunk at {pos} differs"
            pos += n
            for rid in (0, 1):
                pool.release(rid, pos)


def check_expert_executor(cls: type[Any], *, atol: float = 1e-5) -> None:
    """Outputs and gradients match the reference executor, including experts that get no token."""
    cfg = ModelConfig.tiny()
    if (reason := cls.refuse(cfg, torch.device("cpu"))) is not None:
        raise AssertionError(f"{cls.__name__} refuses the tiny config: {reason}")
    experts = _model().layers[1].ffn.experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, cfg.hidden_size, generator=g, requires_grad=True)
    idx = torch.randint(0, 2, (11, cfg.num_experts_per_tok), generator=g)  # experts 2, 3 idle
    idx[:, 1] = 1 - idx[:, 0]
    w = torch.rand(11, cfg.num_experts_per_tok, generator=g)
    want = ReferenceExpertExecutor(cfg).forward(experts, x, idx, w, cfg.swiglu_limit)
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    got = cls(cfg, torch.device("cpu")).forward(experts, x, idx, w, cfg.swiglu_limit)
    assert (got - want).abs().max().item() <= atol, "output differs from the reference executor"
    if "training" in cls.capabilities:
        (gx,) = torch.autograd.grad(got.sum(), x)
        assert (gx - gx_want).abs().max().item() <= atol, "input gradient differs from the reference"


def check_kv_pool(cls: type[Any], *, steps: int = 300, seed: int = 0) -> None:
    """Random reserve / release (and, for pools with the ``"fork"`` capability, fork) sequences never
    leak pages, never give two live rows one slot, keep every row a request may still read
    addressable, and a fork copies every row its source may still read."""
    streams = [StreamSpec("win", 4, (0, 1), keep=5), StreamSpec("ent", 4, (0,), ratio=4)]
    pool = cls(streams, {"win": 12, "ent": 6}, page_size=2)
    total = {s.name: pool.pages_used(s.name) + pool.pages_free(s.name) for s in streams}
    rng = random.Random(seed)
    lengths: dict[int, int] = {}
    forks = "fork" in cls.capabilities
    for _ in range(steps):
        rid = rng.randrange(6)
        if forks and lengths and rid not in lengths and rng.random() < 0.2:
            src = rng.choice(sorted(lengths))
            for s in streams:  # mark the source's live rows, to see them copied
                rows = torch.arange(s.keep_from(lengths[src]), s.length(lengths[src]))
                slots = pool.slots(s.name, [src], torch.zeros_like(rows), rows)
                for layer in s.layers:
                    pool.buffer(layer, s.name)[slots] = (src * 1000 + rows).float().unsqueeze(1)
            try:
                pool.fork(src, rid)
            except MemoryError:
                continue
            lengths[rid] = lengths[src]
            for s in streams:
                rows = torch.arange(s.keep_from(lengths[rid]), s.length(lengths[rid]))
                slots = pool.slots(s.name, [rid], torch.zeros_like(rows), rows)
                for layer in s.layers:
                    got = pool.buffer(layer, s.name)[slots, 0]
                    assert torch.equal(got, (src * 1000 + rows).float()), f"{s.name}: fork lost a row"
        elif rng.random() < 0.6:
            n = lengths.get(rid, 0) + rng.randint(1, 5)
            try:
                pool.reserve(rid, n)
            except MemoryError:
                continue
            lengths[rid] = n
            pool.release(rid, n)  # drop what the request no longer reads
        elif rid in lengths:
            pool.release(rid)
            del lengths[rid]
        for s in streams:
            assert pool.pages_used(s.name) + pool.pages_free(s.name) == total[s.name], f"{s.name}: pages leaked"
            live: list[int] = []
            for r, n in lengths.items():
                rows = torch.arange(s.keep_from(n), s.length(n))
                live += pool.slots(s.name, [r], torch.zeros_like(rows), rows).tolist()
            assert len(live) == len(set(live)), f"{s.name}: two live rows share a slot"
    for rid in list(lengths):
        pool.release(rid)
    assert all(pool.pages_used(s.name) == 0 for s in streams), "pages still used after every request left"


# --------------------------------------------------------------------------------------------------
# Verifiers (appended here rather than in the import block above: this check needs no torch)
# --------------------------------------------------------------------------------------------------
__all__ += ["check_verifier", "junk_verify_samples"]


def junk_verify_samples() -> list[Any]:
    """Samples no verifier should choke on: empty, None-like, huge, odd unicode, malformed references."""
    from dsv4.core.interfaces import VerifySample

    completions: list[Any] = [
        "", "None", "null", "NaN", "\x00", "\ud800 lone surrogate", "🙂 ∑ 𝔘 مرحبا \u202e reversed",
        "x" * 1_000_000, "\\boxed{" * 20_000, "```python\n" * 2_000, "{" * 50_000, "1e999999999", "9" * 5_000,
        "<think>never closed", "answer: " * 2_000, None,
    ]
    references: list[Any] = [
        {}, {"answer": None}, {"answer": 42, "tests": "not a list", "assert_tests": 5, "pattern": 7},
        {"answer": ["1", "2"], "tests": [{"input": None, "output": 1}]}, None,
    ]
    # Also a well-formed reference for every kind of verifier, so junk reaches the real checking path.
    usable = {"answer": "42", "tests": [{"input": "", "output": "42\n"}], "assert_tests": ["assert True"],
              "pattern": r"\d+"}
    samples = [VerifySample("", c, references[k % len(references)]) for k, c in enumerate(completions)]
    samples += [VerifySample("", c, usable) for c in completions]
    return samples


def check_verifier(cls: type[Any], options: Any = None, *, cases: Any = ()) -> None:
    """``cls`` behaves as the :class:`~dsv4.core.interfaces.Verifier` Protocol says.

    Its ``name`` and ``capabilities`` are well-formed, ``refuse(options)`` accepts ``options`` and
    answers junk options with a reason or ``None`` (never an exception), ``cls(**options)`` builds,
    and ``verify`` returns one well-typed result per sample, in order, without raising on
    :func:`junk_verify_samples`. ``cases`` — ``(sample, expected reward)`` pairs — are mixed among the
    junk and must get their rewards in their positions; the batch reversed gives the same verdicts.
    """
    import asyncio
    import math
    from collections.abc import Mapping

    from dsv4.core.interfaces import Verifier, VerifyResult

    options = dict(options or {})
    assert isinstance(cls.name, str) and cls.name, f"{cls.__name__}: `name` must be a non-empty str"
    caps = cls.capabilities
    assert isinstance(caps, frozenset) and all(isinstance(c, str) for c in caps), "`capabilities`: frozenset of str"
    reason = cls.refuse(options)
    assert reason is None, f"{cls.name} refuses {options!r}: {reason}"
    for junk in ({"__not_an_option__": object()}, {"timeout": "soon"}):
        answer = cls.refuse(junk)
        assert answer is None or isinstance(answer, str), f"refuse({junk!r}) returned {answer!r}"
    verifier = cls(**options)
    try:
        assert isinstance(verifier, Verifier), f"{cls.name} does not implement the Verifier Protocol"
        assert asyncio.run(verifier.verify([])) == [], "an empty batch must give an empty list"
        junk_samples = junk_verify_samples()
        batch: list[Any] = []
        expected: dict[int, float] = {}
        for k, sample in enumerate(junk_samples):
            if k < len(cases):  # known cases spread through the batch, not bunched at its start
                expected[len(batch)] = cases[k][1]
                batch.append(cases[k][0])
            batch.append(sample)
        for sample, reward in cases[len(junk_samples):]:
            expected[len(batch)] = reward
            batch.append(sample)
        results = asyncio.run(verifier.verify(batch))
        assert isinstance(results, list), f"verify returned {type(results).__name__}, not a list"
        assert len(results) == len(batch), f"{len(results)} results for {len(batch)} samples"
        for k, result in enumerate(results):
            assert isinstance(result, VerifyResult), f"result {k} is {type(result).__name__}"
            reward_ok = isinstance(result.reward, float) and math.isfinite(result.reward)
            assert reward_ok, f"result {k}: reward {result.reward!r}"
            assert isinstance(result.correct, bool), f"result {k}: correct {result.correct!r}"
            assert result.error is None or isinstance(result.error, str), f"result {k}: error {result.error!r}"
            assert isinstance(result.details, Mapping), f"result {k}: details {result.details!r}"
        for k, reward in expected.items():
            got = results[k]
            assert math.isclose(got.reward, reward, abs_tol=1e-9), f"sample {k}: reward {got.reward} != {reward}: {got}"
        again = asyncio.run(verifier.verify(batch[::-1]))[::-1]
        verdicts = [(r.reward, r.correct, r.error is None) for r in results]
        assert [(r.reward, r.correct, r.error is None) for r in again] == verdicts, "verdicts depend on batch order"
    finally:
        close = getattr(verifier, "close", None)  # optional: verifiers holding worker processes
        if callable(close):
            close()

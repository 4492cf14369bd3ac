"""Contract checks every implementation of a core interface must pass.

dsv4 runs them over every registered implementation (``tests/test_contracts.py``); a third-party
plugin runs them on its own classes::

    from dsv4.testing.contracts import check_attention_backend
    check_attention_backend(MyBackend)

The model checks compare against the pure-PyTorch reference on a tiny random model; the pool and
scheduler checks run random request streams against the rules of their Protocols.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import torch

from dsv4.cache.paged import PagedKVPool
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import (
    STEP_MODES,
    AdoptingScheduler,
    ForkingKVPool,
    KernelSet,
    ScheduledBatch,
    Scheduler,
    ResumingScheduler,
    SequenceStatus,
    SharingKVPool,
    can_adopt,
    can_resume,
)
from dsv4.core.kv import StreamSpec
from dsv4.kernels import BatchInvariantKernels, ReferenceKernels
from dsv4.moe.reference import ReferenceExpertExecutor

__all__ = ["check_attention_backend", "check_expert_executor", "check_kernel_set", "check_kv_pool", "check_scheduler"]

# The streams of the pool and scheduler checks: a sliding window (its rows freed as it slides) and
# compressed entries (one row per 4 tokens, never freed).
_STREAMS = (StreamSpec("win", 4, (0, 1), keep=5), StreamSpec("ent", 4, (0,), ratio=4))


def _model(**build: Any) -> Any:
    from dsv4.testing.models import random_model

    return random_model(ModelConfig.tiny(), seed=0, **build)


def check_attention_backend(cls: type[Any], *, atol: float = 1e-4) -> None:
    """Full forward, a prefix shared in the batch (``"shared_prefix"``), chunked cached prefill and decode
    all match the reference backend (logits within ``atol``: the engine's bar; fused kernels legitimately
    sum in another order than the reference). With ``"training"``, gradients match too; with
    ``"batch_invariant"``, a sequence's logits are the same bits alone and beside another."""
    cfg = ModelConfig.tiny()
    device = torch.device("cpu")
    if (reason := cls.refuse(cfg, device)) is not None:
        raise AssertionError(f"{cls.__name__} refuses the tiny config: {reason}")
    ref, model = _model(), _model()
    model.attn_backend = cls(cfg, device)
    ids = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    if "training" in cls.capabilities:
        _check_gradients(ref, model, ids, atol, "attention backend")
    if "batch_invariant" in cls.capabilities:
        _check_batch_invariant(model, ids)
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


def _check_gradients(ref: Any, model: Any, ids: torch.Tensor, atol: float, what: str) -> None:
    """``model``'s loss and parameter gradients equal ``ref``'s (same weights), within ``atol``."""
    grads = []
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        loss = m(ids).float().logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss_ref, g_ref), (loss, g) = grads
    assert abs(loss.item() - loss_ref.item()) <= atol, f"{what}: training loss differs from the reference"
    assert g.keys() == g_ref.keys(), f"{what}: gradients reach other parameters: {sorted(g.keys() ^ g_ref.keys())}"
    for name, want in g_ref.items():
        scale = max(1.0, want.abs().max().item())
        assert (g[name] - want).abs().max().item() <= atol * scale, f"{what}: gradient of {name} differs"
    for m in (ref, model):
        m.zero_grad(set_to_none=True)


def _check_batch_invariant(model: Any, ids: torch.Tensor) -> None:
    """In batch-invariant mode a sequence's logits are bit-identical alone and in a batch of two."""
    model.set_batch_invariant(True, max_context=ids.shape[1])
    try:
        with torch.no_grad():
            both = model(ids)
            alone = model(ids[1:])
        assert torch.equal(both[1], alone[0]), "batch-invariant logits change with the other rows of the batch"
    finally:
        model.set_batch_invariant(False)


def check_expert_executor(cls: type[Any], *, atol: float = 1e-5) -> None:
    """Outputs (in inference and, with ``"training"``, autograd steps, gradients included) match the
    reference executor, including experts that get no token; with ``"batch_invariant"`` a token's output
    is the same bits whatever other tokens share the step."""
    cfg = ModelConfig.tiny()
    device = torch.device("cpu")
    if (reason := cls.refuse(cfg, device)) is not None:
        raise AssertionError(f"{cls.__name__} refuses the tiny config: {reason}")
    executor, reference = cls(cfg, device), ReferenceExpertExecutor(cfg)
    experts = _model().layers[1].ffn.experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, cfg.hidden_size, generator=g, requires_grad=True)
    idx = torch.randint(0, 2, (11, cfg.num_experts_per_tok), generator=g)  # experts 2, 3 idle
    idx[:, 1] = 1 - idx[:, 0]
    w = torch.rand(11, cfg.num_experts_per_tok, generator=g)
    autograd = ReferenceKernels(cfg, device, "autograd")
    want = reference.forward(experts, x, idx, w, cfg.swiglu_limit, autograd)
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    with torch.no_grad():
        inference = ReferenceKernels(cfg, device, "inference")
        got = executor.forward(experts, x, idx, w, cfg.swiglu_limit, inference)
        assert (got - want).abs().max().item() <= atol, "inference output differs from the reference executor"
    if "training" in cls.capabilities:
        got = executor.forward(experts, x, idx, w, cfg.swiglu_limit, autograd)
        assert (got - want).abs().max().item() <= atol, "training output differs from the reference executor"
        (gx,) = torch.autograd.grad(got.sum(), x)
        assert (gx - gx_want).abs().max().item() <= atol, "input gradient differs from the reference"
    if "batch_invariant" in cls.capabilities:
        invariant = BatchInvariantKernels(cfg, device, "batch_invariant", max_context=64)
        with torch.no_grad():
            full = executor.forward(experts, x, idx, w, cfg.swiglu_limit, invariant)
            part = executor.forward(experts, x[3:5], idx[3:5], w[3:5], cfg.swiglu_limit, invariant)
        assert torch.equal(full[3:5], part), "batch-invariant outputs change with the other tokens of the step"


def check_kernel_set(cls: type[Any], *, atol: float = 1e-4) -> None:
    """A kernel set computes what the reference kernel set of the same mode computes, in every step
    mode it declares: each op on odd shapes (within ``atol`` relative to the values' scale, exactly for
    expert ids), the whole model's logits, gradients in ``"autograd"``, and in ``"batch_invariant"`` the
    same bits for a row whatever shares its step."""
    cfg = ModelConfig.tiny()
    device = torch.device("cpu")
    modes = [m for m in STEP_MODES if m in cls.capabilities]
    assert modes, f"{cls.__name__}: capabilities name no step mode ({', '.join(STEP_MODES)})"
    for mode in modes:
        if (reason := cls.refuse(cfg, device, mode)) is not None:
            raise AssertionError(f"{cls.__name__} refuses the tiny config in {mode!r} steps: {reason}")
        ks = cls(cfg, device, mode, max_context=64, options={})
        assert isinstance(ks, KernelSet), f"{cls.__name__} does not implement the KernelSet Protocol"
        assert ks.mode == mode, f"built for {mode!r}, its mode is {ks.mode!r}"
        ref_cls = BatchInvariantKernels if mode == "batch_invariant" else ReferenceKernels
        ref = ref_cls(cfg, device, mode, max_context=64)
        grad = torch.enable_grad() if mode == "autograd" else torch.no_grad()
        with grad:
            _check_ops(ks, ref, mode, atol)
        model, want = _model(), _model()
        setattr(model.kernels, mode, ks)
        model.kernels.invariant = want.kernels.invariant = mode == "batch_invariant"
        want.kernels.batch_invariant.max_context = 64
        ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
        if mode == "autograd":
            _check_gradients(want, model, ids, atol, f"kernel set {cls.name!r}")
            continue
        with torch.no_grad():
            got, expected = model(ids), want(ids)
            assert (got - expected).abs().max().item() <= atol, f"{mode}: model logits differ from the reference"
            if mode == "batch_invariant":
                assert torch.equal(model(ids[1:])[0], got[1]), "batch-invariant logits change with the batch"


def _check_ops(ks: Any, ref: Any, mode: str, atol: float) -> None:
    """Every :class:`~dsv4.core.interfaces.KernelSet` op of ``ks`` against ``ref`` on random odd shapes."""
    from dsv4.model.linear import Linear

    g = torch.Generator().manual_seed(7)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def same(name: str, got: Any, want: Any) -> None:
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{mode} {name}: {a.dtype}{list(a.shape)} vs " \
                                                               f"{b.dtype}{list(b.shape)}"
            if a.is_floating_point() or a.is_complex():
                if b.numel():
                    scale = max(1.0, b.abs().max().item())
                    assert (a - b).abs().max().item() <= atol * scale, f"{mode} {name} differs"
            else:
                assert torch.equal(a, b), f"{mode} {name} differs"

    for rows in (1, 5, 37):
        lin = Linear(48, 40)
        with torch.no_grad():
            lin.weight.copy_(rand(40, 48, scale=0.2))
        x = rand(rows, 48)
        same(f"linear[{rows}]", ks.linear(x, lin), ref.linear(x, lin))
        grouped = Linear(24, 6 * 2)
        with torch.no_grad():
            grouped.weight.copy_(rand(12, 24))
        xg = rand(rows, 2, 24)
        same("grouped_linear", ks.grouped_linear(xg, grouped), ref.grouped_linear(xg, grouped))
        w = 1 + 0.1 * rand(48)
        same("rms_norm", ks.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
        heads = rand(rows, 3, 32)
        same("rms_norm (no weight)", ks.rms_norm(heads, None, 1e-6), ref.rms_norm(heads, None, 1e-6))
        pos = torch.arange(rows) * 7 + 3
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        cis = ref.rope_cis(pos, inv_freq)
        same("rope_cis", ks.rope_cis(pos, inv_freq), cis)
        for inverse in (False, True):
            same(f"rope(inverse={inverse})", ks.rope(heads, cis, inverse=inverse), ref.rope(heads, cis, inverse=inverse))
        for n in (1, 2, 4):
            h, d = rand(rows, n, 32), 32
            fn, base, scale = rand((2 + n) * n, n * d, scale=0.2), rand((2 + n) * n), 1 + 0.1 * rand(3)
            kw = {"rms_eps": 1e-6, "hc_eps": 1e-6, "sinkhorn_iters": 5}
            x_pre, post, comb = ref.hc_pre(h, fn, base, scale, **kw)
            same(f"hc_pre[n={n}]", ks.hc_pre(h, fn, base, scale, **kw), (x_pre, post, comb))
            f = rand(rows, d)
            same(f"hc_post[n={n}]", ks.hc_post(f, h, post, comb), ref.hc_post(f, h, post, comb))
            same(f"hc_head[n={n}]", ks.hc_head(h, fn[:n], base[:n], scale[:1], rms_eps=1e-6, hc_eps=1e-6),
                 ref.hc_head(h, fn[:n], base[:n], scale[:1], rms_eps=1e-6, hc_eps=1e-6))
        router, bias = rand(8, 48, scale=0.3), 0.3 * rand(8)
        replay = torch.randint(0, 8, (rows, 2), generator=g)
        replay[::2] = -1  # even rows computed, odd rows replayed
        for func in ("sqrtsoftplus", "sigmoid", "softmax"):
            for b, imposed in ((bias, None), (bias, replay), (None, torch.randint(0, 8, (rows, 2), generator=g))):
                kw2 = {"score_func": func, "top_k": 2, "route_scale": 1.5}
                same(f"route[{func}]", ks.route(x, router, b, imposed, **kw2), ref.route(x, router, b, imposed, **kw2))
        gate, up = rand(rows, 40, scale=4), rand(rows, 40, scale=4)
        for limit in (0.0, 2.5):
            same(f"swiglu[limit={limit}]", ks.swiglu(gate, up, limit), ref.swiglu(gate, up, limit))
        logits, tokens = rand(rows, 50, scale=3), torch.randint(0, 50, (rows,), generator=g)
        same("token_logprobs", ks.token_logprobs(logits, tokens), ref.token_logprobs(logits, tokens))


def check_kv_pool(cls: type[Any], *, steps: int = 300, seed: int = 0) -> None:
    """Random reserve / release sequences (and, for pools with the ``"fork"`` capability, fork to one
    request or several at once; with ``"share"``, share a request's cache at any point its last step
    computed) never leak pages and keep every row a request may still read addressable and holding
    what was written to it: a fork or share gives its targets every row its source may still read,
    and whatever either writes afterwards leaves the other's rows alone. Without ``"share"`` no two
    live rows have one slot. The pool names its streams; one with ``"fork"`` is a
    :class:`ForkingKVPool`, one with ``"share"`` a :class:`SharingKVPool`."""
    streams = _STREAMS
    pool = cls(streams, {"win": 12, "ent": 6}, page_size=2)
    assert set(pool.streams) == {s.name for s in streams}, f"streams: {sorted(pool.streams)}, built with win, ent"
    total = {s.name: pool.pages_used(s.name) + pool.pages_free(s.name) for s in streams}
    rng = random.Random(seed)
    lengths: dict[int, int] = {}
    values: dict[tuple[int, str, int], float] = {}  # (request, stream, row) -> what it holds
    forks, shares = "fork" in cls.capabilities, "share" in cls.capabilities
    if forks:
        assert isinstance(pool, ForkingKVPool), "the 'fork' capability needs fork() (a ForkingKVPool)"
    if shares:
        assert isinstance(pool, SharingKVPool), "the 'share' capability needs share() (a SharingKVPool)"

    def rows_of(s: StreamSpec, n: int, start: int = -1) -> torch.Tensor:
        """Rows a request of ``n`` tokens reads (from ``start`` on: those its last tokens added)."""
        return torch.arange(s.keep_from(n) if start < 0 else s.length(start), s.length(n))

    def copied(src: int, dst: int, n: int) -> None:
        lengths[dst] = n
        values.update({(dst, s.name, r): values[(src, s.name, r)] for s in streams for r in rows_of(s, n).tolist()})

    for step in range(steps):
        rid = rng.randrange(6)
        free = [d for d in range(6) if d not in lengths and d != rid]
        if forks and lengths and rid not in lengths and rng.random() < 0.2:
            src = rng.choice(sorted(lengths))
            dsts = [rid, *free[: rng.randint(0, 1)]]  # one target, or two at once (the engine forks a list)
            try:
                pool.fork(src, dsts if len(dsts) > 1 else rid)
            except MemoryError:
                continue
            for d in dsts:
                copied(src, d, lengths[src])
        elif rng.random() < 0.6:
            old = lengths.get(rid, 0)
            n = old + rng.randint(1, 5)
            try:
                pool.reserve(rid, n)
            except MemoryError:
                continue
            lengths[rid] = n
            for s in streams:  # the step writes its new rows
                rows = rows_of(s, n, old)
                slots = pool.slots(s.name, [rid], torch.zeros_like(rows), rows)
                for layer in s.layers:
                    pool.buffer(layer, s.name)[slots] = (step * 1000 + rows).float().unsqueeze(1)
                values.update({(rid, s.name, r): float(step * 1000 + r) for r in rows.tolist()})
            if shares and free and rng.random() < 0.3:  # a checkpoint anywhere in the step, before release
                at = rng.randint(max(old, 1), n)
                try:
                    pool.share(rid, free[0], at)
                    copied(rid, free[0], at)
                except MemoryError:
                    pass
            pool.release(rid, n)  # drop what the request no longer reads
        elif rid in lengths:
            pool.release(rid)
            del lengths[rid]
        for s in streams:
            assert pool.pages_used(s.name) + pool.pages_free(s.name) == total[s.name], f"{s.name}: pages leaked"
            live: list[int] = []
            for r, n in lengths.items():
                rows = rows_of(s, n)
                slots = pool.slots(s.name, [r], torch.zeros_like(rows), rows)
                live += slots.tolist()
                for layer in s.layers:
                    got = pool.buffer(layer, s.name)[slots, 0].tolist()
                    want = [values[(r, s.name, row)] for row in rows.tolist()]
                    assert got == want, f"{s.name}: request {r}'s rows lost what was written to them"
            if not shares:
                assert len(live) == len(set(live)), f"{s.name}: two live rows share a slot"
    for rid in list(lengths):
        pool.release(rid)
    assert all(pool.pages_used(s.name) == 0 for s in streams), "pages still used after every request left"


# --------------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------------
def check_scheduler(cls: type[Any], *, steps: int = 500, seed: int = 0) -> None:
    """``cls`` schedules as the :class:`~dsv4.core.interfaces.Scheduler` Protocol says.

    Its ``name`` and ``capabilities`` are well-formed; ``refuse`` answers ``None`` or a reason and
    ignores options it does not know (the engine passes all of its own). Then, with
    ``chunked_prefill`` on and off, it schedules ``steps`` steps of a random stream of requests
    (1–3 samples each, aborts among them) into a real :class:`PagedKVPool`, driven as the engine drives
    it (samples of a request get a copy of its first one's prompt cache and are adopted when it has
    the ``"fork"`` capability), then runs until it has no work. On the way:

    - a step stays within ``max_num_batched_tokens`` and ``max_num_seqs``, each sequence once;
    - each sequence runs ``1 <= n <=`` its uncomputed tokens, all of them (no cut prefill) unless
      built with ``chunked_prefill=True`` and having the ``"chunked_prefill"`` capability;
    - the pages of those tokens are reserved; only running sequences hold pages, at most ``max_num_seqs``;
    - ``finish`` and ``abort`` free the pages; ``abort`` returns exactly the request's unfinished
      sequences; finished and aborted sequences never come back;
    - only schedulers with ``"preemption"`` preempt, and a preempted sequence holds no pages and starts
      again from ``num_computed == 0`` (or from a cached prefix, when admitted again at once);
    - with ``"prefix_cache"``, ``resume`` (here: a random cached prefix, or none) is called only on
      waiting sequences that hold no pages and computed nothing; a waiting sequence never holds pages;
    - ``status`` is WAITING after ``add``, RUNNING when scheduled or adopted, FINISHED when ended;
    - ``has_work`` is true exactly while a sequence is unfinished; the stream drains (no step without
      work while sequences wait, since the pool always holds one sequence) and leaves no page used.

    A broken rule fails with an :class:`AssertionError` that names it.
    """
    assert isinstance(cls.name, str) and cls.name, f"{cls.__name__}: `name` must be a non-empty str"
    caps = cls.capabilities
    assert isinstance(caps, frozenset) and all(isinstance(c, str) for c in caps), "`capabilities`: frozenset of str"
    served = 0
    for chunked in (True, False):
        # without chunks, the longest sequence (recomputed after a preemption) must fit in one step
        budget = 16 if chunked else _SchedulerRun.MAX_PROMPT + _SchedulerRun.MAX_OUTPUT
        options = {"max_num_seqs": 4, "max_num_batched_tokens": budget, "chunked_prefill": chunked}
        reason = cls.refuse(options)
        assert reason is None or isinstance(reason, str), f"refuse({options}) returned {reason!r}"
        unknown = {**options, "model": "/no/such/dir", "__not_an_option__": object()}
        assert cls.refuse(unknown) == reason, "refuse must ignore options it does not know (the engine passes all)"
        if reason is not None:
            continue
        served += 1
        run = _SchedulerRun(cls, options, random.Random(seed))
        for k in range(steps):
            run.arrive()
            run.step(k)
        for k in range(steps, 20 * steps):  # the drain: no arrivals, no aborts
            if not run.step(k):
                break
        else:
            raise AssertionError(f"{run.where}: the stream must drain: work left after {20 * steps} steps")
        leaked = {s.name: run.pool.pages_used(s.name) for s in _STREAMS}
        assert not any(leaked.values()), f"{run.where}: every page is free once all sequences ended: {leaked} used"
    assert served, f"{cls.name} refuses every configuration the check tries"


@dataclass(eq=False)
class _Seq:
    """A sequence as a scheduler sees it (a :class:`~dsv4.core.interfaces.ScheduledSequence`):
    ``prompt`` tokens, then ``target`` generated ones."""

    seq_id: int
    request_id: str
    arrival: tuple[int, int]
    prompt: int
    target: int
    generated: int = 0
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_lookahead: int = 0  # drafts after num_tokens (a speculating sequence)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return self.prompt + self.generated


class _SchedulerRun:
    """A scheduler driven as the engine drives it, with the checks of :func:`check_scheduler`."""

    MAX_PROMPT, MAX_OUTPUT, PAGE = 40, 8, 4

    def __init__(self, cls: type[Any], options: dict[str, Any], rng: random.Random) -> None:
        self.where = f"{cls.name} (chunked_prefill={options['chunked_prefill']})"
        self.max_seqs, self.budget = options["max_num_seqs"], options["max_num_batched_tokens"]
        self.preempts = "preemption" in cls.capabilities
        self.cuts = options["chunked_prefill"] and "chunked_prefill" in cls.capabilities
        # "ent" pages (a row per 4 tokens) hold 2 sequences at their longest when the scheduler can
        # preempt (so it has to), every sequence it may run when it cannot; "win" pages (a window of 5
        # and a step's chunk, partial pages at both ends) are never short.
        longest = -(-(self.MAX_PROMPT + self.MAX_OUTPUT) // 4 // self.PAGE)
        pages = {"win": self.max_seqs * (-(-(5 + self.budget) // self.PAGE) + 2),
                 "ent": longest * (2 if self.preempts else self.max_seqs)}
        self.pool = PagedKVPool(_STREAMS, pages, page_size=self.PAGE)
        self.sched: Scheduler[_Seq] = cls(self.pool, **options)
        assert isinstance(self.sched, Scheduler), f"{self.where}: does not implement the Scheduler Protocol"
        self.adopting = self.sched if can_adopt(self.sched) else None
        if self.adopting is not None:
            assert isinstance(self.adopting, AdoptingScheduler), "the 'fork' capability needs adopt()"
        self.resumes = can_resume(self.sched)
        if self.resumes:
            assert isinstance(self.sched, ResumingScheduler), "the 'prefix_cache' capability needs a `resume` hook"
            self.sched.resume = self._resume
        self.rng = rng
        self.resume_rng = random.Random(0)  # its own stream: the arrivals stay those of ``rng``
        self.spec_rng = random.Random(1)  # drafts and how many of them stand
        self.live: dict[int, _Seq] = {}  # handed to the scheduler, not ended
        self.ended: dict[int, str] = {}  # seq_id -> "finished" or "aborted"
        self.pending: dict[int, list[_Seq]] = {}  # first sample's seq_id -> samples waiting for its prompt cache
        self.ids = itertools.count()
        self.requests = itertools.count()

    # ------------------------------------------------------------------------------------------
    def arrive(self) -> None:
        """Maybe a new request (1–3 samples), maybe an abort."""
        rng = self.rng
        if rng.random() < 0.3:
            order = next(self.requests)
            prompt = rng.randint(1, self.MAX_PROMPT)
            first, *others = [_Seq(next(self.ids), f"req-{order}", (order, j), prompt, rng.randint(1, self.MAX_OUTPUT))
                              for j in range(rng.choice((1, 1, 2, 3)))]
            if self.adopting is not None and others:  # as the engine shares a prompt's cache
                self.pending[first.seq_id], others = others, []
            for seq in (first, *others):
                self._add(seq)
        active = sorted({s.request_id for s in self.live.values()})
        if active and rng.random() < 0.05:
            self._abort(rng.choice(active))

    def step(self, k: int) -> bool:
        """One engine step: schedule, check, compute, sample, copy prompt caches, finish. Returns
        whether the scheduler still has work."""
        at = f"{self.where}, step {k}"
        plan = self.sched.schedule()
        self._check_plan(plan, at)
        for seq in self.live.values():
            if seq.status is SequenceStatus.WAITING:
                assert seq.num_computed == 0 and seq.seq_id not in self._holders(), \
                    f"{at}: a waiting sequence holds no pages and has computed nothing, {seq.seq_id} does"
        if not plan.items:
            assert not self.live, f"{at}: progress: schedule() is empty while {len(self.live)} sequences wait"
        for seq in plan.preempted:
            seq.num_lookahead = 0  # the engine drops a preempted sequence's drafts
        verified: dict[int, int] = {}
        for seq, n in plan.items:
            verified[seq.seq_id] = max(0, n - (seq.num_tokens - seq.num_computed))
            seq.num_computed += n - verified[seq.seq_id]
        sampled = [seq for seq, _ in plan.items if seq.num_computed == seq.num_tokens]
        adopted = []
        for seq in sampled:  # a first sample that just computed its prompt: the others get a copy
            if seq.num_computed == seq.prompt and seq.seq_id in self.pending:
                adopted += self._copy(seq, self.pending.pop(seq.seq_id), at)
        for seq in sampled + adopted:
            # speculative decoding: some of the verified drafts stand (computed rows), then one sampled token
            stood = min(self.spec_rng.randint(0, verified.get(seq.seq_id, 0)), seq.target - seq.generated - 1)
            seq.num_computed += stood
            seq.generated += 1 + stood
            seq.num_lookahead = self.spec_rng.choice((0, 0, 1, 3))
            if seq.generated == seq.target:
                self.sched.finish(seq)
                self._ended(seq, "finished", at)
        for seq in [s for s, _ in plan.items] + adopted:
            if seq.seq_id in self.live:
                self.pool.release(seq.seq_id, seq.num_computed)  # what the window left behind
        holders = self._holders()
        assert holders <= set(self.live), f"{at}: only unfinished sequences hold pages: {holders - set(self.live)}"
        assert len(holders) <= self.max_seqs, f"{at}: max_num_seqs: {len(holders)} sequences hold pages"
        has_work = self.sched.has_work()
        assert has_work == bool(self.live), f"{at}: has_work() is {has_work} with {len(self.live)} unfinished"
        return has_work

    # ------------------------------------------------------------------------------------------
    def _check_plan(self, plan: Any, at: str) -> None:
        assert isinstance(plan, ScheduledBatch), f"{at}: schedule() returns a ScheduledBatch, not {type(plan)}"
        tokens = sum(n for _, n in plan.items)
        assert tokens <= self.budget, f"{at}: token budget: {tokens} new tokens > max_num_batched_tokens={self.budget}"
        assert len(plan.items) <= self.max_seqs, f"{at}: max_num_seqs: {len(plan.items)} sequences in one step"
        seen: set[int] = set()
        for seq, n in plan.items:
            sid = seq.seq_id
            assert sid not in self.ended, f"{at}: ended sequences never come back: {self.ended[sid]} {sid} is scheduled"
            assert sid in self.live, f"{at}: only added sequences run: {sid} was never added"
            assert sid not in seen, f"{at}: each sequence once a step: {sid} twice"
            seen.add(sid)
            todo = seq.num_tokens - seq.num_computed
            assert 1 <= n <= todo + seq.num_lookahead, \
                f"{at}: 1 <= n <= uncomputed tokens + drafts: sequence {sid} runs {n} of {todo} + {seq.num_lookahead}"
            if not self.cuts:
                assert n >= todo, f"{at}: no cut prefill without chunked prefill: sequence {sid} runs {n} of {todo}"
            assert seq.status is SequenceStatus.RUNNING, f"{at}: a scheduled sequence is RUNNING, {sid} is {seq.status}"
            free = [self.pool.pages_free(s.name) for s in _STREAMS]
            try:  # a no-op when the scheduler reserved them
                self.pool.reserve(sid, seq.num_computed + n)
            except MemoryError:
                free = []
            reserved = free == [self.pool.pages_free(s.name) for s in _STREAMS]
            assert reserved, f"{at}: pages reserved: sequence {sid} runs {n} tokens after {seq.num_computed} without pages"
        assert self.preempts or not plan.preempted, f"{at}: only schedulers with the 'preemption' capability preempt"
        holders = self._holders()
        for seq in plan.preempted:
            sid = seq.seq_id
            assert sid in self.live, f"{at}: only unfinished sequences are preempted, not {sid}"
            resumed = sid in seen and self.resumes  # admitted again at once, from a cached prefix
            assert seq.num_computed == 0 or resumed, \
                f"{at}: a preempted sequence starts again from num_computed == 0, {sid} not"
            if sid not in seen:
                assert sid not in holders, f"{at}: a preempted sequence holds no pages, {sid} does"
                assert seq.status is SequenceStatus.WAITING, f"{at}: a preempted sequence is WAITING, {sid} is not"

    def _resume(self, seq: _Seq) -> None:
        """As the engine's prefix cache: a sequence about to be admitted may get the pages of a cached prefix."""
        assert seq.status is SequenceStatus.WAITING and seq.num_computed == 0, \
            f"{self.where}: resume is called on waiting sequences that computed nothing, not {seq.seq_id}"
        assert seq.seq_id not in self._holders(), f"{self.where}: resume is called on sequences without pages"
        if seq.num_tokens > 1 and self.resume_rng.random() < 0.5:
            cached = self.resume_rng.randint(1, seq.num_tokens - 1)
            try:
                self.pool.reserve(seq.seq_id, cached)
            except MemoryError:
                return
            seq.num_computed = cached

    def _copy(self, src: _Seq, samples: list[_Seq], at: str) -> list[_Seq]:
        """As the engine's ``_copy_cache``: samples get a copy of ``src``'s cache and are adopted, or queued."""
        assert self.adopting is not None
        adopted = []
        for seq in samples:
            try:
                self.pool.fork(src.seq_id, seq.seq_id)
            except MemoryError:
                self._add(seq)
                continue
            seq.num_computed = src.num_computed
            self.live[seq.seq_id] = seq
            if not self.adopting.adopt(seq):
                assert seq.status is SequenceStatus.WAITING, f"{at}: a refused adopt() changes nothing"
                del self.live[seq.seq_id]
                seq.num_computed = 0
                self.pool.release(seq.seq_id)
                self._add(seq)
                continue
            assert seq.status is SequenceStatus.RUNNING, f"{at}: an adopted sequence is RUNNING, {seq.seq_id} is not"
            adopted.append(seq)
        return adopted

    def _add(self, seq: _Seq) -> None:
        self.live[seq.seq_id] = seq
        self.sched.add(seq)
        assert seq.status is SequenceStatus.WAITING, f"{self.where}: an added sequence is WAITING, {seq.seq_id} is not"

    def _abort(self, request_id: str) -> None:
        for first in [sid for sid, samples in self.pending.items() if samples[0].request_id == request_id]:
            del self.pending[first]
        expected = {sid for sid, seq in self.live.items() if seq.request_id == request_id}
        dropped = self.sched.abort(request_id)
        got = sorted(seq.seq_id for seq in dropped)
        at = f"{self.where}, abort {request_id!r}"
        assert got == sorted(expected), f"{at}: abort returns the request's unfinished sequences {sorted(expected)}, not {got}"
        for seq in dropped:
            self._ended(seq, "aborted", at)

    def _ended(self, seq: _Seq, how: str, at: str) -> None:
        sid = seq.seq_id
        assert seq.status is SequenceStatus.FINISHED, f"{at}: {how} sequences are FINISHED, {sid} is {seq.status}"
        assert sid not in self._holders(), f"{at}: {how} sequences hold no pages, {sid} does"
        del self.live[sid]
        self.ended[sid] = how

    def _holders(self) -> set[int]:
        return {rid for s in _STREAMS for rid, pages in self.pool.owners(s.name).items() if pages}


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

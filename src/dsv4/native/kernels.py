"""Tensor-level wrappers of the native kernels: shape/dtype checks, then one C call each.

Callers test :func:`supports` first (float32 CPU tensors of supported shapes, kernels built) and
otherwise run their PyTorch path; the wrappers raise ``ValueError`` on anything they cannot take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsv4.native import library

__all__ = [
    "compress_entries",
    "hc_post",
    "hc_pre",
    "indexer_topk",
    "moe_experts",
    "moe_gate",
    "pack_panels",
    "rms_norm",
    "rope",
    "sink_attention",
    "sinkhorn",
    "sinkhorn_backward",
    "slots",
    "supports",
]

_MAX_STREAMS = 16  # mHC streams n (stack arrays in the kernel)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: float32, on the CPU, no autograd, kernels built."""
    return (
        not torch.is_grad_enabled()
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and library() is not None
    )


def _lib() -> Any:  # a ctypes.CDLL: its functions are attributes typed Any
    lib = library()
    if lib is None:
        raise RuntimeError("dsv4 native kernels are unavailable")
    return lib


def _status(kernel: str, code: int, what: str) -> None:
    """Turn a kernel's nonzero status into an error (the kernel read nothing out of bounds)."""
    if code:
        raise ValueError(f"{kernel}: {what}")


def _check(name: str, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    if t.dtype != dtype or t.device.type != "cpu":
        raise ValueError(f"{name}: expected a {dtype} CPU tensor, got {t.dtype} on {t.device}")


def _streams(h: torch.Tensor) -> torch.Tensor:
    """``h [T, n, D]`` with a unit last stride (the kernels take the T and n strides)."""
    if h.dim() != 3:
        raise ValueError(f"h: expected [T, n, D], got {tuple(h.shape)}")
    if h.shape[1] > _MAX_STREAMS:
        raise ValueError(f"h: at most {_MAX_STREAMS} streams, got {h.shape[1]}")
    return h if h.stride(2) == 1 else h.contiguous()


def sink_attention(
    q: torch.Tensor,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    sink: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Sink attention of ``q [T, H, D]`` over rows read in place from stores.

    ``parts`` (one or two) are ``(store [S, D], slots [T, J] int64, valid [T, J] bool)``: token t reads
    ``store[slots[t, j]]`` where ``valid[t, j]``. Equals :func:`dsv4.attention.ops.sink_attention` of
    the gathered, concatenated rows (up to summation order) without gathering them. ``D`` must be a
    multiple of 16; a valid slot outside its store raises ``ValueError`` (masked slots are never read).
    """
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"sink_attention takes one or two parts, got {len(parts)}")
    t, h, d = q.shape
    if d % 16:
        raise ValueError(f"head dim {d} is not a multiple of 16")
    _check("q", q)
    _check("sink", sink)
    q = q.contiguous()
    sink = sink.contiguous()
    args: list[object] = []
    keep: list[torch.Tensor] = []  # converted index tensors stay alive through the call
    for i, (store, slots, valid) in enumerate(parts):
        _check(f"store {i}", store)
        if store.dim() != 2 or store.shape[1] != d or not store.is_contiguous():
            raise ValueError(f"store {i}: expected a contiguous [S, {d}] tensor, got {tuple(store.shape)}")
        if slots.shape != valid.shape or slots.dim() != 2 or slots.shape[0] != t:
            raise ValueError(f"part {i}: slots {tuple(slots.shape)} and valid {tuple(valid.shape)} must be [{t}, J]")
        slots = slots.to(torch.int64).contiguous()
        valid = valid.to(torch.uint8).contiguous()
        keep += [slots, valid]
        args += [store.data_ptr(), store.shape[0], slots.data_ptr(), valid.data_ptr(), slots.shape[1]]
    if len(parts) == 1:
        args += [None, 0, None, None, 0]
    out = torch.empty_like(q)
    code = _lib().dsv4_sink_attention(t, h, d, q.data_ptr(), float(scale), sink.data_ptr(), *args, out.data_ptr())
    _status("sink_attention", code, "a valid slot is outside its store")
    return out


def hc_pre(
    h: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    *,
    rms_eps: float,
    hc_eps: float,
    sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dsv4.kernels.mhc.hc_pre` in one pass: the mixing product ``flatten(h) @ fn^T`` and its RMS
    scaling, pre/post/comb (Sinkhorn) and the collapse. ``h [T, n, D]`` (D a multiple of 16), ``fn
    [(2+n)n, n·D]``. Returns ``x [T, D]``, ``post [T, n]``, ``comb [T, n, n]``."""
    h = _streams(h)
    t, n, d = h.shape
    _check("h", h)
    for name, x in (("fn", fn), ("base", base), ("scale", scale)):
        _check(name, x)
    rows = (2 + n) * n
    if d % 16 or fn.shape != (rows, n * d) or base.shape != (rows,) or scale.numel() != 3:
        raise ValueError(f"hc_pre: fn {tuple(fn.shape)}, base {tuple(base.shape)}, scale {tuple(scale.shape)} "
                         f"do not fit {n} streams of width {d} (a multiple of 16)")
    fn, base, scale = fn.contiguous(), base.contiguous(), scale.contiguous()
    x = h.new_empty(t, d)
    post = h.new_empty(t, n)
    comb = h.new_empty(t, n, n)
    _lib().dsv4_hc_pre(
        t, n, d, h.data_ptr(), h.stride(0), h.stride(1), fn.data_ptr(), base.data_ptr(), scale.data_ptr(),
        float(rms_eps), float(hc_eps), int(sinkhorn_iters), x.data_ptr(), post.data_ptr(), comb.data_ptr(),
    )
    return x, post, comb


def _sinkhorn_args(comb: torch.Tensor, iters: int) -> tuple[torch.Tensor, int, int]:
    _check("comb", comb)
    if comb.dim() != 3 or comb.shape[1] != comb.shape[2] or not 1 <= comb.shape[1] <= _MAX_STREAMS:
        raise ValueError(f"sinkhorn: comb must be [T, n, n] with n <= {_MAX_STREAMS}, got {tuple(comb.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    return comb.contiguous(), comb.shape[0], comb.shape[1]


def sinkhorn(comb: torch.Tensor, iters: int, eps: float, *, save: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Sinkhorn-Knopp loop of :func:`dsv4.kernels.mhc.hc_pre` over ``comb [T, n, n]`` (columns first,
    ``2·iters − 1`` normalisations), bit for bit PyTorch's arithmetic. With ``save``, also the inputs of
    the normalisations after the first (``[2·iters − 2, T, n, n]``) that :func:`sinkhorn_backward` needs."""
    comb, t, n = _sinkhorn_args(comb, iters)
    out = torch.empty_like(comb)
    saved = comb.new_empty(2 * iters - 2, t, n, n) if save else None
    _lib().dsv4_sinkhorn(t, n, int(iters), float(eps), comb.data_ptr(), out.data_ptr(),
                         saved.data_ptr() if saved is not None else None)
    return out, saved


def sinkhorn_backward(
    comb: torch.Tensor, saved: torch.Tensor, grad_out: torch.Tensor, iters: int, eps: float
) -> torch.Tensor:
    """The gradient of :func:`sinkhorn` with respect to ``comb``, bit for bit what autograd computes
    through the PyTorch loop."""
    comb, t, n = _sinkhorn_args(comb, iters)
    _check("saved", saved)
    _check("grad_out", grad_out)
    if tuple(saved.shape) != (2 * iters - 2, t, n, n) or grad_out.shape != comb.shape:
        raise ValueError(f"sinkhorn_backward: saved {tuple(saved.shape)} and grad_out {tuple(grad_out.shape)} "
                         f"do not fit comb {tuple(comb.shape)} and {iters} iterations")
    saved, grad_out = saved.contiguous(), grad_out.contiguous()
    grad_in = torch.empty_like(comb)
    _lib().dsv4_sinkhorn_backward(t, n, int(iters), float(eps), comb.data_ptr(), saved.data_ptr(),
                                  grad_out.data_ptr(), grad_in.data_ptr())
    return grad_in


def hc_post(f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """:func:`dsv4.kernels.mhc.hc_post`: ``out[t, k] = post[t, k] f[t] + Σ_j comb[t, j, k] h[t, j]``."""
    h = _streams(h)
    t, n, d = h.shape
    for name, x in (("f", f), ("h", h), ("post", post), ("comb", comb)):
        _check(name, x)
    if f.shape != (t, d) or post.shape != (t, n) or comb.shape != (t, n, n):
        raise ValueError(f"hc_post: f {tuple(f.shape)}, post {tuple(post.shape)}, comb {tuple(comb.shape)} "
                         f"do not fit h {tuple(h.shape)}")
    f, post, comb = f.contiguous(), post.contiguous(), comb.contiguous()
    out = h.new_empty(t, n, d)
    _lib().dsv4_hc_post(t, n, d, f.data_ptr(), h.data_ptr(), h.stride(0), h.stride(1), post.data_ptr(),
                        comb.data_ptr(), out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """:func:`dsv4.attention.ops.rms_norm` over the last dim of ``x`` (``weight=None``: no weight)."""
    _check("x", x)
    d = x.shape[-1]
    if weight is not None:
        _check("weight", weight)
        if weight.shape != (d,):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not fit rows of {d}")
        weight = weight.contiguous()
    rows = x.reshape(-1, d)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype)
    _lib().dsv4_rms_norm(rows.shape[0], d, rows.data_ptr(), rows.stride(0),
                         None if weight is None else weight.data_ptr(), float(eps), out.data_ptr())
    return out.view(x.shape)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A ``[N, K]`` weight as ``[N/16, K, 16]`` panels (16 output columns each), the layout
    :func:`moe_experts` reads. ``N`` must be a multiple of 16."""
    n, k = weight.shape
    if n % 16:
        raise ValueError(f"pack_panels: {n} output features is not a multiple of 16")
    return weight.detach().float().reshape(n // 16, 16, k).transpose(1, 2).contiguous()


def moe_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    limit: float,
) -> torch.Tensor:
    """``Σ_j weights[t, j] · expert_{idx[t, j]}(x[t])`` for ``x [T, D]`` with every expert's weights
    panel-packed (:func:`pack_panels`): ``gate_up [E, 2I/16, D, 16]`` (w1 over w3) and
    ``down [E, D/16, I, 16]`` (w2). The routed-experts sum of :class:`dsv4.model.moe.MoE`."""
    for name, t in (("x", x), ("gate_up", gate_up), ("down", down), ("weights", weights)):
        _check(name, t)
    tokens_n, d = x.shape
    e, n_gu, d_gu, _ = gate_up.shape
    inter = n_gu * 8
    if d_gu != d or tuple(down.shape) != (e, d // 16, inter, 16) or d % 16:
        raise ValueError(f"moe_experts: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit "
                         f"x {tuple(x.shape)}")
    if idx.shape != weights.shape or idx.dim() != 2 or idx.shape[0] != tokens_n:
        raise ValueError(f"moe_experts: idx {tuple(idx.shape)} and weights {tuple(weights.shape)} must be [{tokens_n}, k]")
    k = idx.shape[1]
    if tokens_n == 0 or k == 0:
        return torch.zeros_like(x)
    idx = idx.to(torch.int64).contiguous()
    x, gate_up, down, weights = x.contiguous(), gate_up.contiguous(), down.contiguous(), weights.contiguous()
    out = torch.empty_like(x)
    code = _lib().dsv4_moe_experts(tokens_n, d, inter, x.data_ptr(), e, gate_up.data_ptr(), down.data_ptr(),
                                   idx.data_ptr(), weights.data_ptr(), k, float(limit), out.data_ptr())
    _status("moe_experts", code, f"expert ids must be in [0, {e})")
    return out


_SCORE_FUNCS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


def moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    score_func: str,
    top_k: int,
    route_scale: float,
    imposed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`dsv4.model.moe.Gate`'s routing: ``(weights [T, k], idx [T, k])`` for ``x [T, D]`` and the
    router ``weight [E, D]``. ``imposed [T, k]`` gives the ids of rows whose first id is not -1 (hash
    layers, routing replay); the others take the top k of ``scores + bias``."""
    _check("x", x)
    _check("weight", weight)
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"moe_gate: unknown score function {score_func!r}")
    t, d = x.shape
    e = weight.shape[0]
    if weight.shape != (e, d) or not 1 <= top_k <= e:
        raise ValueError(f"moe_gate: weight {tuple(weight.shape)} and top_k {top_k} do not fit x {tuple(x.shape)}")
    if bias is not None:
        _check("bias", bias)
        bias = bias.contiguous()
    if imposed is not None:
        if imposed.shape != (t, top_k):
            raise ValueError(f"moe_gate: imposed ids {tuple(imposed.shape)} must be [{t}, {top_k}]")
        imposed = imposed.to(torch.int64).contiguous()
    x, weight = x.contiguous(), weight.contiguous()
    idx = torch.empty(t, top_k, dtype=torch.int64)
    w = torch.empty(t, top_k, dtype=torch.float32)
    code = _lib().dsv4_moe_gate(t, d, e, x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                _SCORE_FUNCS[score_func], top_k, None if imposed is None else imposed.data_ptr(),
                                float(route_scale), idx.data_ptr(), w.data_ptr())
    _status("moe_gate", code, f"imposed expert ids must be in [0, {e})")
    return w, idx


def rope(x: torch.Tensor, cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """:func:`dsv4.attention.rope.apply_rope` (not invariant): a copy of ``x [N, ..., d]`` with its
    trailing ``2 * cis.shape[-1]`` channels rotated by ``cis [N, rd/2]`` (complex64)."""
    _check("x", x)
    if cis.dtype != torch.complex64 or cis.dim() != 2 or cis.shape[0] != x.shape[0]:
        raise ValueError(f"rope: cis must be complex64 [{x.shape[0]}, rd/2], got {cis.dtype} {tuple(cis.shape)}")
    d, rd = x.shape[-1], 2 * cis.shape[-1]
    if rd > d:
        raise ValueError(f"rope: {rd} rope channels exceed the row width {d}")
    x = x.contiguous()
    pairs = torch.view_as_real(cis.contiguous())  # [N, rd/2, 2] = (cos, sin)
    out = torch.empty_like(x)
    inner = x.numel() // (x.shape[0] * d) if x.numel() else 0
    _lib().dsv4_rope(x.shape[0], inner, d, rd, x.data_ptr(), pairs.data_ptr(), int(inverse), out.data_ptr())
    return out


def compress_entries(
    rows: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    *,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cis: torch.Tensor,
    overlap: bool,
) -> torch.Tensor:
    """:func:`dsv4.attention.ops.compress_entries` (without ``finish``) of the rows ``rows[slots]``
    read in place: ``rows [S, 2·coff·c]`` storage, ``slots, valid [E, coff·m]``, ``cis [E, rd/2]``
    (complex64, each block's rotation). Returns the entries ``[E, c]``."""
    for name, t in (("rows", rows), ("ape", ape), ("norm_weight", norm_weight)):
        _check(name, t)
    m, width = ape.shape
    coff = 2 if overlap else 1
    c = width // coff
    e = slots.shape[0]
    if rows.dim() != 2 or rows.shape[1] != 2 * width or not rows.is_contiguous():
        raise ValueError(f"compress_entries: rows must be contiguous [S, {2 * width}], got {tuple(rows.shape)}")
    if slots.shape != (e, coff * m) or valid.shape != slots.shape or norm_weight.shape != (c,):
        raise ValueError(f"compress_entries: slots {tuple(slots.shape)}, valid {tuple(valid.shape)}, norm "
                         f"{tuple(norm_weight.shape)} do not fit ratio {m} and {c} channels")
    if cis.dtype != torch.complex64 or cis.shape[0] != e or 2 * cis.shape[-1] > c:
        raise ValueError(f"compress_entries: cis must be complex64 [{e}, rd/2], got {cis.dtype} {tuple(cis.shape)}")
    out = rows.new_empty(e, c)
    if e == 0:
        return out
    slots = slots.to(torch.int64).contiguous()
    valid = valid.to(torch.uint8).contiguous()
    pairs = torch.view_as_real(cis.contiguous())
    ape, norm_weight = ape.contiguous(), norm_weight.contiguous()
    code = _lib().dsv4_compress(e, m, c, int(overlap), rows.data_ptr(), rows.shape[0], slots.data_ptr(),
                                valid.data_ptr(), ape.data_ptr(), norm_weight.data_ptr(), float(eps), pairs.data_ptr(),
                                2 * cis.shape[-1], out.data_ptr())
    _status("compress_entries", code, "a valid slot is outside the stored rows")
    return out


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    store: torch.Tensor,
    slots: torch.Tensor,
    limit: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lightning indexer's top ``k`` (:func:`dsv4.attention.ops.select_topk` of
    :func:`dsv4.attention.ops.indexer_scores`), streamed over the keys: ``q [T, nh, c]`` and head
    ``weights [T, nh]`` score the keys ``store[slots[t, s]]`` read in place (``slots [T, N]``, or
    ``[N]`` shared by every token), of which token t sees the first ``limit[t]`` (``<= N``). Returns
    the picks ``[T, k]`` (entry indices in N, best first, ties to the lower index; after a token's
    visible entries its lowest invisible ones) and their scores (``-inf`` for invisible picks)."""
    for name, t in (("q", q), ("weights", weights), ("store", store)):
        _check(name, t)
    n_tok, nh, c = q.shape
    if weights.shape != (n_tok, nh):
        raise ValueError(f"indexer_topk: weights {tuple(weights.shape)} do not fit q {tuple(q.shape)}")
    if store.dim() != 2 or store.shape[1] != c or not store.is_contiguous():
        raise ValueError(f"indexer_topk: store must be a contiguous [S, {c}] tensor, got {tuple(store.shape)}")
    shared = slots.dim() == 1
    n = slots.shape[-1]
    if (not shared and (slots.dim() != 2 or slots.shape[0] != n_tok)) or limit.shape != (n_tok,):
        raise ValueError(f"indexer_topk: slots {tuple(slots.shape)} must be [N] or [{n_tok}, N] and limit "
                         f"{tuple(limit.shape)} [{n_tok}]")
    if not 0 < k <= n:
        raise ValueError(f"indexer_topk: k = {k} must be in [1, N = {n}]")
    limit = limit.to(torch.int64).contiguous()
    q, weights = q.contiguous(), weights.contiguous()
    slots = slots.to(torch.int64).contiguous()
    idx = torch.empty(n_tok, k, dtype=torch.int64)
    score = q.new_empty(n_tok, k)
    if n_tok == 0:
        return idx, score
    # Too few tokens to occupy every thread (a decode step): each token's keys are split among them as
    # well, the pieces merged by the same total order.
    code = _lib().dsv4_indexer_topk(n_tok, nh, c, q.data_ptr(), weights.data_ptr(), store.data_ptr(), store.shape[0],
                                    slots.data_ptr(), n, 0 if shared else n, limit.data_ptr(), k,
                                    torch.get_num_threads(), c**-0.5, idx.data_ptr(), score.data_ptr())
    _status("indexer_topk", code, f"a limit is outside [0, {n}] or a visible slot outside the store")
    return idx, score


def slots(
    req: torch.Tensor, logical: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, page_size: int
) -> torch.Tensor | None:
    """Paged-pool slot lookup (:meth:`dsv4.cache.paged.PagedKVPool.slots`): ``table[rows[req], logical //
    page_size] * page_size + logical % page_size``, page 0 past a request's table (and for indices out
    of range: the kernel never reads out of bounds). ``req`` is ``[L]``
    with ``logical [L]`` or ``[T, 1]`` with ``logical [T, J]``; other shapes return ``None`` (the
    caller's PyTorch path)."""
    if logical.dim() == 1 and req.shape == logical.shape:
        j = 1
    elif logical.dim() == 2 and req.shape == (logical.shape[0], 1):
        j = logical.shape[1]
    else:
        return None
    for name, t in (("req", req), ("logical", logical), ("rows", rows), ("table", table)):
        _check(name, t, torch.int64)
    req, logical, rows, table = req.contiguous(), logical.contiguous(), rows.contiguous(), table.contiguous()
    out = torch.empty(logical.shape, dtype=torch.int64)
    _lib().dsv4_slots(logical.numel(), j, req.data_ptr(), logical.data_ptr(), rows.data_ptr(), rows.numel(),
                      table.data_ptr(), table.shape[0], table.shape[1], page_size, out.data_ptr())
    return out

"""Per-kernel throughput of dsv4-triton on a CUDA GPU, against the device's peak.

    pip install -e plugins/dsv4-triton
    python plugins/dsv4-triton/benchmarks/bench_kernels.py [--tokens 64 2048] [--dtype bf16|fp32]

For each kernel at DeepSeek-V4-like sizes (hidden 4096, 4 mHC streams, 64 heads of 512, 64 experts
of 2048 picked 6 per token, 128 window rows and 512 selected entries per token): the median time
(``triton.testing.do_bench``), the bytes it must move and the FLOPs it must do, and what they
achieve against the peaks: memory bandwidth from the device's properties (2 · memory clock · bus
width) and matmul FLOP/s measured in the same run (``torch.mm`` of 8192² in the same dtype, TF32 off
as in the kernels). Whichever fraction is higher says what bounds the kernel.

Without a CUDA GPU, or under ``TRITON_INTERPRET`` (the interpreter's timings mean nothing), it prints
why and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv4_triton.device import INTERPRET_ENV, interpreted

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Dims:
    """The sizes the kernels are timed at."""

    hidden: int = 4096
    streams: int = 4
    heads: int = 64
    head_dim: int = 512
    rope_dim: int = 64
    q_lora: int = 1024
    experts: int = 64
    top_k: int = 6
    inter: int = 2048
    window: int = 128
    entries: int = 512
    ratio: int = 4
    index_heads: int = 64
    index_dim: int = 128
    vocab: int = 129280
    sinkhorn_iters: int = 20


@dataclass(frozen=True)
class Case:
    """One kernel call to time, with the bytes it must move and the FLOPs it must do."""

    name: str
    run: Callable[[], object]
    bytes: float
    flops: float


def cases(tokens: int, dims: Dims, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """Every kernel once at ``dims`` for ``tokens`` tokens (tensors made on ``device``)."""
    from dsv4_triton.ops import attention, experts, matmul, mhc, moe, norm

    t, d, n, e = tokens, dims.hidden, dims.streams, torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    x, w_q = rand(t, d), rand(dims.q_lora, d, scale=d**-0.5)
    h, fn = rand(t, n, d), rand((2 + n) * n, n * d, dt=torch.float32, scale=(n * d) ** -0.5)
    base, scale = rand((2 + n) * n, dt=torch.float32), rand(3, dt=torch.float32)
    post, comb = torch.rand(t, n, device=device), torch.rand(t, n, n, device=device)
    q = rand(t, dims.heads, dims.head_dim)
    angles = torch.rand(t, dims.rope_dim // 2, device=device) * 6.28
    cis = torch.polar(torch.ones_like(angles), angles)
    gate = rand(t * dims.top_k, dims.inter)
    router = rand(dims.experts, d, dt=torch.float32, scale=d**-0.5)
    bias = rand(dims.experts, dt=torch.float32, scale=0.1)
    up = rand(dims.experts, 2 * dims.inter, d, scale=d**-0.5)
    down = rand(dims.experts, d, dims.inter, scale=dims.inter**-0.5)
    idx = torch.stack([torch.randperm(dims.experts, generator=g, device=device)[: dims.top_k] for _ in range(t)])
    weights = torch.rand(t, dims.top_k, device=device)
    slots = 4 * (dims.window + dims.entries)
    store = rand(slots, dims.head_dim)  # window rows and entries of several sequences, one pool
    window = torch.randint(0, slots, (t, dims.window), generator=g, device=device)
    picks = torch.randint(0, slots, (t, dims.entries), generator=g, device=device)
    every = torch.ones(t, dims.window, dtype=torch.bool, device=device)
    picked = torch.ones(t, dims.entries, dtype=torch.bool, device=device)
    sink = rand(dims.heads, dt=torch.float32)
    blocks = max(1, t // dims.ratio)
    rows = rand(slots, 4 * dims.head_dim)  # ratio-4 compressor rows [kv | score], two half-series
    emit = torch.randint(0, slots, (blocks, 2 * dims.ratio), generator=g, device=device)
    ape = rand(dims.ratio, 2 * dims.head_dim, dt=torch.float32)
    norm_w = rand(dims.head_dim, dt=torch.float32)
    emit_cis = cis[:1].expand(blocks, -1)
    iq, iw = rand(t, dims.index_heads, dims.index_dim), rand(t, dims.index_heads, dt=torch.float32)
    ikeys, visible = rand(slots, dims.index_dim), 4 * dims.entries  # keys visible at 4·topk·ratio tokens
    irows = torch.randint(0, slots, (t, visible), generator=g, device=device)
    ivalid = torch.ones(t, visible, dtype=torch.bool, device=device)
    logits = rand(t, dims.vocab, dt=torch.float32)
    tokens_ = torch.randint(0, dims.vocab, (t,), generator=g, device=device)
    hd, a = dims.heads * dims.head_dim, t * dims.top_k
    used = min(dims.experts, a)  # experts that get a token (at most all of them)
    return [
        Case("linear (wq_a)", lambda: matmul.linear(x, w_q), e * (t * d + dims.q_lora * d + t * dims.q_lora),
             2 * t * d * dims.q_lora),
        Case("rms_norm", lambda: norm.rms_norm(x, norm_w.new_ones(d), 1e-6), 2 * e * t * d, 3 * t * d),
        Case("rope (q)", lambda: norm.rope(q, cis, False), 2 * e * t * hd + 8 * t * dims.rope_dim // 2, 3 * t * hd),
        Case(f"hc_pre (n={n}, {dims.sinkhorn_iters} iters)",
             lambda: mhc.hc_pre(h, fn, base, scale, rms_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=dims.sinkhorn_iters),
             e * (t * n * d + t * d) + 4 * fn.numel(), 2 * t * fn.numel() + 2 * t * n * d),
        Case(f"hc_post (n={n})", lambda: mhc.hc_post(x, h, post, comb), e * (t * d + 2 * t * n * d), 2 * t * n * n * d),
        Case(f"route ({dims.experts} experts, top {dims.top_k})",
             lambda: moe.route(x, router, bias, None, score_func="sqrtsoftplus", top_k=dims.top_k, route_scale=1.0),
             e * t * d + 4 * router.numel(), 2 * t * router.numel()),
        Case("swiglu", lambda: moe.swiglu(gate, gate, 10.0), 3 * e * gate.numel(), 5 * gate.numel()),
        Case("experts (grouped GEMM)", lambda: experts.moe_experts(x, idx, weights, up, down, 10.0),
             e * (used * 3 * dims.inter * d + 2 * t * d + 3 * a * dims.inter), 6 * a * d * dims.inter),
        Case("sink attention (window + entries)",
             lambda: attention.sink_attention(q, [(store, window, every), (store, picks, picked)], sink,
                                              dims.head_dim**-0.5),
             e * (2 * t * hd + t * (dims.window + dims.entries) * dims.head_dim),
             4 * t * dims.heads * (dims.window + dims.entries) * dims.head_dim),
        Case("compress entries (ratio 4)",
             lambda: attention.compress_entries(rows, emit, emit.new_ones(emit.shape, dtype=torch.bool), ape=ape,
                                                norm_weight=norm_w, eps=1e-6, cis=emit_cis, overlap=True),
             e * blocks * (2 * dims.ratio * 2 * dims.head_dim + dims.head_dim),
             8 * blocks * dims.ratio * dims.head_dim),
        Case("indexer scores", lambda: attention.index_scores(iq, iw, ikeys, irows, ivalid),
             e * t * (visible * dims.index_dim + dims.index_heads * dims.index_dim) + 4 * t * visible,
             2 * t * dims.index_heads * visible * dims.index_dim),
        Case("token logprobs", lambda: norm.token_logprobs(logits, tokens_), 4 * t * dims.vocab, 3 * t * dims.vocab),
    ]


def skip_reason() -> str | None:
    """Why nothing can be timed here, or None."""
    if interpreted():
        return f"{INTERPRET_ENV} is set: the interpreter's timings mean nothing"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def peaks(dtype: torch.dtype) -> tuple[float, float]:
    """Memory bandwidth (bytes/s, from the device's properties) and matmul FLOP/s (measured)."""
    import triton.testing

    props = torch.cuda.get_device_properties(0)
    bandwidth = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
    a = torch.randn(8192, 8192, device="cuda").to(dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = triton.testing.do_bench(lambda: torch.mm(a, a))
    return bandwidth, 2 * 8192**3 / (ms * 1e-3)


def main(argv: list[str] | None = None) -> int:
    """Print the table (or why it is skipped); exit status 0 either way."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 2048], help="tokens per call (decode, prefill)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        print(f"bench_kernels: skipped: {reason}")
        return 0
    import triton.testing

    dtype = DTYPES[args.dtype]
    bandwidth, flops = peaks(dtype)
    print(f"{torch.cuda.get_device_name(0)}, {args.dtype}: peak {bandwidth / 1e9:.0f} GB/s (properties), "
          f"{flops / 1e12:.1f} TFLOP/s (torch.mm 8192², measured)")
    print(f"{'tokens':>6}  {'kernel':<36} {'µs':>9} {'GB/s':>8} {'% bw':>6} {'GFLOP/s':>9} {'% flops':>7}")
    for tokens in args.tokens:
        for case in cases(tokens, Dims(), torch.device("cuda"), dtype):
            s = triton.testing.do_bench(case.run) * 1e-3
            print(f"{tokens:>6}  {case.name:<36} {s * 1e6:>9.1f} {case.bytes / s / 1e9:>8.1f} "
                  f"{100 * case.bytes / s / bandwidth:>5.1f}% {case.flops / s / 1e9:>9.1f} "
                  f"{100 * case.flops / s / flops:>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

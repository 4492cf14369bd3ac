"""Engine benchmark: dsv4 vs transformers on the same DeepSeek-V4 checkpoint, in one run.

Reports offline throughput (dsv4 Engine vs transformers' batched and one-at-a-time ``generate``,
greedy, same prompts), decode step time at several batch sizes (and transformers' at batch 1 and at
the widest batch), achieved FLOP/s against a measured fp32 matmul peak, and KV-cache bytes per token
against a dense cache of the same model dims.

    python benchmarks/bench_engine.py                 # a ~60M-parameter checkpoint made on the fly
    python benchmarks/bench_engine.py --model DIR     # an existing checkpoint (with tokenizer.json)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import dsv4
from dsv4 import Engine, SamplingParams
from dsv4.core.config import ModelConfig
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_byte_tokenizer

BENCH_CONFIG = dict(
    vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, head_dim=128,
    qk_rope_head_dim=32, q_lora_rank=256, o_groups=4, o_lora_rank=128, sliding_window=128,
    index_n_heads=16, index_head_dim=64, index_topk=128, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=256, compress_ratio_hca=128, max_position_embeddings=65536,
    num_nextn_predict_layers=0,
)


def matmul_peak(seconds: float = 2.0) -> float:
    """Best fp32 GFLOP/s of square matmuls on this machine (the physical ceiling)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        end = time.perf_counter() + seconds / 2
        while time.perf_counter() < end:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Model FLOPs of one decoded token at ``context``: 2·(active weights) + attention scores/values."""
    d, h, dim = cfg.head_dim, cfg.num_attention_heads, cfg.hidden_size
    n, ql, ci, ni = cfg.hc_mult, cfg.q_lora_rank, cfg.index_head_dim, cfg.index_n_heads
    weights = cfg.vocab_size * dim  # head
    attn_flops = 0.0
    for i in range(cfg.num_hidden_layers):
        r = cfg.compress_ratio(i)
        weights += dim * ql + ql * h * d + dim * d + h * d * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * dim
        weights += 2 * ((2 + n) * n * n * dim)  # mHC mixes
        weights += cfg.n_routed_experts * dim + (cfg.num_experts_per_tok + 1) * 3 * dim * cfg.moe_intermediate_size
        visible = 0
        if r:
            coff = 2 if cfg.layer_types[i] == "compressed_sparse_attention" else 1
            weights += 2 * coff * d * dim
            visible = context // r
            if coff == 2:
                weights += ql * ni * ci + dim * ni + 2 * 2 * ci * dim
                if visible > cfg.index_topk:  # else every entry is picked: nothing to score (dsv4 skips it)
                    attn_flops += 2 * ni * ci * visible  # indexer scores
                visible = min(visible, cfg.index_topk)
        attn_flops += 2 * 2 * h * d * (min(context, cfg.sliding_window) + visible)
    return 2.0 * weights + attn_flops


def make_checkpoint(path: Path) -> None:
    cfg = ModelConfig.tiny(**BENCH_CONFIG)
    dsv4.save_model(random_model(cfg, seed=0), path)
    write_byte_tokenizer(path, vocab_size=cfg.vocab_size)


def decode_step_ms(model_dir: Path, batch: int, context: int, steps: int, native: bool = True) -> float:
    """Steady-state time of one decode step with ``batch`` running sequences at ``context`` tokens
    (``native=False``: the engine without dsv4's native CPU kernels, on its PyTorch paths)."""
    engine = Engine(model_dir, max_num_seqs=batch, max_num_batched_tokens=max(batch, 2048),
                    max_model_len=context + 6 * steps + batch + 8, native_kernels=native)
    params = SamplingParams(temperature=0, max_tokens=6 * steps + batch, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        engine.add_request(torch.randint(2, 1000, (context,), generator=g).tolist(), params)
    while any(s.num_computed < s.num_tokens - 1 for r in engine.requests.values() for s in r.seqs):
        engine.step()  # prefill (early sequences already decode meanwhile)
    engine.step()
    dt = float("inf")
    for _ in range(3):  # best of three rounds: this machine is shared and noisy
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        dt = min(dt, (time.perf_counter() - t) / steps * 1000)
    for rid in list(engine.requests):
        engine.abort(rid)
    return dt


def dsv4_throughput(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> float:
    engine = Engine(model_dir, max_num_seqs=len(prompts), max_num_batched_tokens=4096)
    t = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    dt = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def hf_throughput(model_dir: Path, prompts: list[list[int]], new_tokens: int, batched: bool) -> float:
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    groups = [prompts] if batched else [[p] for p in prompts]
    t = time.perf_counter()
    made = 0
    with torch.inference_mode():
        for group in groups:
            ids = torch.tensor(group)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            made += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return made / (time.perf_counter() - t)


def hf_decode_ms(model_dir: Path, prompt: list[int], steps: int) -> float:
    """transformers' batch-1 decode step (ms): ``generate`` of 1 + steps tokens minus 1 token, per step,
    so its prefill is not counted (best of three)."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(new: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    run(2)  # warm-up
    return min((run(1 + steps) - run(1)) / steps * 1000 for _ in range(3))


def hf_batched_decode_ms(model_dir: Path, prompts: list[list[int]], steps: int = 10) -> float:
    """transformers' decode step (ms) for ``len(prompts)`` equal-length prompts decoding together,
    greedy, through its own cache (prefill excluded; best step after two warm-up steps)."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    best = float("inf")
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(steps + 2):
            t = time.perf_counter()
            out = model(nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if step >= 2:
                best = min(best, (time.perf_counter() - t) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: make a ~60M one)")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence")
    ap.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    ap.add_argument("--requests", type=int, default=64, help="prompts in the throughput comparison")
    ap.add_argument("--serial-requests", type=int, default=4, help="prompts for transformers one-at-a-time")
    ap.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    dsv4.tune_allocator()  # as `dsv4 serve` and `dsv4 batch` do (both sides of the comparison share it)

    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = Path(tmp.name)
        make_checkpoint(model_dir)
    cfg = ModelConfig.from_pretrained(model_dir)
    params_m = sum(t.numel() for t in dsv4.load_model(model_dir).state_dict().values()) / 1e6
    peak = matmul_peak()
    fpt = flops_per_token(cfg, args.context)
    res: dict[str, object] = {"params_M": round(params_m, 1), "threads": torch.get_num_threads(),
                              "fp32_peak_GFLOPs": round(peak, 1), "MFLOP_per_token": round(fpt / 1e6, 1)}
    print(f"model {params_m:.1f}M params, {torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s, "
          f"{fpt / 1e6:.1f} MFLOP/token at context {args.context}")

    print(f"\ndecode step (context {args.context}):\n  batch   ms/step   tok/s   GFLOP/s   % of peak"
          "   PyTorch paths ms/step (native kernels off)")
    decode: dict[int, dict[str, float]] = {}
    for b in (int(x) for x in args.batches.split(",")):
        ms = decode_step_ms(model_dir, b, args.context, steps=8)
        plain = decode_step_ms(model_dir, b, args.context, steps=8, native=False)
        tps = b / ms * 1000
        gf = tps * fpt / 1e9
        decode[b] = {"ms_per_step": round(ms, 2), "tok_s": round(tps, 1), "GFLOPs": round(gf, 1),
                     "pct_peak": round(100 * gf / peak, 1), "pytorch_paths_ms_per_step": round(plain, 2)}
        print(f"  {b:5d}   {ms:7.1f}   {tps:5.0f}   {gf:7.1f}   {100 * gf / peak:6.1f}%   {plain:7.1f}")
    res["decode"] = decode

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 1000, (args.context,), generator=g).tolist() for _ in range(args.requests)]
    ours = dsv4_throughput(model_dir, prompts, args.new_tokens)
    res["dsv4_tok_s"] = round(ours, 1)
    print(f"\noffline throughput, {args.requests} prompts x {args.context} tokens, {args.new_tokens} new, greedy:")
    print(f"  dsv4 Engine                      {ours:8.1f} tok/s")
    if not args.skip_hf:
        hf_b = hf_throughput(model_dir, prompts, args.new_tokens, batched=True)
        hf_1 = hf_throughput(model_dir, prompts[: args.serial_requests], args.new_tokens, batched=False)
        res.update(hf_batched_tok_s=round(hf_b, 1), hf_serial_tok_s=round(hf_1, 1))
        print(f"  transformers generate (batched)  {hf_b:8.1f} tok/s   dsv4 is {ours / hf_b:5.1f}x")
        print(f"  transformers generate (1 by 1)   {hf_1:8.1f} tok/s   dsv4 is {ours / hf_1:5.1f}x")
        hf_ms = hf_decode_ms(model_dir, prompts[0], args.new_tokens)
        ours_ms = decode[1]["ms_per_step"] if 1 in decode else decode_step_ms(model_dir, 1, args.context, 8)
        res.update(hf_batch1_decode_ms=round(hf_ms, 2))
        print(f"  batch-1 decode step at context {args.context}: dsv4 {ours_ms:.1f} ms vs transformers "
              f"{hf_ms:.1f} ms (dsv4 is {hf_ms / ours_ms:.2f}x)")
        widest = max((b for b in decode if b <= len(prompts)), default=0)
        if widest > 1:
            hf_wide = hf_batched_decode_ms(model_dir, prompts[:widest])
            res.update(hf_batched_decode_ms={widest: round(hf_wide, 2)})
            ours_wide = decode[widest]["ms_per_step"]
            print(f"  batch-{widest} decode step at context {args.context}: dsv4 {ours_wide:.1f} ms vs transformers "
                  f"{hf_wide:.1f} ms (its own cache; dsv4 is {hf_wide / ours_wide:.2f}x)")

    # KV bytes per token of context: pages actually held by one sequence vs a dense per-layer cache.
    ctx = len(prompts[0]) * 16
    engine = Engine(model_dir, max_num_seqs=1, max_model_len=ctx + 8, max_num_batched_tokens=ctx)
    engine.add_request(prompts[0] * 16, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the whole prompt is in the cache; the request is still running
    stats = engine.kv_stats()  # what the engine itself reports
    used = {s: v["bytes"] for s, v in stats.items() if s != "total"}
    elem = 4
    dense = cfg.num_hidden_layers * cfg.head_dim * elem  # one shared K=V head per layer, every token
    print(f"\nKV cache at context {ctx} (fp32 pool, page 16):")
    for s, b in used.items():
        print(f"  {s:10s} {b / ctx:8.1f} bytes/token")
    total = sum(used.values()) / ctx
    print(f"  total      {total:8.1f} bytes/token vs dense cache {dense} bytes/token ({dense / total:.1f}x smaller)")
    res["kv_bytes_per_token"] = round(total, 1)
    res["dense_kv_bytes_per_token"] = dense
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

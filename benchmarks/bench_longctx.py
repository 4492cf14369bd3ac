"""Long-context benchmark: prefill time, decode step time and peak memory of one long prompt.

For each context length, on bench_engine.py's model (``BENCH_CONFIG``: 6 layers, hidden 512, window
128, index top-k 128, compress ratios 4 and 128), a :class:`dsv4.Engine` with one sequence and the
engine's default chunked prefill (``--chunk`` new tokens per step) prefills one prompt of random
tokens and decodes ``--new-tokens`` tokens greedily. Reported per length: prefill time (time to the
first token), decode ms/token (median step after the first token), peak RSS, and the peak beyond what
the process held once the engine was built and warmed up (weights, packed weight copies and the KV
pool, which is allocated for the whole context up front). Each length runs in its own process, so
the peaks are separate. The growth exponent is the log-log slope of prefill seconds against length:
between successive lengths, and overall from 16k (or the first length) to the longest.

    python benchmarks/bench_longctx.py                          # 1k, 4k, 16k, 64k
    python benchmarks/bench_longctx.py --lengths 16k,64k,128k
    python benchmarks/bench_longctx.py --max 128k               # 1k, 4k, 16k, 64k, 128k
    python benchmarks/bench_longctx.py --transformers           # also transformers' prefill, up to --hf-max
    python benchmarks/bench_longctx.py --threads 1              # steadier on a machine others are using
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import BENCH_CONFIG, make_checkpoint  # noqa: E402

import dsv4  # noqa: E402
from dsv4 import Engine, SamplingParams  # noqa: E402

_GB = 1024**3


def parse_length(text: str) -> int:
    """``"16k"`` -> 16384, ``"1000"`` -> 1000."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def lengths_up_to(longest: int) -> list[int]:
    """1k, 4k, 16k, … (powers of four) below ``longest``, then ``longest``."""
    out, n = [], 1024
    while n < longest:
        out.append(n)
        n *= 4
    return out + [longest]


def _status_kb(field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status, in kB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, int(BENCH_CONFIG["vocab_size"]), (length,), generator=g).tolist()


def measure_dsv4(model_dir: Path, length: int, new_tokens: int, chunk: int) -> dict[str, float]:
    """One engine, one prompt of ``length`` tokens: prefill seconds, decode ms/token and memory."""
    dsv4.tune_allocator()  # as `dsv4 serve` and `dsv4 batch` do
    engine = Engine(model_dir, max_num_seqs=1, max_num_batched_tokens=chunk, max_model_len=length + new_tokens + 1)
    # Warm-up (kernel build and load, first-use allocations), then the baseline the peak is measured from.
    engine.generate([_prompt(min(length, 512), seed=1)], SamplingParams(max_tokens=2, ignore_eos=True))
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS")
    engine.add_request(_prompt(length, seed=0), SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    prefill = math.nan
    steps: list[float] = []
    kv_bytes = 0.0
    while engine.has_unfinished():
        t = time.perf_counter()
        outs = engine.step()
        if outs and math.isnan(prefill):
            prefill = time.perf_counter() - start
            kv_bytes = engine.kv_stats()["total"]["bytes"]
        elif outs:
            steps.append(time.perf_counter() - t)
    peak_kb = _status_kb("VmHWM")
    return {
        "length": length,
        "prefill_s": prefill,
        "prefill_tok_s": length / prefill,
        "decode_ms": 1000 * statistics.median(steps) if steps else math.nan,
        "peak_rss_gb": peak_kb * 1024 / _GB,
        "base_rss_gb": base_kb * 1024 / _GB,
        "extra_peak_gb": (peak_kb - base_kb) * 1024 / _GB if reset else math.nan,
        "kv_mb": kv_bytes / 1024**2,
    }


def measure_transformers(model_dir: Path, length: int) -> dict[str, float]:
    """transformers' ``DeepseekV4ForCausalLM``: one forward over the whole prompt (its prefill)."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        model(torch.tensor([_prompt(min(length, 512), seed=1)]), use_cache=True)  # warm-up
        reset = _reset_peak()
        base_kb = _status_kb("VmRSS")
        t = time.perf_counter()
        model(torch.tensor([_prompt(length, seed=0)]), use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
    peak_kb = _status_kb("VmHWM")
    return {"length": length, "prefill_s": prefill, "peak_rss_gb": peak_kb * 1024 / _GB,
            "extra_peak_gb": (peak_kb - base_kb) * 1024 / _GB if reset else math.nan}


def run_worker(args: list[str]) -> dict[str, float] | None:
    """This script in a fresh process (``--worker …``); its JSON result, or None if it failed."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  worker {' '.join(args)} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def slope(a: dict[str, float], b: dict[str, float]) -> float:
    """Log-log slope of prefill seconds between two lengths."""
    return math.log(b["prefill_s"] / a["prefill_s"]) / math.log(b["length"] / a["length"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1k,4k,16k,64k", help="context lengths (k = 1024)")
    ap.add_argument("--max", type=parse_length, help="lengths 1k, 4k, 16k, … up to this one (overrides --lengths)")
    ap.add_argument("--new-tokens", type=int, default=16, help="generated tokens (decode steps + 1)")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk: the engine's max_num_batched_tokens")
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: bench_engine's model, made on the fly)")
    ap.add_argument("--threads", type=int, help="torch threads per measurement (default: torch's)")
    ap.add_argument("--transformers", action="store_true", help="also time transformers' prefill")
    ap.add_argument("--hf-max", type=parse_length, default=16384, help="longest context for --transformers")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--worker", choices=("dsv4", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:  # one measurement, printed as JSON
        if args.worker == "dsv4":
            res = measure_dsv4(args.model, args.length, args.new_tokens, args.chunk)
        else:
            res = measure_transformers(args.model, args.length)
        print(json.dumps(res))
        return

    lengths = lengths_up_to(args.max) if args.max else [parse_length(x) for x in args.lengths.split(",")]
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = Path(tmp.name)
        make_checkpoint(model_dir)
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(f"{torch.get_num_threads()} threads, chunk {args.chunk}, {args.new_tokens} new tokens\n")
    print("  context   prefill s   prefill tok/s   decode ms/tok   peak RSS GB   extra peak GB   KV MB   slope")
    rows: list[dict[str, float]] = []
    for length in lengths:
        res = run_worker(["--worker", "dsv4", "--model", str(model_dir), "--length", str(length),
                          "--new-tokens", str(args.new_tokens), "--chunk", str(args.chunk), *threads])
        if res is None:
            continue
        grow = f"{slope(rows[-1], res):5.2f}" if rows else "    -"
        rows.append(res)
        print(f"  {length:7d}   {res['prefill_s']:9.2f}   {res['prefill_tok_s']:13.0f}   {res['decode_ms']:13.1f}   "
              f"{res['peak_rss_gb']:11.2f}   {res['extra_peak_gb']:13.2f}   {res['kv_mb']:5.0f}   {grow}", flush=True)
    summary: dict[str, object] = {"dsv4": rows}
    if len(rows) >= 2:
        first = next((r for r in rows if r["length"] >= 16384 and r is not rows[-1]), rows[0])
        overall = slope(first, rows[-1])
        ratio = rows[-1]["decode_ms"] / rows[0]["decode_ms"]
        summary.update(growth_exponent=overall, decode_ratio=ratio)
        print(f"\n  growth exponent {first['length']}→{rows[-1]['length']}: {overall:.2f}; decode at "
              f"{rows[-1]['length']} is {ratio:.2f}x decode at {rows[0]['length']}")
    if args.transformers:
        print("\n  transformers DeepseekV4ForCausalLM (one forward, no chunking)\n"
              "  context   prefill s   peak RSS GB   extra peak GB")
        hf = []
        for length in (n for n in lengths if n <= args.hf_max):
            res = run_worker(["--worker", "transformers", "--model", str(model_dir), "--length", str(length), *threads])
            if res is None:
                break
            hf.append(res)
            print(f"  {length:7d}   {res['prefill_s']:9.2f}   {res['peak_rss_gb']:11.2f}   "
                  f"{res['extra_peak_gb']:13.2f}", flush=True)
        summary["transformers"] = hf
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

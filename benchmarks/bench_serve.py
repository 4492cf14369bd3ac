"""Serving benchmark: ``dsv4 serve`` vs ``transformers serve`` on the same checkpoint, in one run.

N concurrent streaming clients send fixed prompts to ``/v1/completions`` (greedy, ``max_tokens`` M) until
R requests are done; reported per server: output tokens/s over the run, time to first token (TTFT) and
time per output token after the first (TPOT = (latency - TTFT) / (tokens - 1)) at p50/p90/p99, then the
ratios. Both servers run one after the other on 127.0.0.1, each in its own process, started and stopped here.

    python benchmarks/bench_serve.py                         # a ~60M-parameter checkpoint made on the fly
    python benchmarks/bench_serve.py --model DIR             # an existing checkpoint (with tokenizer.json)
    python benchmarks/bench_serve.py --clients 4 --requests 16 --max-tokens 16 --tiny   # a quick look

``transformers serve`` needs ``accelerate`` (``pip install accelerate``); when it cannot start or answer,
the table says why and dsv4's figures still print.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TEXT = (
    "The little robot woke up before the sun and walked to the window. Outside, the river was quiet and the "
    "boats were still tied to the old wooden pier. It counted the boats, one, two, three, four, and then it "
    "counted them again, because counting made the morning feel orderly. In the kitchen the kettle began to hum. "
    "The robot poured water into a cup, added a spoon of honey, and carried the cup to the table where the old "
    "man was reading. They spent the morning in the garden, where the tomatoes were red and heavy and the beans "
    "had climbed over the fence. In the afternoon it rained, and the man taught the robot to play chess."
)


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process on 127.0.0.1, its log in a file; ``stop`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path) -> None:
        self.name, self.cmd, self.port, self.log = name, cmd, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> str | None:
        """Start and wait for ``/health``; None, or why it did not come up."""
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with status {self.proc.returncode}: {self.tail()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return None
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        return f"not healthy after {timeout:.0f} s: {self.tail()}"

    def tail(self, lines: int = 3) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------ clients
@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    tokens: int = 0
    text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0

    @property
    def good(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first: float | None = None
    text, chunks, usage = [], 0, None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Sample(False, error=str(event["error"])[:200])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    if first is None:
                        first = time.perf_counter()
                    if choice.get("text"):
                        text.append(choice["text"])
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Sample(False, error=f"{type(e).__name__}: {e}"[:200])
    end = time.perf_counter()
    if first is None:
        return Sample(False, error="no tokens streamed")
    tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else chunks
    return Sample(True, ttft=first - t0, latency=end - t0, tokens=tokens, text="".join(text))


async def drive(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int,
                timeout: float) -> RunResult:
    """``clients`` workers take the next prompt until ``requests`` are done (or ``timeout`` s pass)."""
    todo = iter(range(requests))
    result = RunResult()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(http: httpx.AsyncClient) -> None:
        for i in todo:
            result.samples.append(await one_request(http, model, prompts[i % len(prompts)], max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(http)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.wall = time.perf_counter() - t0
        if pending:
            result.samples.append(Sample(False, error=f"run cut off after {timeout:.0f} s"))
    return result


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summarize(name: str, run: RunResult) -> dict[str, Any]:
    good = run.good
    ttft = [s.ttft * 1000 for s in good]
    tpot = [t * 1000 for s in good if (t := s.tpot) is not None]
    tokens = sum(s.tokens for s in good)
    errors = [s.error for s in run.samples if not s.ok]
    return {
        "server": name, "ok": len(good), "failed": len(errors), "first_error": errors[0] if errors else "",
        "wall_s": round(run.wall, 2), "output_tokens": tokens, "tok_s": round(tokens / run.wall, 1) if run.wall else 0.0,
        "ttft_ms": {f"p{q}": round(pct(ttft, q), 1) for q in (50, 90, 99)},
        "tpot_ms": {f"p{q}": round(pct(tpot, q), 2) for q in (50, 90, 99)},
    }


# ----------------------------------------------------------------------------------------------- main
def make_prompts(count: int, words: int) -> list[str]:
    vocab = TEXT.split()
    return [" ".join(vocab[(7 * i + j) % len(vocab)] for j in range(words)) for i in range(count)]


def bench(server: Server, model: str, args: argparse.Namespace, prompts: list[str]) -> tuple[dict[str, Any], str]:
    """Start, warm up, measure, stop: the summary and prompt 0's greedy text."""
    why = server.start(args.start_timeout)
    if why is not None:
        server.stop()
        return {"server": server.name, "unavailable": why}, ""
    try:
        warm = asyncio.run(drive(server.url, model, prompts[:1], 1, 1, args.max_tokens, args.timeout))
        if not warm.good:
            return {"server": server.name, "unavailable": f"warm-up request failed: {warm.samples[0].error}"}, ""
        # non-streaming: compares the model's greedy answer, not how each server chunks its stream
        r = httpx.post(f"{server.url}/v1/completions", timeout=args.timeout, json={
            "model": model, "prompt": prompts[0], "max_tokens": args.max_tokens, "temperature": 0})
        text = r.json()["choices"][0]["text"] if r.status_code == 200 else f"(HTTP {r.status_code})"
        run = asyncio.run(drive(server.url, model, prompts, args.clients, args.requests, args.max_tokens,
                                args.timeout))
        return summarize(server.name, run), text
    finally:
        server.stop()


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, checkpoint: str) -> None:
    print(f"\ncheckpoint: {checkpoint}")
    print(f"{args.clients} concurrent streaming clients, {args.requests} requests, prompts of {args.prompt_words} "
          f"words, max_tokens {args.max_tokens}, greedy, /v1/completions")
    head = (f"{'server':<20}{'ok':>5}{'fail':>6}{'wall s':>8}{'out tok/s':>11}   "
            f"{'TTFT ms p50 / p90 / p99':<26}{'TPOT ms p50 / p90 / p99'}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "unavailable" in r:
            print(f"{r['server']:<20}unavailable: {r['unavailable']}")
            continue
        t, p = r["ttft_ms"], r["tpot_ms"]
        print(f"{r['server']:<20}{r['ok']:>5}{r['failed']:>6}{r['wall_s']:>8.1f}{r['tok_s']:>11.1f}   "
              f"{t['p50']:>7.1f} {t['p90']:>7.1f} {t['p99']:>7.1f}   {p['p50']:>7.2f} {p['p90']:>7.2f} {p['p99']:>7.2f}")
        if r["failed"]:
            print(f"{'':<20}first error: {r['first_error']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: make one, see --tiny)")
    ap.add_argument("--tiny", action="store_true", help="make a tiny checkpoint instead of the ~60M one")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (N)")
    ap.add_argument("--requests", type=int, default=64, help="requests in all")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (M)")
    ap.add_argument("--prompt-words", type=int, default=48, help="words per prompt")
    ap.add_argument("--max-model-len", type=int, default=1024, help="dsv4's engine.max_model_len")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for one server's run")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds for a server to become healthy")
    ap.add_argument("--skip-hf", action="store_true", help="do not run transformers serve")
    ap.add_argument("--hf-continuous-batching", action="store_true",
                    help="run transformers serve with --continuous-batching (not supported for DeepSeek-V4 in "
                         "transformers 5.24: compressed_sparse_attention layers)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    work = Path(tmp.name)
    model_dir = args.model
    if model_dir is None:
        model_dir = work / "model"
        model_dir.mkdir()
        make_model(model_dir, tiny=args.tiny)
    model_dir = model_dir.resolve()
    prompts = make_prompts(max(8, args.clients), args.prompt_words)
    bindir = Path(sys.executable).parent
    rows: list[dict[str, Any]] = []
    texts: dict[str, str] = {}

    dsv4_cmd = [str(bindir / "dsv4"), "serve", "--model", str(model_dir), "--port", "{port}",
                "served_model_name=bench", "log_level=warning", f"max_pending={max(256, 2 * args.clients)}",
                f"engine.max_num_seqs={args.clients}", f"engine.max_model_len={args.max_model_len}"]
    port = free_port()
    dsv4_srv = Server("dsv4 serve", [c.format(port=port) for c in dsv4_cmd], port, work / "dsv4.log")
    row, texts["dsv4"] = bench(dsv4_srv, "bench", args, prompts)
    rows.append(row)

    hf = transformers_server(model_dir, work, skip=args.skip_hf,
                             extra=("--continuous-batching",) if args.hf_continuous_batching else ())
    if isinstance(hf, Server):
        row, texts["transformers"] = bench(hf, str(model_dir), args, prompts)
        rows.append(row)
    else:
        rows.append(hf)

    what = (str(args.model) if args.model is not None
            else "made here, tiny config (vocab 512)" if args.tiny else "made here, bench_engine's ~60M config")
    print_table(rows, args, what)
    if not args.hf_continuous_batching and not args.skip_hf:
        print("note: transformers serve runs without --continuous-batching (one generate per request); its paged "
              "cache rejects DeepSeek-V4's compressed_sparse_attention layers (try --hf-continuous-batching)")
    ours, theirs = rows[0], rows[1]
    if "unavailable" not in ours and "unavailable" not in theirs and theirs["ok"]:
        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "n/a"

        print(f"\ndsv4 vs transformers: throughput {ratio(ours['tok_s'], theirs['tok_s'])}, "
              f"TTFT p50 {ratio(theirs['ttft_ms']['p50'], ours['ttft_ms']['p50'])} lower, "
              f"TPOT p50 {ratio(theirs['tpot_ms']['p50'], ours['tpot_ms']['p50'])} lower "
              f"(ratios > 1: dsv4 is better)")
        a, b = texts["dsv4"], texts["transformers"]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"greedy text of prompt 0 identical on both servers: {a == b}"
              + ("" if a == b else f" (first difference at character {at} of {len(a)}/{len(b)}: "
                                   f"dsv4 {a[at:at + 20]!r} vs transformers {b[at:at + 20]!r})"))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                        indent=2))
    tmp.cleanup()


def transformers_server(model_dir: Path, work: Path, *, skip: bool, extra: tuple[str, ...] = ()) -> Server | dict[str, str]:
    """``transformers serve`` on ``model_dir`` (float32, CPU), not yet started; or the table row that says
    why it cannot run (skipped, or no ``transformers`` command in this environment)."""
    if skip:
        return {"server": "transformers serve", "unavailable": "skipped (--skip-hf)"}
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        return {"server": "transformers serve", "unavailable": "no `transformers` command in this env"}
    port = free_port()
    cmd = [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--log-level", "warning", *extra]
    return Server("transformers serve", cmd, port, work / "transformers.log")


def make_model(path: Path, *, tiny: bool) -> None:
    """A random checkpoint with a byte-level tokenizer: bench_engine's (~60M) or a tiny one."""
    if not tiny:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_engine import make_checkpoint

        make_checkpoint(path)
        return
    import dsv4
    from dsv4.core.config import ModelConfig
    from dsv4.testing.models import random_model
    from dsv4.testing.tokenizers import write_byte_tokenizer

    cfg = ModelConfig.tiny(vocab_size=512, num_nextn_predict_layers=0, max_position_embeddings=4096)
    dsv4.save_model(random_model(cfg, seed=0), path)
    write_byte_tokenizer(path, vocab_size=cfg.vocab_size)


if __name__ == "__main__":
    main()

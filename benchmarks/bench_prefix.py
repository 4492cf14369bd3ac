"""Prefix-cache benchmark: a multi-turn chat trace through ``dsv4 serve``, cache on vs off vs ``transformers serve``.

C conversations run at once. Each starts with the same system prompt; every turn resends the whole
history (system prompt, earlier user messages and the assistant's replies) plus a new user message to
``/v1/chat/completions`` (streaming, greedy, ``max_tokens`` M). Reported per server: time to first token
(TTFT) p50/p99 over all turns and over turns after the first, output tokens/s over the run, and, from
each response's ``usage.prompt_tokens_details.cached_tokens``, the share of prompt tokens and of *resent*
tokens (the previous turn's prompt and reply, which the server has seen) that the cache served. Each
server runs in its own process, one after the other, on 127.0.0.1.

    python benchmarks/bench_prefix.py                       # bench_engine's ~60M checkpoint, made on the fly
    python benchmarks/bench_prefix.py --tiny --conversations 2 --turns 3     # a quick look
    python benchmarks/bench_prefix.py --skip-hf             # dsv4 only (cache on and off)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import TEXT, Server, free_port, make_model, pct, transformers_server  # noqa: E402


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass
class Turn:
    conversation: int
    turn: int
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    resent_tokens: int = 0  # tokens of this prompt the server saw before: the previous prompt and reply
    error: str = ""


@dataclass
class Run:
    turns: list[Turn] = field(default_factory=list)
    wall: float = 0.0


def words(start: int, n: int) -> str:
    vocab = TEXT.split()
    return " ".join(vocab[(start + 7 * j) % len(vocab)] for j in range(n))


async def chat_turn(http: httpx.AsyncClient, model: str, messages: list[dict[str, str]], max_tokens: int,
                    c: int, t: int) -> tuple[Turn, str]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    turn = Turn(c, t, ok=False)
    text = []
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                turn.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return turn, ""
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and not turn.tokens:
                        turn.ttft = time.perf_counter() - t0
                    turn.tokens += bool(piece)
                    text.append(piece)
                usage = chunk.get("usage")
                if usage:
                    turn.prompt_tokens = usage["prompt_tokens"]
                    turn.tokens = usage["completion_tokens"]
                    turn.cached_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        turn.error = f"{type(e).__name__}: {e}"
        return turn, ""
    turn.latency = time.perf_counter() - t0
    turn.ok = turn.tokens > 0
    if not turn.ttft:
        turn.ttft = turn.latency
    return turn, "".join(text)


async def drive(url: str, model: str, args: argparse.Namespace) -> Run:
    system = words(0, args.system_words)
    run = Run()

    async def conversation(http: httpx.AsyncClient, c: int) -> None:
        messages = [{"role": "system", "content": system}]
        seen = 0  # tokens of the previous prompt and reply
        for t in range(args.turns):
            messages.append({"role": "user", "content": f"Conversation {c}, turn {t}: " + words(13 * c + t, args.user_words)})
            turn, reply = await chat_turn(http, model, messages, args.max_tokens, c, t)
            turn.resent_tokens = seen
            run.turns.append(turn)
            if not turn.ok:
                return
            seen = turn.prompt_tokens + turn.tokens
            messages.append({"role": "assistant", "content": reply})

    limits = httpx.Limits(max_connections=args.conversations + 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(http, c) for c in range(args.conversations)))
        run.wall = time.perf_counter() - t0
    return run


def summarize(name: str, run: Run) -> dict[str, Any]:
    ok = [t for t in run.turns if t.ok]
    later = [t for t in ok if t.turn > 0]
    prompt = sum(t.prompt_tokens for t in ok)
    resent = sum(t.resent_tokens for t in later)
    return {
        "server": name, "ok": len(ok), "failed": len(run.turns) - len(ok),
        "first_error": next((t.error for t in run.turns if not t.ok), ""), "wall_s": run.wall,
        "tok_s": sum(t.tokens for t in ok) / run.wall if run.wall else 0.0,
        "ttft_ms": {"p50": 1e3 * pct([t.ttft for t in ok], 50), "p99": 1e3 * pct([t.ttft for t in ok], 99)},
        "ttft_later_ms": {"p50": 1e3 * pct([t.ttft for t in later], 50), "p99": 1e3 * pct([t.ttft for t in later], 99)},
        "prompt_tokens": prompt, "cached_tokens": sum(t.cached_tokens for t in ok),
        "hit_rate": sum(t.cached_tokens for t in ok) / prompt if prompt else 0.0,
        "resent_hit_rate": min(1.0, sum(t.cached_tokens for t in later) / resent) if resent else 0.0,
        "mean_prompt_tokens": statistics.mean(t.prompt_tokens for t in ok) if ok else 0.0,
    }


def bench(server: Server, model: str, args: argparse.Namespace) -> dict[str, Any]:
    why = server.start(args.start_timeout)
    if why is not None:
        server.stop()
        return {"server": server.name, "unavailable": why}
    try:
        warm = httpx.post(f"{server.url}/v1/chat/completions", timeout=args.timeout, json={
            "model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2})
        if warm.status_code != 200:
            return {"server": server.name, "unavailable": f"warm-up request: HTTP {warm.status_code} {warm.text[:200]}"}
        return summarize(server.name, asyncio.run(drive(server.url, model, args)))
    finally:
        server.stop()


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, checkpoint: str) -> None:
    print(f"\ncheckpoint: {checkpoint}")
    print(f"{args.conversations} conversations at once x {args.turns} turns; system prompt {args.system_words} words, "
          f"{args.user_words} words per user message, max_tokens {args.max_tokens}, greedy, streaming chat")
    head = (f"{'server':<24}{'ok':>4}{'wall s':>8}{'out tok/s':>10}  {'TTFT ms p50 / p99':<20}"
            f"{'later turns p50 / p99':<24}{'hit %':>6}{'resent hit %':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "unavailable" in r:
            print(f"{r['server']:<24}unavailable: {r['unavailable']}")
            continue
        t, lt = r["ttft_ms"], r["ttft_later_ms"]
        print(f"{r['server']:<24}{r['ok']:>4}{r['wall_s']:>8.1f}{r['tok_s']:>10.1f}  {t['p50']:>8.0f} {t['p99']:>8.0f}   "
              f"{lt['p50']:>9.0f} {lt['p99']:>9.0f}      {100 * r['hit_rate']:>6.1f}{100 * r['resent_hit_rate']:>13.1f}")
        if r["failed"]:
            print(f"{'':<24}failed {r['failed']}: {r['first_error']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: make one, see --tiny)")
    ap.add_argument("--tiny", action="store_true", help="make a tiny checkpoint instead of the ~60M one")
    ap.add_argument("--conversations", type=int, default=4, help="conversations at once (C)")
    ap.add_argument("--turns", type=int, default=8, help="turns per conversation")
    ap.add_argument("--system-words", type=int, default=150, help="words in the shared system prompt")
    ap.add_argument("--user-words", type=int, default=40, help="words per user message")
    ap.add_argument("--max-tokens", type=int, default=24, help="max_tokens per turn (M)")
    ap.add_argument("--max-model-len", type=int, default=8192, help="dsv4's engine.max_model_len")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for one request")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds for a server to become healthy")
    ap.add_argument("--skip-hf", action="store_true", help="do not run transformers serve")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-prefix-")
    work = Path(tmp.name)
    model_dir = args.model
    if model_dir is None:
        model_dir = work / "model"
        model_dir.mkdir()
        make_model(model_dir, tiny=args.tiny)
        # one chat template for both servers (transformers serve has no fallback for a tokenizer without one)
        from dsv4.testing.tokenizers import write_byte_tokenizer

        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        write_byte_tokenizer(model_dir, vocab_size=vocab, chat_template=CHAT_TEMPLATE)
    model_dir = model_dir.resolve()
    bindir = Path(sys.executable).parent
    rows = []
    for name, cache in (("dsv4 serve, cache on", "true"), ("dsv4 serve, cache off", "false")):
        port = free_port()
        cmd = [str(bindir / "dsv4"), "serve", "--model", str(model_dir), "--port", str(port),
               "served_model_name=bench", "log_level=warning", f"engine.max_num_seqs={args.conversations}",
               f"engine.max_model_len={args.max_model_len}", f"engine.prefix_cache={cache}"]
        rows.append(bench(Server(name, cmd, port, work / f"dsv4-{cache}.log"), "bench", args))
    hf = transformers_server(model_dir, work, skip=args.skip_hf)
    rows.append(bench(hf, str(model_dir), args) if isinstance(hf, Server) else hf)
    what = (str(args.model) if args.model is not None
            else "made here, tiny config (vocab 512)" if args.tiny else "made here, bench_engine's ~60M config")
    print_table(rows, args, what)
    on, off = rows[0], rows[1]
    if "unavailable" not in on and "unavailable" not in off:
        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "n/a"

        print(f"\ncache on vs off: TTFT p50 {ratio(on['ttft_ms']['p50'], off['ttft_ms']['p50'])} "
              f"(later turns {ratio(on['ttft_later_ms']['p50'], off['ttft_later_ms']['p50'])}), "
              f"throughput {ratio(on['tok_s'], off['tok_s'])}; {100 * on['resent_hit_rate']:.1f}% of resent tokens "
              f"served from the cache")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                        indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()

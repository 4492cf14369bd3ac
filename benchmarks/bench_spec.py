"""MTP speculative decoding benchmark: speculation on vs off in one run, at several batch sizes.

Two models: the bundled default model (its MTP block was trained along by the addition recipe's SFT;
its answers are a few tokens long) and a benchmark model of the engine benchmark's shape, trained here
from scratch with the MTP loss (SFT) on generated records (``"3. alice, 34, paris"`` lines: formats and
names an MTP block can learn to predict, numbers it cannot). For each, greedy decoding of the same
prompts with and without ``speculative="mtp"``: accept length (tokens per verifying step), milliseconds
per output token of a sequence (wall time / tokens each sequence produced), throughput, and the speedup.
The policy's own choice (``speculative_max_batch``) is shown beside the forced one.

    python benchmarks/bench_spec.py                       # trains the benchmark model (cached) and runs
    python benchmarks/bench_spec.py --batches 1 2 4 8 16 32 --tokens 96
    python benchmarks/bench_spec.py --model DIR           # a checkpoint of your own (with tokenizer.json)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

import dsv4
from dsv4 import Engine, SamplingParams
from dsv4.assets import default_model_dir
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.rl import algorithms
from dsv4.testing.models import random_model
from dsv4.testing.tokenizers import write_byte_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import BENCH_CONFIG  # noqa: E402

# The engine benchmark's shape with a byte-level vocabulary and one MTP block.
SPEC_CONFIG = {**BENCH_CONFIG, "vocab_size": 512, "max_position_embeddings": 4096, "num_nextn_predict_layers": 1}
NAMES = ["alice", "bob", "carol", "david", "emma", "frank", "grace", "henry", "irene", "jack", "karen", "louis",
         "maria", "nathan", "olivia", "peter", "quinn", "rachel", "samuel", "tina"]
CITIES = ["paris", "lima", "oslo", "tokyo", "cairo", "delhi", "quito", "rome", "seoul", "vienna", "dublin",
          "madrid", "nairobi", "toronto", "sydney"]
REPEATS = 3  # timed runs of each engine, interleaved; the best counts


def record_task(rng: random.Random) -> tuple[str, str]:
    """A prompt asking for n records and the records."""
    n = rng.randint(3, 8)
    start = rng.randint(1, 50)
    lines = [f"{start + i}. {rng.choice(NAMES)}, {rng.randint(18, 90)}, {rng.choice(CITIES)}" for i in range(n)]
    return f"list {n} people from {start}:\n", "\n".join(lines)


def train_spec_model(path: Path, steps: int, seed: int = 0) -> None:
    """SFT from scratch (LM loss + 0.3 · MTP loss) on generated records; saves a checkpoint to ``path``."""
    torch.manual_seed(seed)
    tok = write_byte_tokenizer(path, vocab_size=SPEC_CONFIG["vocab_size"])
    model = random_model(ModelConfig.tiny(**SPEC_CONFIG), seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        encoded = []
        for _ in range(8):
            prompt, answer = record_task(rng)
            p, a = tok.encode(prompt), tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id or 1]
            encoded.append((p + a, len(p)))
        batch = ForwardBatch.from_requests([ids for ids, _ in encoded], sample="all")
        targets = torch.zeros(batch.num_tokens, dtype=torch.long)
        mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
        for start, (ids, n_prompt) in zip(batch.starts_host, encoded, strict=True):
            targets[start : start + len(ids) - 1] = torch.tensor(ids[1:])
            mask[start + n_prompt - 1 : start + len(ids) - 1] = True
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        out = model.run(batch, mtp_ids=targets)
        lm = algorithms.sft_loss(out.logits, targets, mask)
        mtp = algorithms.mtp_loss(out.mtp_logits[0], targets, mask)
        opt.zero_grad(set_to_none=True)
        (lm + 0.3 * mtp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  train step {step:4d}: lm {lm.item():.3f}  mtp {mtp.item():.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    dsv4.save_model(model, path)


def timed(engine: Engine, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Wall seconds and outputs of one ``generate`` of ``prompts``."""
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def bench(name: str, model_dir: Path, prompts_of: list[str], batches: list[int], tokens: int, k: int, *,
          ignore_eos: bool = False) -> None:
    print(f"\n## {name}: k = {k}, {'' if ignore_eos else 'at most '}{tokens} tokens per sequence, greedy")
    print("| batch | plain ms/token | spec ms/token | speedup | accept length | per-position acceptance "
          "| policy (max_batch default) speedup |")
    print("|---|---|---|---|---|---|---|")
    model = dsv4.load_model(model_dir)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=ignore_eos)
    for b in batches:
        prompts = prompts_of[:b]
        common = dict(tokenizer=model_dir, prefix_cache=False, max_num_seqs=max(batches))
        engines = {"plain": Engine(model, **common),  # type: ignore[arg-type]
                   "forced": Engine(model, speculative="mtp", num_speculative_tokens=k,  # type: ignore[arg-type]
                                    speculative_max_batch=10**6, **common),
                   "policy": Engine(model, speculative="mtp", num_speculative_tokens=k, **common)}  # type: ignore[arg-type]
        best = dict.fromkeys(engines, float("inf"))
        ids: dict[str, list[list[int]]] = {}
        for e in engines.values():  # warm up
            e.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))
        for _ in range(REPEATS):  # interleaved, best of each: greedy outputs are the same every time
            for key, e in engines.items():
                wall, ids[key] = timed(e, prompts, params)
                best[key] = min(best[key], wall)
        per_seq = sum(len(i) for i in ids["plain"]) / b
        stats = engines["forced"].spec_stats()
        positions = " / ".join(f"{a:.2f}" for a in stats["position_acceptance"])
        same = ids["plain"] == ids["forced"] == ids["policy"]
        print(f"| {b} | {best['plain'] / per_seq * 1e3:.1f} | {best['forced'] / per_seq * 1e3:.1f} "
              f"| {best['plain'] / best['forced']:.2f}x | {stats['accept_length']:.2f} | {positions} "
              f"| {best['plain'] / best['policy']:.2f}x |{'' if same else ' OUTPUTS DIFFER'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a checkpoint directory to benchmark instead of the trained one")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv4-bench" / "spec-records",
                        help="where the trained benchmark model is kept between runs")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("-k", type=int, default=3, help="num_speculative_tokens")
    parser.add_argument("--skip-default", action="store_true", help="leave out the bundled default model")
    args = parser.parse_args()
    rng = random.Random(123)
    if not args.skip_default:
        adds = [f"{rng.randint(0, 999)}+{rng.randint(0, 999)}=" for _ in range(max(args.batches))]
        bench("bundled default model (addition)", default_model_dir(), adds, args.batches, 8, args.k)  # stops at EOS
    model_dir = args.model
    if model_dir is None:
        model_dir = args.cache
        if not (model_dir / "model.safetensors").is_file():
            print(f"training the benchmark model ({args.train_steps} steps) into {model_dir}", flush=True)
            model_dir.mkdir(parents=True, exist_ok=True)
            train_spec_model(model_dir, args.train_steps)
    prompts = [record_task(rng)[0] for _ in range(max(args.batches))]
    bench(f"benchmark model ({model_dir})", model_dir, prompts, args.batches, args.tokens, args.k, ignore_eos=True)


if __name__ == "__main__":
    main()

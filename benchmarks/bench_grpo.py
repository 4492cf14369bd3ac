"""GRPO benchmark: dsv4's GRPOTrainer vs TRL's GRPOTrainer, same checkpoint, same workload, one run.

Both sides start from one small DeepSeek-V4 checkpoint in transformers' format (dsv4's ``save_model``; loaded by
``dsv4.load_model`` and by ``transformers.DeepseekV4ForCausalLM.from_pretrained``) and the char tokenizer of the
addition recipe (``tokenizer.json``; TRL gets it as a ``PreTrainedTokenizerFast``). The checkpoint is the recipe's
``ADDITION_MODEL`` without its MTP block (transformers does not load MTP, and dsv4's GRPO does not train it),
warm-started with dsv4 SFT steps (default 120, ~25 s on an idle 2-core box) so that sampled completions earn
some reward (a random model earns ~0, which would make "reward per second" 0/0).

Workload, identical on both sides: the same ``AdditionTask`` prompts in the same order, P prompts per step,
G completions per prompt, at most M new tokens, temperature 1.0 (no top-k/top-p), S steps, reward = dsv4's
``numeric`` verifier, no KL (beta 0), one AdamW step per generation batch (TRL: per_device_train_batch_size =
generation_batch_size = P·G, num_iterations 1), clip 0.2/0.28, token-level loss normalisation (TRL "dapo"),
grad-norm clip 1.0, betas (0.9, 0.99), no weight decay, constant LR, fp32, no activation checkpointing.
dsv4 runs without dynamic sampling (no refills: exactly P·G completions per step, as TRL). ``--fewshot K`` puts
the same K worked examples before every prompt (as a few-shot block or system prompt would be): dsv4 computes
that common start once per step in rollouts and in training (``--no-share-prompt`` turns the trainer's side off),
TRL computes every prompt for every sample.

    python benchmarks/bench_grpo.py                         # G=8, P=8, M=6, S=5
    python benchmarks/bench_grpo.py -G 16 -P 4 -S 10 --json out.json
    python benchmarks/bench_grpo.py --fewshot 10            # ~110-token prompts with a ~100-token common start
    python benchmarks/bench_grpo.py --model DIR             # an existing checkpoint dir (with tokenizer.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dsv4.core.batch import common_prefix  # noqa: E402
from dsv4.core.config import ModelConfig  # noqa: E402
from dsv4.core.interfaces import VerifySample  # noqa: E402
from dsv4.core.plugins import get_registry  # noqa: E402
from dsv4.engine.engine import Engine, EngineConfig  # noqa: E402
from dsv4.engine.tokenizer import Tokenizer  # noqa: E402
from dsv4.model import build_model, load_model, save_model  # noqa: E402
from dsv4.rl.grpo import GRPOConfig, GRPOTrainer, Rollout  # noqa: E402
from dsv4.rl.policy import clone_model  # noqa: E402
from dsv4.rl.recipe import ADDITION_MODEL  # noqa: E402
from dsv4.rl.sft import SFTConfig, SFTTrainer  # noqa: E402
from dsv4.rl.tasks import ALPHABET, AdditionTask, Problem  # noqa: E402
from dsv4.testing.tokenizers import BOS, EOS, write_char_tokenizer  # noqa: E402


# ---------------------------------------------------------------------------------------------- checkpoint
def make_checkpoint(path: Path, args: argparse.Namespace) -> None:
    """ADDITION_MODEL (no MTP) + char tokenizer, warm-started by ``args.warm_start_steps`` dsv4 SFT steps."""
    tokenizer = write_char_tokenizer(path, ALPHABET)
    max_pos = max(int(ADDITION_MODEL["max_position_embeddings"]), _max_len(args) + 8)
    cfg = ModelConfig.tiny(**{**ADDITION_MODEL, "num_nextn_predict_layers": 0, "max_position_embeddings": max_pos})
    model = build_model(cfg, seed=args.seed)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(args.seed))
    model.eval()
    if args.warm_start_steps:
        torch.manual_seed(args.seed)
        sft = SFTTrainer(model, tokenizer,
                         lambda n, salt: _with_prefix(
                             AdditionTask(args.max_digits, seed=10_000 + salt).sample(n, "train"), args),
                         SFTConfig(batch_size=64, lr=args.warm_start_lr))
        t = time.perf_counter()
        for i in range(args.warm_start_steps):
            m = sft.step(i)
        print(f"warm start: {args.warm_start_steps} dsv4 SFT steps (batch 64, lr {args.warm_start_lr}) in "
              f"{time.perf_counter() - t:.0f} s, last loss {m['loss']:.3f}")
    save_model(model, path)


def fewshot_prefix(args: argparse.Namespace) -> str:
    """``--fewshot K``: K worked examples ("12+34=46 ") put before every prompt, the same for all (as a
    few-shot or system prompt is); the group's prompt is then mostly this prefix."""
    examples = AdditionTask(args.max_digits, seed=999).sample(args.fewshot, "train")
    return "".join(f"{p.prompt}{p.answer} " for p in examples)


def _with_prefix(problems: list[Problem], args: argparse.Namespace) -> list[Problem]:
    prefix = fewshot_prefix(args)
    return [Problem(prefix + p.prompt, p.answer) for p in problems] if prefix else problems


def _max_len(args: argparse.Namespace) -> int:
    """Longest prompt + completion, in tokens (BOS, the prefix, "a+b=", the new tokens)."""
    return 1 + len(fewshot_prefix(args)) + 2 * args.max_digits + 2 + args.max_new_tokens


def hf_tokenizer(path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS)


def check_same_start(path: Path, problems: list[Problem]) -> dict[str, float]:
    """Both sides tokenize the prompts identically and compute the same logits from the checkpoint."""
    from transformers import DeepseekV4ForCausalLM

    ours_tok, hf_tok = Tokenizer.from_pretrained(path), hf_tokenizer(path)
    ids = [ours_tok.encode(p.prompt) for p in problems]
    hf_ids = hf_tok([p.prompt for p in problems])["input_ids"]
    if ids != hf_ids:
        raise RuntimeError(f"tokenizers disagree: dsv4 {ids[0]} vs transformers {hf_ids[0]}")
    ours = load_model(path)
    hf = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    diff, pad_train, pad_gen = 0.0, 0.0, 0.0
    with torch.no_grad():
        for seq in ids[:8]:
            x = torch.tensor([seq])
            ref = hf(x, use_cache=False).logits[0]
            diff = max(diff, (ours(x)[0] - ref).abs().max().item())
            # What TRL does with a short prompt in a batch: left-pad it (pad id = EOS) with an attention mask.
            # transformers' generate derives position_ids from the mask; TRL's loss forward passes none (arange).
            n = 4
            padded = torch.tensor([[ours_tok.eos_token_id] * n + seq])
            mask = torch.tensor([[0] * n + [1] * len(seq)])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            got = hf(padded, attention_mask=mask, use_cache=False).logits[0, n:]
            pad_train = max(pad_train, (got - ref).abs().max().item())
            got = hf(padded, attention_mask=mask, position_ids=pos, use_cache=False).logits[0, n:]
            pad_gen = max(pad_gen, (got - ref).abs().max().item())
    return {"logits_max_abs_diff_dsv4_vs_hf": diff, "hf_left_pad_no_position_ids_max_abs_diff": pad_train,
            "hf_left_pad_mask_position_ids_max_abs_diff": pad_gen}


def verifier() -> Any:
    return get_registry().select("verifier", "numeric", {})()


def summarize(times: list[float], cpu: list[float], rewards: list[float], tokens: list[float],
              n_completions: int) -> dict[str, Any]:
    wall = sum(times)
    total = sum(rewards)
    rest = times[1:]
    return {
        "median_step_seconds_after_first": statistics.median(rest) if rest else None,
        "cpu_seconds_per_step_after_first": statistics.mean(cpu[1:]) if rest else None,
        "step_seconds": [round(t, 3) for t in times],
        "first_step_seconds": times[0],
        "mean_step_seconds_after_first": statistics.mean(rest) if rest else None,
        "stdev_step_seconds_after_first": statistics.stdev(rest) if len(rest) > 1 else None,
        "wall_seconds": wall,
        "total_reward": total,
        "reward_mean": total / (n_completions * len(times)),
        "reward_per_second": total / wall,
        "mean_completion_tokens": sum(tokens) / (n_completions * len(times)),
    }


# ---------------------------------------------------------------------------------------------- arithmetic floor
# The engine prefills a common start of one generate() call once from this many tokens (dsv4.engine.sharing.MIN_SHARED_START).
ENGINE_SHARED_START = 16


def step_rows(rollouts: list[Rollout]) -> dict[str, Any]:
    """The rows (tokens) each forward of a dsv4 step computes, from that step's rollouts: the engine's prefill
    (each distinct prompt once, a common start of >= 16 tokens once), its decode steps (a completion of L tokens
    takes its first from the prefill and L - 1 decode rows), and the trainer's forward (the prompts' common start
    once, each distinct prompt's rest once, each completion minus its last token)."""
    prompts = list(dict.fromkeys(tuple(r.prompt_ids) for r in rollouts))
    shared = common_prefix(prompts) if len(prompts) > 1 else 0
    rest = sum(len(p) - shared for p in prompts)
    lengths = [len(r.completion_ids) for r in rollouts]
    decode = [sum(n > j for n in lengths) for j in range(1, max(lengths, default=0))]
    return {"prefill": rest + (shared if shared >= ENGINE_SHARED_START else shared * len(prompts)),
            "decode": decode,
            "train": shared + rest + sum(n - 1 for n in lengths)}


def trl_rows(prompt_lens: list[int], completion_lens: list[int]) -> dict[str, Any]:
    """The rows TRL's step computes: generate() over the left-padded prompts (every row padded to the longest),
    then decode steps of the whole batch until its longest completion ends; the loss forward over every padded
    prompt + completion."""
    b, p, c = len(prompt_lens), max(prompt_lens), max(completion_lens)
    return {"prefill": b * p, "decode": [b] * (c - 1), "train": b * (p + c)}


def _products(model: torch.nn.Module, rows: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every weight product of a forward over ``rows`` tokens: each 2-D weight but the embedding
    (a lookup) and the MTP block's, a routed expert's over its average share of the rows (rows * top-k /
    experts)."""
    cfg = model.config
    routed = max(1, round(rows * cfg.num_experts_per_tok / cfg.n_routed_experts))
    out = []
    for name, w in model.named_parameters():
        if w.dim() == 2 and not name.startswith(("embed.", "mtp.")):  # GRPO does not train the MTP block
            out.append((routed if ".ffn.experts." in name else rows, w.shape[1], w.shape[0]))
    return out


def matmul_floor(model: torch.nn.Module, passes: list[tuple[int, bool]], repeats: int = 5) -> float:
    """Seconds this machine takes for the weight products alone of ``passes`` ((rows, with backward) forwards):
    one ``[M, K] x [K, N]`` product a weight forward, two more (input and weight gradients) backward, run
    back to back on this machine's BLAS (torch.mm), best of ``repeats``. Nothing else a step needs (attention
    scores, norms, mHC Sinkhorn, elementwise work, optimizer, sampling, the verifier) is counted, so no
    implementation of the same token work can run a step faster on this machine."""
    mats: list[tuple[torch.Tensor, torch.Tensor]] = []
    for rows, backward in passes:
        for m, k, n in _products(model, rows):
            mats.append((torch.randn(m, k), torch.randn(k, n)))
            if backward:
                mats += [(torch.randn(m, n), torch.randn(n, k)), (torch.randn(k, m), torch.randn(m, n))]
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        t = time.perf_counter()
        for a, b in mats:
            torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return best


def floor_seconds(model: torch.nn.Module, rows: dict[str, Any]) -> dict[str, float]:
    """:func:`matmul_floor` of a step's rollout (prefill + decode steps) and training (forward + backward)."""
    rollout = matmul_floor(model, [(rows["prefill"], False)] + [(b, False) for b in rows["decode"]])
    train = matmul_floor(model, [(rows["train"], True)])
    return {"rollout": rollout, "train": train, "step": rollout + train}


# ---------------------------------------------------------------------------------------------- dsv4
def run_dsv4(path: Path, problems: list[Problem], args: argparse.Namespace) -> dict[str, Any]:
    P, G, M = args.prompts, args.group_size, args.max_new_tokens
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_pretrained(path)
    policy = load_model(path)
    engine_cfg = EngineConfig(max_model_len=_max_len(args), max_num_seqs=512,
                              max_num_batched_tokens=8192, return_token_logprobs=True,
                              record_routing=args.routing_replay, batch_invariant=False)
    engine = Engine(clone_model(policy), tokenizer=tokenizer, config=engine_cfg)

    def sample_problems(n: int, salt: int) -> list[Problem]:
        step = salt // 1000  # GRPOTrainer asks with salt = step * 1000 + refill; no refills here
        return problems[step * P: step * P + n]

    cfg = GRPOConfig(steps=args.steps, prompts_per_step=P, group_size=G, max_new_tokens=M, temperature=1.0,
                     lr=args.lr, kl_coef=0.0, clip_low=0.2, clip_high=0.28, loss_norm="token", grad_clip=1.0,
                     betas=(0.9, 0.99), weight_decay=0.0, dynamic_sampling=False,
                     routing_replay=args.routing_replay, share_prompt=args.share_prompt)
    steps_rollouts: list[list[Rollout]] = []

    class Trainer(GRPOTrainer):  # keeps each step's rollouts, for the arithmetic floor
        def rollouts(self, *a: Any, **k: Any) -> list[Rollout]:
            out = super().rollouts(*a, **k)
            steps_rollouts.append(out)
            return out

    trainer = Trainer(policy, engine, verifier(), sample_problems, cfg, seed=args.seed)
    setup = time.perf_counter() - t0
    times, cpu, rewards, tokens, rollout = [], [], [], [], []
    load0 = os.getloadavg()[0]
    for step in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        m = trainer.step(step)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        rewards.append(m["reward_mean"] * m["sampled"])
        tokens.append(m.get("completion_tokens", 0.0))
        rollout.append(m["rollout_seconds"])
        if m["sampled"] != P * G:
            raise RuntimeError(f"dsv4 sampled {m['sampled']} completions at step {step}, expected {P * G}")
        print(f"  dsv4 step {step}: {times[-1]:6.2f} s (rollout {m['rollout_seconds']:.2f} s)  "
              f"reward {m['reward_mean']:.3f}", flush=True)
    out = summarize(times, cpu, rewards, tokens, P * G)
    floors = [floor_seconds(policy, step_rows(r)) for r in steps_rollouts[1:] or steps_rollouts]
    out["floor_seconds"] = {k: statistics.median(f[k] for f in floors) for k in ("rollout", "train", "step")}
    out["rows"] = step_rows(steps_rollouts[-1])
    out.update(setup_seconds=setup, rollout_seconds=[round(r, 3) for r in rollout],
               rollout_seconds_after_first=statistics.mean(rollout[1:]) if len(rollout) > 1 else None,
               loadavg_1min=[load0, os.getloadavg()[0]])
    return out


# ---------------------------------------------------------------------------------------------- TRL
def run_trl(path: Path, problems: list[Problem], args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import DeepseekV4ForCausalLM, PrinterCallback, ProgressCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    hf_logging.set_verbosity_error()
    P, G, M = args.prompts, args.group_size, args.max_new_tokens
    ver = verifier()
    rewards: list[float] = []
    tokens: list[float] = []
    rollout: list[float] = []  # generate + reward seconds per step (dsv4's rollout_seconds covers the same)

    hf_tok = hf_tokenizer(path)
    steps_rows: list[dict[str, Any]] = []

    def reward(completions: list[str], answer: list[str], **kw: Any) -> list[float]:
        t = time.perf_counter()
        steps_rows.append(trl_rows([len(ids) for ids in hf_tok(kw["prompts"])["input_ids"]],
                                   [len(ids) for ids in kw["completion_ids"]]))
        samples = [VerifySample("", c, {"answer": a}) for c, a in zip(completions, answer, strict=True)]
        r = [float(x.reward) for x in asyncio.run(ver.verify(samples))]
        rollout[-1] += time.perf_counter() - t
        rewards.append(sum(r))
        tokens.append(float(sum(len(ids) for ids in kw["completion_ids"])))
        return r

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.cpu: list[float] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.load0 = os.getloadavg()[0]

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())
            print(f"  TRL  step {len(self.marks) - 2}: {self.marks[-1] - self.marks[-2]:6.2f} s  "
                  f"reward {rewards[-1] / (P * G) if rewards else float('nan'):.3f}", flush=True)

    tmp_dir = tempfile.TemporaryDirectory(prefix="bench_grpo_trl_")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})
    model = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32)
    library_defaults = {} if args.trl_library_defaults else {"bf16": False, "activation_checkpointing": False}
    targs = TRLConfig(
        output_dir=str(Path(tmp_dir.name) / "trl"),
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, generation_batch_size=P * G,
        num_generations=G, max_completion_length=M, max_steps=args.steps, num_iterations=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,
        # TRL's default takes the MoE load-balancing coefficient from the config (DeepseekV4Config has one) and
        # then fails on `config.num_experts` (DeepseekV4 names it n_routed_experts); dsv4 adds no aux loss either.
        router_aux_loss_coef=0.0,
        shuffle_dataset=False, use_vllm=False, use_cpu=True, seed=args.seed, report_to="none",
        logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        **library_defaults,
    )
    clock = Clock()
    trainer = TRLTrainer(model=model, reward_funcs=reward, args=targs, train_dataset=dataset,
                         processing_class=hf_tokenizer(path), callbacks=[clock])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    generate = trainer._generate  # tokenize prompts + transformers generate + decode

    def timed_generate(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        out = generate(*a, **k)
        rollout.append(time.perf_counter() - t)
        return out

    trainer._generate = timed_generate
    try:
        trainer.train()
    finally:
        tmp_dir.cleanup()
    setup = clock.marks[0] - t0
    times = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    if len(times) != args.steps or len(rewards) != args.steps:
        raise RuntimeError(f"TRL ran {len(times)} optimizer steps / {len(rewards)} generation batches, "
                           f"expected {args.steps}")
    cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:], strict=False)]
    out = summarize(times, cpu, rewards, tokens, P * G)
    shapes = load_model(path)
    floors = [floor_seconds(shapes, r) for r in steps_rows[1:] or steps_rows]
    out["floor_seconds"] = {k: statistics.median(f[k] for f in floors) for k in ("rollout", "train", "step")}
    out["rows"] = steps_rows[-1]
    out.update(rollout_seconds=[round(r, 3) for r in rollout],
               rollout_seconds_after_first=statistics.mean(rollout[1:]) if len(rollout) > 1 else None,
               setup_seconds=setup, loadavg_1min=[clock.load0, os.getloadavg()[0]], bf16=bool(targs.bf16),
               activation_checkpointing=bool(getattr(targs, "activation_checkpointing", False)))
    return out


# ---------------------------------------------------------------------------------------------- main
def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-G", "--group-size", type=int, default=8, help="completions per prompt (TRL num_generations)")
    ap.add_argument("-P", "--prompts", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("-M", "--max-new-tokens", type=int, default=6, help="max completion tokens")
    ap.add_argument("-S", "--steps", type=int, default=5, help="optimizer steps per side")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-digits", type=int, default=3, help="AdditionTask operand digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both sides)")
    ap.add_argument("--model", type=Path, help="use this checkpoint dir (config, safetensors, tokenizer.json)")
    ap.add_argument("--save-model", type=Path, help="keep the generated checkpoint here")
    ap.add_argument("--warm-start-steps", type=int, default=120, help="dsv4 SFT steps before saving (0: random)")
    ap.add_argument("--warm-start-lr", type=float, default=2e-3)
    ap.add_argument("--fewshot", type=int, default=0,
                    help="K worked examples before every prompt (the same prefix for all): long, group-shared prompts")
    ap.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                    help="dsv4: every completion recomputes its prompt in training (GRPOConfig.share_prompt)")
    ap.add_argument("--no-routing-replay", dest="routing_replay", action="store_false",
                    help="dsv4: do not record/replay MoE routing (on by default, dsv4's default)")
    ap.add_argument("--trl-library-defaults", action="store_true",
                    help="TRL: keep its bf16=True / gradient checkpointing defaults instead of fp32, no checkpointing")
    ap.add_argument("--trl-first", action="store_true", help="run TRL before dsv4")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    torch.set_num_threads(args.threads)

    tmp = None
    path = args.model or args.save_model
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name)
    if args.model is None:
        make_checkpoint(path, args)

    P, G, M, S = args.prompts, args.group_size, args.max_new_tokens, args.steps
    problems = _with_prefix(AdditionTask(args.max_digits, seed=args.seed).sample(P * S, "train"), args)
    res: dict[str, Any] = {
        "workload": {"G": G, "P": P, "M": M, "S": S, "lr": args.lr, "max_digits": args.max_digits,
                     "fewshot": args.fewshot, "prompt_chars_mean": sum(len(p.prompt) for p in problems) / len(problems),
                     "share_prompt": args.share_prompt,
                     "temperature": 1.0, "completions_per_step": P * G, "threads": torch.get_num_threads(),
                     "routing_replay": args.routing_replay},
        "versions": {"torch": torch.__version__},
    }
    try:
        import transformers
        import trl

        res["versions"].update(transformers=transformers.__version__, trl=trl.__version__)
    except Exception as e:  # noqa: BLE001
        res["versions"]["trl_import_error"] = repr(e)
    params = sum(t.numel() for t in load_model(path).state_dict().values())
    res["params"] = params
    res["start"] = check_same_start(path, problems)
    st = res["start"]
    print(f"checkpoint: {params / 1e6:.2f}M params; logits max |diff| dsv4 vs transformers (unpadded) "
          f"{st['logits_max_abs_diff_dsv4_vs_hf']:.1e}\n"
          f"  transformers, 4-token left-padded prompt vs unpadded: "
          f"{st['hf_left_pad_mask_position_ids_max_abs_diff']:.1e} with position_ids from the mask (as generate), "
          f"{st['hf_left_pad_no_position_ids_max_abs_diff']:.1e} "
          f"without (as TRL's loss forward)")
    print(f"workload: P={P} prompts x G={G} completions, M={M} new tokens, S={S} steps, lr {args.lr}, "
          f"prompts of {res['workload']['prompt_chars_mean']:.0f} characters on average ({args.fewshot} few-shot "
          f"examples), temperature 1.0, {torch.get_num_threads()} threads, versions {res['versions']}")

    def side_dsv4() -> None:
        print("dsv4 GRPOTrainer:", flush=True)
        res["dsv4"] = run_dsv4(path, problems, args)

    def side_trl() -> None:
        if args.skip_trl:
            return
        print("TRL GRPOTrainer:", flush=True)
        try:
            res["trl"] = run_trl(path, problems, args)
        except Exception as e:  # noqa: BLE001
            res["trl_error"] = "".join(traceback.format_exception(e))
            print(f"TRL FAILED: {type(e).__name__}: {e}\n{res['trl_error']}")

    for side in ((side_trl, side_dsv4) if args.trl_first else (side_dsv4, side_trl)):
        side()

    d, t = res["dsv4"], res.get("trl")
    rows = [
        ("first step (s, incl. warm-up)", "first_step_seconds", ".2f"),
        ("mean step after first (s)", "mean_step_seconds_after_first", ".2f"),
        ("  stdev (s)", "stdev_step_seconds_after_first", ".2f"),
        ("median step after first (s)", "median_step_seconds_after_first", ".2f"),
        ("  of which rollout (gen+reward)", "rollout_seconds_after_first", ".2f"),
        ("process CPU s/step after first", "cpu_seconds_per_step_after_first", ".2f"),
        ("wall time, all steps (s)", "wall_seconds", ".1f"),
        ("setup before step 0 (s)", "setup_seconds", ".1f"),
        ("total reward", "total_reward", ".1f"),
        ("reward mean / completion", "reward_mean", ".3f"),
        ("reward per wall-second", "reward_per_second", ".3f"),
        ("mean completion tokens", "mean_completion_tokens", ".2f"),
    ]
    print(f"\n{'':32s} {'dsv4':>10s} {'TRL':>10s} {'dsv4/TRL':>10s}")
    ratios: dict[str, float] = {}
    for label, key, spec in rows:
        a, b = d.get(key), (t or {}).get(key)
        r = a / b if isinstance(a, float | int) and isinstance(b, float | int) and b else None
        if r is not None:
            ratios[key] = r
        print(f"{label:32s} {_fmt(a, spec):>10s} {_fmt(b, spec):>10s} {_fmt(r, '.2f'):>10s}")
    if t is not None and t.get("mean_step_seconds_after_first") and d.get("mean_step_seconds_after_first"):
        speed = t["mean_step_seconds_after_first"] / d["mean_step_seconds_after_first"]
        print(f"\nsteady-state step time TRL/dsv4 = {speed:.2f} (>1: dsv4 faster); reward per wall-second "
              f"dsv4/TRL = {_fmt(ratios.get('reward_per_second'), '.2f')}")
    elif "trl_error" in res:
        print("\nTRL could not run; dsv4 figures only (error above).")
    print("\narithmetic floor (the weight products alone of the token rows each side computes, torch.mm back to "
          "back; last step's rows):")
    for name, side in (("dsv4", d), ("TRL", t)):
        if side is None:
            continue
        fl, rows, step = side["floor_seconds"], side["rows"], side.get("median_step_seconds_after_first")
        print(f"  {name:4s} prefill {rows['prefill']} rows, {len(rows['decode'])} decode steps of {sum(rows['decode'])} "
              f"rows, training {rows['train']} rows forward + backward: rollout {fl['rollout'] * 1e3:.1f} ms + training "
              f"{fl['train'] * 1e3:.1f} ms = {fl['step'] * 1e3:.1f} ms; median step {_fmt(step, '.3f')} s = "
              f"{_fmt(step / fl['step'] if step else None, '.1f')}x its floor")
    if t is not None and t.get("median_step_seconds_after_first"):
        best = t["median_step_seconds_after_first"] / d["floor_seconds"]["step"]
        res["best_reachable_ratio"] = best
        print(f"TRL's median step / dsv4's floor = {best:.1f}: at most this much faster than TRL could any "
              f"implementation of dsv4's token work be on this machine")
    for name, side in (("dsv4", d), ("TRL", t)):
        if side is not None:
            print(f"1-min load average (2 cores) {name}: {side['loadavg_1min'][0]:.1f} before, "
                  f"{side['loadavg_1min'][1]:.1f} after")
    res["ratio_dsv4_over_trl"] = ratios
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

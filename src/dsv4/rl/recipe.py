"""``dsv4 train``: a recipe = a model, a task, an SFT warm start and a GRPO phase, checkpointed and resumable.

A thin assembly: config → tokenizer, task data, model, engine, verifier (plugins) → SFT loop → GRPO loop.
The task is the built-in addition task or records from jsonl files (:mod:`dsv4.rl.dataset`).
Each phase writes metrics to jsonl, curves to PNG and atomic checkpoints; rerunning the same command
resumes from the last checkpoint and continues bit-exactly. An output directory that holds a run with
other settings is refused before anything in it is written (see :func:`_check_output`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from loguru import logger
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from dsv4.core.config import ModelConfig
from dsv4.core.plugins import get_registry
from dsv4.core.runconfig import RunConfigModel
from dsv4.engine.engine import Engine, EngineConfig
from dsv4.engine.tokenizer import Tokenizer
from dsv4.model import Transformer, build_model, load_model, save_model
from dsv4.rl.dataset import DataConfig, Dataset, EpochSampler
from dsv4.rl.grpo import GRPOConfig, GRPOTrainer, greedy_accuracy, spec_accept_length
from dsv4.rl.monitor import MetricBands, MetricsLog, plot_curves, plot_expert_load, read_metrics, replace_atomically
from dsv4.rl.policy import clone_model, sync_weights
from dsv4.rl.sft import SFTConfig, SFTTrainer
from dsv4.rl.state import (
    TRAINER_STATE_FILE,
    capture_rng,
    latest_step_dir,
    load_training_state,
    restore_rng,
    save_training_state,
)
from dsv4.rl.tasks import ALPHABET, AdditionTask, Problem

__all__ = ["TrainConfig", "run_recipe"]

# A small DeepSeek-V4 for the addition task: every layer type, hash and routed MoE, an MTP block.
# The window (16) covers a whole problem (BOS + "999+999=" + "1998" + EOS), so every layer sees every
# digit; half the head is roped, at θ = 1000, so short relative offsets (digit alignment) are sharp.
# (An earlier setting, an 8-token window and 16 rope dims at θ = 10^4 with batch-128 constant-lr SFT,
# reached only ~10 % held-out accuracy in 2500 steps; which change mattered most was not isolated.)
ADDITION_MODEL: dict[str, Any] = dict(
    vocab_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
    qk_rope_head_dim=32, rope_theta=1000.0, q_lora_rank=64, o_groups=2, o_lora_rank=64, sliding_window=16,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "sliding_attention"],
    compress_ratio_hca=8, mlp_layer_types=["hash_moe", "moe", "moe", "moe"], index_n_heads=16,
    index_head_dim=32, index_topk=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
    routed_scaling_factor=1.5, swiglu_limit=10.0, max_position_embeddings=64, num_nextn_predict_layers=1,
)

# model.* keys that set how the MoE gates train (dsv4.rl.balance) rather than ModelConfig fields:
# the bias update's speed (default 0.001 for a fresh model, 0 from init_from: RL on a released
# checkpoint usually keeps its biases) and the sequence-wise balance loss's weight (default 0). They
# reach both phases unless sft.* / grpo.* set their own.
BALANCE_KEYS: dict[str, tuple[float, float]] = {  # key -> (default fresh, default from init_from)
    "bias_update_speed": (0.001, 0.0),
    "seq_balance_loss_coef": (0.0, 0.0),
}

_RECIPE_ENGINE: dict[str, Any] = dict(max_model_len=32, max_num_seqs=512, max_num_batched_tokens=8192)


class TrainConfig(RunConfigModel):
    """A training recipe (YAML + ``key=value`` overrides)."""

    output_dir: str = "runs/addition"
    seed: int = 0
    # "addition": the built-in task (max_digits, digit_weights); "jsonl": the records of the `data` files.
    task: Literal["addition", "jsonl"] = "addition"
    max_digits: int = Field(default=3, ge=1, le=6)
    digit_weights: list[float] | None = None  # relative frequency of 1..max_digits-digit problems
    data: DataConfig | None = None  # task=jsonl: the record files and how to read them
    init_from: str | None = None  # a checkpoint directory; None: a fresh model from `model`
    # task=jsonl: a directory with tokenizer.json (+ tokenizer_config.json); default: init_from's
    tokenizer: str | None = None
    model: dict[str, Any] = Field(default_factory=lambda: dict(ADDITION_MODEL))
    init_std: float = Field(default=0.02, gt=0)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(**_RECIPE_ENGINE))
    verifier: str = "numeric"
    verifier_options: dict[str, Any] = Field(default_factory=dict)
    eval_problems: int = Field(default=300, ge=1)  # held-out problems for the accuracy metric
    grpo_eval_every: int = Field(default=25, ge=1)  # GRPO steps between held-out evaluations
    checkpoint_every: int = Field(default=100, ge=1)
    max_logprob_diff: float | None = 1e-3  # metric band on rollout_vs_train_logprob_abs_diff_max
    export_dir: str | None = None  # copy the final model (+ tokenizer) here
    progress: bool = True

    @field_validator("model", mode="before")
    @classmethod
    def _model_over_default(cls, value: Any) -> Any:
        """``model.<key>=…`` changes that key of the recipe's model; the other keys keep their defaults."""
        return {**ADDITION_MODEL, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _model_keys_exist(self) -> TrainConfig:
        # Caught here, naming `model.<key>`, rather than when the model is built inside the run.
        unknown = sorted(set(self.model) - set(ModelConfig.model_fields) - set(BALANCE_KEYS))
        if unknown:
            raise ValueError(f"unknown model key(s) {', '.join(f'model.{k}' for k in unknown)}; "
                             "model.* takes the fields of dsv4.core.config.ModelConfig and "
                             f"{', '.join(BALANCE_KEYS)}")
        for key in BALANCE_KEYS:
            value = self.model.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"model.{key} must be a number >= 0, got {value!r}")
        return self

    def balance(self, key: str) -> float:
        """``model.<key>`` of :data:`BALANCE_KEYS`, or its default for this run (fresh model or init_from)."""
        fresh, loaded = BALANCE_KEYS[key]
        return float(self.model.get(key, loaded if self.init_from else fresh))

    @model_validator(mode="after")
    def _digit_weights_fit(self) -> TrainConfig:
        if self.digit_weights is not None:
            AdditionTask(self.max_digits, digit_weights=self.digit_weights)  # raises naming digit_weights
        return self

    @model_validator(mode="after")
    def _task_has_its_inputs(self) -> TrainConfig:
        if self.task == "jsonl":
            if self.data is None:
                raise ValueError("task=jsonl trains on the records of `data`: set data.train (a .jsonl file)")
            if self.init_from is None and self.tokenizer is None:
                raise ValueError("task=jsonl with a fresh model needs tokenizer=DIR (a directory with "
                                 "tokenizer.json); or start from a checkpoint with init_from=DIR")
        else:  # options the addition task would silently ignore
            for name in ("data", "tokenizer"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is read by task=jsonl only; task=addition makes its own problems "
                                     "and uses its character tokenizer")
        return self

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_over_default(cls, value: Any) -> Any:
        """``engine.<key>=…`` changes that key; the recipe's engine sizes stay unless overridden."""
        return {**_RECIPE_ENGINE, **value} if isinstance(value, dict) else value


def run_recipe(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the recipe; returns its summary (also written to ``<output_dir>/summary.json``)."""
    out = Path(config.output_dir)
    _check_output(config, out)  # before anything in `out` is written
    out.mkdir(parents=True, exist_ok=True)
    replace_atomically(out / "config.json", config.model_dump_json(indent=2).encode())
    torch.manual_seed(config.seed)
    tok_dir = out / "tokenizer"
    tokenizer = _tokenizer(tok_dir) if config.task == "addition" else _copy_tokenizer(config, tok_dir)
    # A bad record fails here, before a model is built or a step trained.
    data = Dataset.load(config.data, tokenizer) if config.data is not None else None
    policy = _policy(config, tokenizer).to(config.engine.device)  # made on the CPU (seeded), trained beside the engine
    engine_cfg = config.engine.model_copy(update={"return_token_logprobs": True,
                                                   "record_routing": config.grpo.routing_replay,
                                                   "batch_invariant": config.grpo.true_on_policy})
    engine = Engine(clone_model(policy), tokenizer=tokenizer, config=engine_cfg)
    task = _addition_task(config) if data is None else _dataset_task(config, data, tokenizer, engine.max_model_len)
    verifier = get_registry().select("verifier", config.verifier, config.verifier_options)(**config.verifier_options)

    def evaluate() -> float:
        sync_weights(policy, engine.model)
        return greedy_accuracy(engine, verifier, task.eval_problems, task.max_new_tokens)

    summary: dict[str, Any] = {"seed": config.seed, "output_dir": str(out)}
    summary["initial_accuracy"] = evaluate()

    # ---------------------------------------------------------------- SFT warm start (to a band)
    sft = SFTTrainer(policy, tokenizer, task.sft_problems, _with_balance(config.sft, config))
    lo, hi = config.sft.target_accuracy
    sft_state = _resume(out / "sft" / "ckpt", policy, sft.optimizer)
    done = bool(sft_state.get("extra", {}).get("done"))
    acc = float(sft_state.get("extra", {}).get("accuracy", summary["initial_accuracy"]))
    with MetricsLog(out / "sft_metrics.jsonl", resume_step=sft_state.get("step", 0)) as log:
        step = int(sft_state.get("step", 0))
        bar = tqdm(total=config.sft.max_steps, initial=step, desc="sft", disable=not config.progress)
        while not done and step < config.sft.max_steps:
            metrics = sft.step(step)
            step += 1
            if step % config.sft.eval_every == 0:
                acc = metrics["accuracy"] = evaluate()
                done = acc >= lo
            MetricBands({}).check(metrics)
            log.log(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{acc:.2f}")
            if done or step % config.checkpoint_every == 0 or step == config.sft.max_steps:
                _save(out / "sft" / "ckpt", policy, sft.optimizer, step, {"done": done, "accuracy": acc}, tok_dir)
        bar.close()
    _plot(out / "sft_metrics.jsonl", out / "sft_curves.png",
          ("loss", "lm_loss", "mtp_loss", "accuracy", "moe/load_max_over_mean", "moe/dead_expert_share"))
    summary.update(sft_steps=step, sft_accuracy=acc, sft_in_band=lo <= acc <= hi,
                   sft_spec_accept_length=spec_accept_length(policy, tokenizer, task.eval_problems,
                                                             task.max_new_tokens))

    # ---------------------------------------------------------------- GRPO with the verifier
    grpo_cfg = _with_balance(config.grpo, config).model_copy(update={"max_new_tokens": task.max_new_tokens})
    grpo = GRPOTrainer(policy, engine, verifier, task.grpo_problems, grpo_cfg, seed=config.seed)
    grpo_state = _resume(out / "grpo" / "ckpt", policy, grpo.optimizer)
    if grpo_state:
        grpo.checksum = sync_weights(policy, engine.model)
        if grpo_state["step"] >= grpo_cfg.steps:
            logger.info("{} is a finished run (GRPO step {} of {}): nothing left to train; rewriting its final "
                        "model and summary", out, grpo_state["step"], grpo_cfg.steps)
    bands = MetricBands({"rollout_vs_train_logprob_abs_diff_max": (None, config.max_logprob_diff)}
                        if config.max_logprob_diff is not None else {})
    with MetricsLog(out / "grpo_metrics.jsonl", resume_step=grpo_state.get("step", 0)) as log:
        step = int(grpo_state.get("step", 0))
        bar = tqdm(total=grpo_cfg.steps, initial=step, desc="grpo", disable=not config.progress)
        while step < grpo_cfg.steps:
            metrics = grpo.step(step)
            step += 1
            if step % config.grpo_eval_every == 0 or step == grpo_cfg.steps:
                metrics["heldout_accuracy"] = evaluate()
            bands.check(metrics)
            log.log(step, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", diff=f"{metrics.get('rollout_vs_train_logprob_abs_diff_max', 0):.1e}")
            if step % config.checkpoint_every == 0 or step == grpo_cfg.steps:
                _save(out / "grpo" / "ckpt", policy, grpo.optimizer, step, {"checksum": grpo.checksum}, tok_dir)
        bar.close()
    _plot(out / "grpo_metrics.jsonl", out / "grpo_curves.png",
          ("reward_mean", "accuracy", "heldout_accuracy", "rollout_vs_train_logprob_abs_diff_max",
           "moe/load_max_over_mean"))
    summary.update(final_accuracy=evaluate(), grpo_steps=step, weights_checksum=grpo.checksum,
                   final_spec_accept_length=spec_accept_length(policy, tokenizer, task.eval_problems,
                                                               task.max_new_tokens))
    summary.update(_imbalance(out))
    final = out / "final"
    save_model(policy, final)
    for f in tok_dir.iterdir():
        shutil.copy2(f, final / f.name)
    if config.export_dir:
        _export(final, Path(config.export_dir))
    replace_atomically(out / "summary.json", json.dumps(summary, indent=2).encode())
    logger.info("recipe done: {}", summary)
    return summary


# -------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class _Task:
    """What the phases train and evaluate on."""

    sft_problems: Callable[[int, int], list[Problem]]  # (n, salt) -> a batch; pure in (n, salt)
    grpo_problems: Callable[[int, int], list[Problem]]
    eval_problems: list[Problem]  # the held-out accuracy's problems
    max_new_tokens: int  # for rollouts and evaluation


def _addition_task(config: TrainConfig) -> _Task:
    def train_problems(n: int, salt: int) -> list[Problem]:
        stream = AdditionTask(config.max_digits, seed=config.seed * 7_919 + salt, digit_weights=config.digit_weights)
        return stream.sample(n, "train")

    task = AdditionTask(config.max_digits, seed=config.seed)
    # The acceptance metric: unseen additions of two 3-digit numbers (held-out problems of the task's own
    # size when it is smaller).
    heldout = (task.unseen_3digit(config.eval_problems) if config.max_digits >= 3
               else task.sample(config.eval_problems, "heldout"))
    return _Task(train_problems, train_problems, heldout, config.max_digits + 2)


# GRPOTrainer asks for batch `step * 1000 + refill`: refill 0 is the step's prompts, refill r > 0 replaces
# the groups dynamic sampling dropped.
_GRPO_SALT_STRIDE = 1000


def _dataset_task(config: TrainConfig, data: Dataset, tokenizer: Tokenizer, max_model_len: int) -> _Task:
    """Batches from :class:`EpochSampler` streams: SFT's step ``s`` is batch ``s`` of the records with a
    response; GRPO's step ``s`` is batch ``s`` of all training records (so both phases walk whole epochs), and
    each refill level draws from a stream of its own. Evaluation: the first ``eval_problems`` eval records."""
    assert config.data is not None
    sft_steps = config.sft.max_steps > 0
    data.check_lengths(max_model_len, sft=sft_steps)
    train = [r.problem for r in data.train]
    answered = [p for p in train if p.response is not None]
    if sft_steps and not answered:
        raise ValueError(f"sft.max_steps={config.sft.max_steps}, but no training record of {config.data.train} "
                         "has a 'response' to train on: add responses, or set sft.max_steps=0")
    if sft_steps and tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer.name}: the tokenizer has no EOS token, which SFT targets end with")
    seed = config.seed
    grpo_streams: dict[int, EpochSampler] = {}

    def grpo_problems(n: int, salt: int) -> list[Problem]:
        step, refill = divmod(salt, _GRPO_SALT_STRIDE)
        if refill not in grpo_streams:
            grpo_streams[refill] = EpochSampler(train, f"{seed}:grpo" + (f":refill{refill}" if refill else ""))
        return grpo_streams[refill](n, step)

    # Without responses SFT runs no step, so its sampler is never asked.
    sft_problems = EpochSampler(answered or train, f"{seed}:sft")
    logger.info("task jsonl: {} training records ({} with a response), {} eval records (the first {} evaluated)",
                len(train), len(answered), len(data.eval), min(len(data.eval), config.eval_problems))
    return _Task(sft_problems, grpo_problems, [r.problem for r in data.eval[: config.eval_problems]],
                 config.grpo.max_new_tokens)


# -------------------------------------------------------------------------------------------- helpers
# The model is a completion model: a chat request's last user message is its prompt ("123+456=").
ADDITION_CHAT_TEMPLATE = (
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{ bos_token }}{% if users %}{{ users[-1]['content'] }}{% endif %}"
)


def _tokenizer(path: Path) -> Tokenizer:
    from dsv4.testing.tokenizers import write_char_tokenizer

    # Deterministic content: (re)writing it on resume changes nothing but brings older runs up to date.
    return write_char_tokenizer(path, ALPHABET, chat_template=ADDITION_CHAT_TEMPLATE)


# What a checkpoint's tokenizer is made of besides config.json (the model's own, which save_model writes).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                    "chat_template.jinja", "generation_config.json")


def _copy_tokenizer(config: TrainConfig, tok_dir: Path) -> Tokenizer:
    """The tokenizer of ``config.tokenizer`` (else ``config.init_from``), its files copied into ``tok_dir``,
    from where every checkpoint and ``final/`` take them."""
    option = "tokenizer" if config.tokenizer is not None else "init_from"
    source = Path(getattr(config, option))
    if not (source / "tokenizer.json").is_file():
        raise ValueError(f"{option}={source}: no tokenizer.json there; task=jsonl needs the model's tokenizer "
                         "(set tokenizer=DIR)")
    tokenizer = Tokenizer.from_pretrained(source)
    tok_dir.mkdir(parents=True, exist_ok=True)
    if source.resolve() != tok_dir.resolve():
        for name in _TOKENIZER_FILES:  # mirror the source: a file it lacks must not linger from another run
            if (source / name).is_file():
                shutil.copy2(source / name, tok_dir / name)
            else:
                (tok_dir / name).unlink(missing_ok=True)
    return tokenizer


def _policy(config: TrainConfig, tokenizer: Tokenizer) -> Transformer:
    if config.init_from:
        model = load_model(config.init_from)
    else:
        overrides = {k: v for k, v in config.model.items() if k not in BALANCE_KEYS}
        if config.task == "jsonl":  # the special ids of the tokenizer, unless model.* sets them
            overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
            overrides.setdefault("eos_token_ids", tokenizer.eos_token_ids)
        model_cfg = ModelConfig.tiny(**overrides)
        model = build_model(model_cfg, seed=config.seed)
        model.init_weights(std=config.init_std, generator=torch.Generator().manual_seed(config.seed))
        model = model.eval()
    if config.task == "jsonl" and tokenizer.vocab_size > model.config.vocab_size:
        fix = "use a checkpoint made for this tokenizer" if config.init_from else "set model.vocab_size"
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}: {fix}")
    return model


_Phase = TypeVar("_Phase", SFTConfig, GRPOConfig)


def _with_balance(phase: _Phase, config: TrainConfig) -> _Phase:
    """The phase's config with the run's MoE balance settings where the phase sets none."""
    unset = {k: config.balance(k) for k in BALANCE_KEYS if getattr(phase, k) is None}
    return phase.model_copy(update=unset)


def _resume(ckpt: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if latest_step_dir(ckpt) is None:
        return {}
    state = load_training_state(ckpt, model=model, optimizer=optimizer)
    restore_rng(state.rng)
    logger.info("resumed from {} (step {})", state.path, state.step)
    return {"step": state.step, "extra": state.extra}


def _save(ckpt: Path, model: Transformer, optimizer: torch.optim.Optimizer, step: int, extra: dict[str, Any],
          assets: Path) -> None:
    save_training_state(ckpt, model=model, optimizer=optimizer, step=step, rng=capture_rng(), extra=extra,
                        assets_dir=assets)


def _imbalance(out: Path) -> dict[str, float]:
    """``moe/load_max_over_mean`` at the first SFT step and the last SFT and GRPO steps, where logged."""
    found: dict[str, float] = {}
    for phase, which in (("sft", 0), ("sft", -1), ("grpo", -1)):
        log = out / f"{phase}_metrics.jsonl"
        records = [r for r in read_metrics(log) if "moe/load_max_over_mean" in r] if log.is_file() else []
        if records:
            name = f"moe_load_max_over_mean_{'first' if which == 0 else 'last'}_{phase}"
            found[name] = float(records[which]["moe/load_max_over_mean"])
    return found


def _plot(jsonl: Path, png: Path, keys: tuple[str, ...]) -> None:
    """The phase's curves, and its expert-load heatmap beside them (``<phase>_expert_load.png``)."""
    try:
        plot_curves(jsonl, png, keys=keys)
        plot_expert_load(jsonl, png.with_name(png.name.replace("_curves", "_expert_load")))
    except ValueError as e:  # nothing logged yet (e.g. a phase with zero steps)
        logger.info("no curves for {}: {}", jsonl.name, e)


def _check_export(target: Path, out: Path) -> None:
    """``export_dir`` is replaced wholesale: refuse one that overlaps the run or holds anything but a model."""
    t, o = target.resolve(), out.resolve()
    if t == o or t in o.parents or o in t.parents:
        raise ValueError(f"export_dir={target} overlaps the output directory {out}: exporting would delete the "
                         "run; choose a directory outside it")
    if t.exists() and not (t.is_dir() and (not any(t.iterdir()) or _is_model_dir(t))):
        raise ValueError(f"export_dir={target} exists and is not a model checkpoint (config.json + safetensors); "
                         "exporting replaces it: remove it or choose another directory")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _export(final: Path, target: Path) -> None:
    _check_export(target, final.parent)  # again: the directory may have changed during the run
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(final, tmp)
    if target.exists():  # moved aside first: the old export survives until the new one has its name
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(aside)
        tmp.rename(target)
        shutil.rmtree(aside)
    else:
        tmp.rename(target)


# -------------------------------------------------------------------------------------------- resume checks
# Settings that do not change what is trained: a resumed run may change them freely.
_FREE_ON_RESUME = {"output_dir", "progress", "export_dir", "checkpoint_every"}
# Phase lengths: a resumed run may change them within the limits _check_phase_length sets.
_LENGTHS = {"sft.max_steps", "grpo.steps"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sft": {"lr": 1}}`` as ``{"sft.lr": 1}``: differences are reported by the override's own key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _checkpoint_meta(ckpt: Path) -> dict[str, Any] | None:
    """The trainer_state.json of ``ckpt``'s latest checkpoint, None without one (or when it is unreadable:
    loading it later raises the error naming the file)."""
    latest = latest_step_dir(ckpt)
    if latest is None:
        return None
    try:
        meta = json.loads((latest / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _check_output(config: TrainConfig, out: Path) -> None:
    """Refuse, before anything is written, an output directory that is not this run's to resume.

    - ``out`` is a file, or holds a ``config.json`` that is not a train config (a model checkpoint, say);
    - ``out`` holds checkpoints of a run whose settings differ (other than :data:`_FREE_ON_RESUME`):
      resuming would silently continue it as another run;
    - a phase length changed where the continuation would not be the run with that length
      (:func:`_check_phase_length`);
    - ``export_dir`` would delete the run or a directory that is not a model.
    """
    if config.export_dir:
        _check_export(Path(config.export_dir), out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"output directory {out} exists and is not a directory")
    sft_meta, grpo_meta = _checkpoint_meta(out / "sft" / "ckpt"), _checkpoint_meta(out / "grpo" / "ckpt")
    stored_file = out / "config.json"
    stored: Any = None
    if stored_file.is_file():
        try:
            stored = json.loads(stored_file.read_text())
        except (OSError, ValueError):
            stored = None
        if not (isinstance(stored, dict) and {"seed", "sft", "grpo"} <= stored.keys()):
            raise ValueError(f"{stored_file} is not the config of a dsv4 train run (a model checkpoint?); "
                             f"choose another output directory than {out}")
    if sft_meta is None and grpo_meta is None:
        return  # nothing trained and checkpointed yet: a fresh start loses nothing
    if stored is None:
        logger.warning("{} has checkpoints but no config.json: cannot check they come from these settings",
                       out)
        return
    old, new = _flat(stored), _flat(json.loads(config.model_dump_json()))
    unset = "(unset)"  # a key only one side has, e.g. a model.* key the other run did not set
    changed = [k for k in sorted(old.keys() | new.keys())
               if old.get(k, unset) != new.get(k, unset) and k not in _FREE_ON_RESUME and k not in _LENGTHS]
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k, unset)!r} there, {new.get(k, unset)!r} now" for k in changed)
        raise ValueError(f"{out} holds a run with other settings ({diffs}); rerun with its settings to "
                         f"resume it, or choose another output directory")
    _check_phase_length("sft.max_steps", old.get("sft.max_steps"), config.sft.max_steps, config.sft.schedule,
                        sft_meta, grpo_started=grpo_meta is not None)
    _check_phase_length("grpo.steps", old.get("grpo.steps"), config.grpo.steps, config.grpo.schedule, grpo_meta,
                        grpo_started=False)


def _check_phase_length(key: str, old: Any, new: int, schedule: str, meta: dict[str, Any] | None, *,
                        grpo_started: bool) -> None:
    """A phase's length may change on resume (to extend a run) only when the result is the run with the new
    length: the checkpoint is not past it, the learning rate does not depend on it (a cosine schedule
    decays to the old length), and, for SFT, GRPO has not started from the old SFT model."""
    if old is None or old == new or meta is None:
        return
    step = int(meta.get("step", 0))
    done = bool(meta.get("extra", {}).get("done"))  # SFT stopped at its accuracy band: its length is moot
    problem = None
    if step > new:
        problem = f"the checkpoint is already at step {step}"
    elif not done and grpo_started:
        problem = "GRPO has already started from the SFT model of the old length"
    elif not done and schedule == "cosine" and step > 0:
        problem = f"the cosine learning-rate schedule of steps 1-{step} decayed towards {old} steps"
    if problem:
        raise ValueError(f"{key} changed from {old} to {new}, but {problem}: that is another run; keep "
                         f"{key}={old} to resume, or choose another output directory")


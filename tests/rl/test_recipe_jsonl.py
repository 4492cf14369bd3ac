"""dsv4 train on a jsonl dataset at CI size: config checks, errors before training, an end-to-end run whose
verifier sees the records' references, exact resume, init_from's tokenizer, and every verifier fed from lines."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dsv4.core.config import ConfigError, ModelConfig
from dsv4.core.interfaces import VerifyResult, VerifySample
from dsv4.core.plugins import get_registry
from dsv4.core.runconfig import load_run_config
from dsv4.engine.engine import Engine, EngineConfig
from dsv4.engine.tokenizer import Tokenizer
from dsv4.model import build_model, save_model
from dsv4.rl.dataset import read_records
from dsv4.rl.grpo import GRPOConfig, GRPOTrainer, Rollout
from dsv4.rl.monitor import read_metrics
from dsv4.rl.recipe import ADDITION_CHAT_TEMPLATE, TrainConfig, run_recipe
from dsv4.rl.tasks import ALPHABET
from dsv4.rl.verifiers.answer import ExactVerifier
from dsv4.rl.verifiers.sandbox import run_sandboxed
from dsv4.testing.tokenizers import write_char_tokenizer

SMALL_MODEL = dict(vocab_size=16, hidden_size=64, num_hidden_layers=3, head_dim=32, qk_rope_head_dim=16,
                   q_lora_rank=32, o_lora_rank=16, index_head_dim=32, moe_intermediate_size=64,
                   layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                   mlp_layer_types=["hash_moe", "moe", "moe"], max_position_embeddings=64, num_nextn_predict_layers=1)


def jsonl(path: Path, lines: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tokenizer_dir(path: Path) -> Path:
    # a character tokenizer whose chat template prompts with the last user message
    write_char_tokenizer(path, ALPHABET, chat_template=ADDITION_CHAT_TEMPLATE)
    return path


def train_lines(n: int) -> list[dict[str, Any]]:
    # every other record is a chat; every record carries a field only the verifier reads
    lines: list[dict[str, Any]] = []
    for i in range(n):
        a, b = i % 10, (3 * i) % 10 + 10 * (i // 10)
        record: dict[str, Any] = ({"prompt": f"{a}+{b}="} if i % 2 else
                                  {"messages": [{"role": "user", "content": f"{a}+{b}="}]})
        lines.append({**record, "response": str(a + b), "answer": str(a + b), "id": f"r{i}"})
    return lines


def config(out: Path, data: dict[str, Any], **over: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        output_dir=str(out), task="jsonl", data=data, tokenizer=str(tokenizer_dir(out.parent / f"{out.name}-tok")),
        verifier="exact", eval_problems=4, checkpoint_every=2, progress=False, model=SMALL_MODEL,
        sft=dict(max_steps=4, batch_size=8, eval_every=2, target_accuracy=(0.99, 1.0)),
        grpo=dict(steps=2, prompts_per_step=4, group_size=2, max_new_tokens=4, lr=1e-3, dynamic_sampling=False,
                  true_on_policy=True),
        engine=dict(max_model_len=16, max_num_seqs=64, max_num_batched_tokens=1024, expert_executor="reference"),
    )
    for key, value in over.items():
        section, _, name = key.partition("__")
        base[section] = {**base[section], name: value} if name else value
    return TrainConfig.model_validate(base)


class Recorder:
    """Wraps a verifier class's ``verify`` to keep every sample (and result) it was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: Any) -> None:
        self.samples: list[VerifySample] = []
        self.results: list[VerifyResult] = []
        original = cls.verify

        async def verify(verifier: Any, samples: Sequence[VerifySample]) -> list[VerifyResult]:
            results: list[VerifyResult] = await original(verifier, samples)
            self.samples += samples
            self.results += results
            return results

        monkeypatch.setattr(cls, "verify", verify)


# ------------------------------------------------------------------------------------------------ config
def test_task_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="task\n.*'addition' or 'jsonl'"):
        TrainConfig.model_validate({"task": "poems"})
    with pytest.raises(ValidationError, match="set data.train"):
        TrainConfig.model_validate({"task": "jsonl"})
    with pytest.raises(ValidationError, match="needs tokenizer=DIR"):
        TrainConfig.model_validate({"task": "jsonl", "data": {"train": "d.jsonl"}})
    with pytest.raises(ValidationError, match="data is read by task=jsonl only"):
        TrainConfig.model_validate({"data": {"train": "d.jsonl"}})
    with pytest.raises(ValidationError, match="tokenizer is read by task=jsonl only"):
        TrainConfig.model_validate({"tokenizer": "tok"})
    with pytest.raises(ConfigError, match="data.trian: unknown key; did you mean 'data.train'"):
        load_run_config(TrainConfig, None, ["task=jsonl", "data.trian=d.jsonl", "tokenizer=tok"])
    with pytest.raises(ConfigError, match="data.train: Field required"):
        load_run_config(TrainConfig, None, ["task=jsonl", "data.eval_fraction=0.2", "tokenizer=tok"])
    cfg = load_run_config(TrainConfig, None, ["task=jsonl", "data.train=d.jsonl", "init_from=ckpt"])
    assert cfg.data is not None and cfg.data.eval is None and cfg.data.eval_fraction == 0.1


def test_errors_come_before_training(tmp_path: Path) -> None:
    good = jsonl(tmp_path / "good.jsonl", train_lines(8))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"prompt": "1+1=", "messages": []}\n')
    with pytest.raises(ValueError, match=rf"^{bad}:9: both 'prompt' and 'messages'"):
        run_recipe(config(tmp_path / "a", {"train": str(bad)}))
    assert not (tmp_path / "a" / "sft_metrics.jsonl").exists()
    long = jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=" * 4, "answer": "2"}])
    with pytest.raises(ValueError, match=rf"^{long}:1: the prompt is 17 tokens; engine.max_model_len=16"):
        run_recipe(config(tmp_path / "b", {"train": str(good), "eval": str(long)}))
    unanswered = jsonl(tmp_path / "plain.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)])
    with pytest.raises(ValueError, match="sft.max_steps=4, but no training record .* has a 'response'"):
        run_recipe(config(tmp_path / "c", {"train": str(unanswered), "eval": str(good)}))
    with pytest.raises(ValueError, match="tokenizer has 15 ids but the model's vocab_size is 8: set model.vocab_size"):
        run_recipe(config(tmp_path / "d", {"train": str(good)}, model={**SMALL_MODEL, "vocab_size": 8}))
    empty = tmp_path / "ckpt"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"init_from={empty}: no tokenizer.json there"):
        run_recipe(config(tmp_path / "e", {"train": str(good)}, tokenizer=None, init_from=str(empty)))


# ------------------------------------------------------------------------------------------------ runs
def test_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = train_lines(12)
    train, held = jsonl(tmp_path / "train.jsonl", lines[:8]), jsonl(tmp_path / "eval.jsonl", lines[8:])
    seen = Recorder(monkeypatch, ExactVerifier)
    cfg = config(tmp_path / "run", {"train": str(train), "eval": str(held)})
    summary = run_recipe(cfg)

    out = tmp_path / "run"
    assert [r["step"] for r in read_metrics(out / "sft_metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(out / "grpo_metrics.jsonl")] == [1, 2]
    assert summary["sft_steps"] == 4 and summary["grpo_steps"] == 2
    final, source = out / "final", tmp_path / "run-tok"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer that was used, as it was
        assert (final / name).read_bytes() == (source / name).read_bytes()

    # the verifier got each record's own fields, the SFT response and prompt keys excluded
    references = {json.dumps(dict(s.reference), sort_keys=True) for s in seen.samples}
    assert references == {json.dumps({"answer": r["answer"], "id": r["id"]}, sort_keys=True) for r in lines}
    # GRPO's two steps of four prompts are one epoch of the eight training records: each prompted once (a group)
    train_prompts = {r.problem.prompt: r.problem.reference["id"]
                     for r in read_records(train, Tokenizer.from_pretrained(source))}
    rolled = Counter(train_prompts[s.prompt] for s in seen.samples if s.prompt in train_prompts)
    assert rolled == {f"r{i}": 2 for i in range(8)}
    # evaluation: greedy, on the eval file's records (initial, 2 SFT evals, 1 GRPO eval, final)
    evaluated = Counter(s.reference["id"] for s in seen.samples if s.prompt not in train_prompts)
    assert evaluated == {f"r{i}": 5 for i in range(8, 12)}


def test_resume_continues_exactly(tmp_path: Path) -> None:
    # Rewards with variance, so GRPO's steps really train: the regex verifier, with each line's own pattern
    # (a completion that starts with a digit below 5).
    lines = [{**line, "pattern": "[0-4]"} for line in train_lines(24)]
    data = {"train": str(jsonl(tmp_path / "d.jsonl", lines)), "eval_fraction": 0.25}
    # (no evaluation during SFT: greedy completions pass at once, which would end SFT at the band)
    regex: dict[str, Any] = dict(verifier="regex", verifier_options={"mode": "match"}, sft__eval_every=100)
    straight = run_recipe(config(tmp_path / "a", data, grpo__steps=4, **regex))
    run_recipe(config(tmp_path / "b", data, sft__max_steps=2, grpo__steps=0, **regex))  # stopped in SFT
    run_recipe(config(tmp_path / "b", data, grpo__steps=2, **regex))  # resumed SFT; stopped after GRPO step 2
    resumed = run_recipe(config(tmp_path / "b", data, grpo__steps=4, **regex))  # the same command again
    for phase, keys in (("sft", ("loss", "lr")), ("grpo", ("loss", "reward_mean", "grad_norm"))):
        a, b = (read_metrics(tmp_path / run / f"{phase}_metrics.jsonl") for run in "ab")
        assert [r["step"] for r in b] == [1, 2, 3, 4]  # no duplicated or missing steps
        assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]
    assert any(r["grad_norm"] > 0 for r in read_metrics(tmp_path / "a" / "grpo_metrics.jsonl"))
    assert resumed["weights_checksum"] == straight["weights_checksum"]


def test_init_from_uses_the_checkpoints_tokenizer(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model = build_model(ModelConfig.tiny(**SMALL_MODEL), seed=3)
    model.init_weights(std=0.02)
    save_model(model, ckpt)
    tokenizer_dir(ckpt)
    data = {"train": str(jsonl(tmp_path / "d.jsonl", train_lines(16)))}
    summary = run_recipe(config(tmp_path / "run", data, tokenizer=None, init_from=str(ckpt), sft__max_steps=2,
                                grpo__steps=1))
    assert summary["grpo_steps"] == 1
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "run" / "final" / name).read_bytes() == (ckpt / name).read_bytes()


def test_code_verifier_gets_the_tests_of_a_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if (report := asyncio.run(run_sandboxed("print(1)", [{"stdin": "", "stdout": "1"}]))).error is not None:
        pytest.skip(f"the sandbox cannot run here: {report.error}")
    from dsv4.rl.verifiers.code import CodeVerifier

    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"}]
    data = {"train": str(jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "tests": tests}])),
            "eval": str(jsonl(tmp_path / "e.jsonl", [{"prompt": "3+4=", "assert_tests": ["assert 3 + 4 == 7"]}]))}
    seen = Recorder(monkeypatch, CodeVerifier)
    run_recipe(config(tmp_path / "run", data, verifier="code", verifier_options={"timeout": 10.0, "max_workers": 2},
                      sft__max_steps=0, grpo__steps=1, grpo__prompts_per_step=1, eval_problems=1))
    rollouts = [(s, r) for s, r in zip(seen.samples, seen.results) if s.prompt == "1+2="]
    assert len(rollouts) == 2  # one group of two samples
    for sample, result in rollouts:
        assert sample.reference == {"tests": tests}
        assert result.details["total"] == 2, result  # both of the line's tests ran
    assert all(s.reference == {"assert_tests": ["assert 3 + 4 == 7"]} for s in seen.samples if s.prompt == "3+4=")


# ------------------------------------------------------------------------------------------------ scoring
RIGHT_AND_WRONG = {
    "exact": ({"prompt": "Capital of France?", "answer": "Paris"}, "The answer is: Paris", "The answer is: Rome"),
    "numeric": ({"prompt": "2+2=", "answer": 4}, "#### 4", "#### 5"),
    "math": ({"prompt": "Half?", "answer": "\\frac{1}{2}"}, "so \\boxed{0.5}", "so \\boxed{2}"),
    "regex": ({"prompt": "Greet.", "pattern": "hello.*"}, "hello there", "bye"),
    "code": ({"prompt": "Add.", "tests": [{"input": "1 2\n", "output": "3\n"}]},
             "```python\na, b = map(int, input().split())\nprint(a + b)\n```", "```python\nprint(0)\n```"),
}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> GRPOTrainer:
    tokenizer = write_char_tokenizer(tmp_path_factory.mktemp("tok"), ALPHABET)
    model = build_model(ModelConfig.tiny(**SMALL_MODEL), seed=0)
    engine = Engine(model, tokenizer=tokenizer, config=EngineConfig(max_model_len=16, expert_executor="reference"))
    return GRPOTrainer(model, engine, ExactVerifier(), lambda n, salt: [], GRPOConfig(true_on_policy=False), seed=0)


@pytest.mark.parametrize("name", list(RIGHT_AND_WRONG))
def test_each_verifier_scores_with_a_lines_reference(tmp_path: Path, trainer: GRPOTrainer, name: str) -> None:
    line, right, wrong = RIGHT_AND_WRONG[name]
    if name == "code" and asyncio.run(run_sandboxed("print(1)", [{"stdin": "", "stdout": "1"}])).error is not None:
        pytest.skip("the sandbox cannot run here")
    problem = read_records(jsonl(tmp_path / "d.jsonl", [line]), trainer.tokenizer)[0].problem  # type: ignore[arg-type]
    trainer.verifier = get_registry().select("verifier", name, {})()
    rollouts = [Rollout(problem, [], [], text, [], None, "stop") for text in (right, wrong)]
    trainer.score(rollouts)  # what a GRPO step does with its rollouts
    assert [(r.reward, r.correct, r.error) for r in rollouts] == [(1.0, True, None), (0.0, False, None)]


# ------------------------------------------------------------------------------------------------ the example
def test_the_example_recipe_runs_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import dsv4
    from dsv4.cli import main

    recipe = Path(dsv4.__file__).parent / "recipes" / "jsonl_example.yaml"
    with pytest.raises(ConfigError, match="needs tokenizer=DIR"):
        load_run_config(TrainConfig, recipe, ["data.train=t.jsonl"])  # the user sets the data and a model
    train = jsonl(tmp_path / "train.jsonl", train_lines(12))
    small = ["model.vocab_size=16", "model.hidden_size=64", "model.num_hidden_layers=2",
             "model.layer_types=[sliding_attention,compressed_sparse_attention]", "model.mlp_layer_types=[moe,moe]",
             "engine.max_model_len=16", "engine.max_num_seqs=16", "sft.max_steps=2", "sft.batch_size=4",
             "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=3",
             "eval_problems=2", "progress=false"]
    args = ["train", "--recipe", "jsonl_example", "--output", str(tmp_path / "run"),
            f"tokenizer={tokenizer_dir(tmp_path / 'tok')}", *small]
    assert main([*args, f"data.train={train}"]) == 0
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text() + '{"prompt": ["1+1="]}\n')
    bad_args = [str(tmp_path / "bad_run") if a == str(tmp_path / "run") else a for a in args]  # a new run
    assert main([*bad_args, f"data.train={bad}"]) == 2
    assert f"error: {bad}:13: 'prompt' must be a string, got a list" in capsys.readouterr().err

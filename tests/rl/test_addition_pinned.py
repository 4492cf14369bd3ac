"""The addition recipe's data, pinned: the bundled default model is reproduced byte for byte from it.

The values were computed with the code as it was before dataset-driven tasks existed; any change here means
`dsv4 train --recipe addition` no longer reproduces `src/dsv4/assets/default`.
"""

from __future__ import annotations

from pathlib import Path

from dsv4.rl.recipe import ADDITION_CHAT_TEMPLATE
from dsv4.rl.tasks import ALPHABET, AdditionTask, encode_sft
from dsv4.testing.tokenizers import write_char_tokenizer

SEED, MAX_DIGITS, DIGIT_WEIGHTS = 0, 3, [1, 1, 4]  # the recipe's (src/dsv4/recipes/addition.yaml)


def _recipe_stream(n: int, salt: int) -> list[str]:
    # the recipe's training stream: batch `salt` of SFT (and GRPO's `step * 1000 + refill`)
    task = AdditionTask(MAX_DIGITS, seed=SEED * 7_919 + salt, digit_weights=DIGIT_WEIGHTS)
    return [p.prompt for p in task.sample(n, "train")]


def test_training_stream() -> None:
    assert _recipe_stream(6, 0) == ["362+833=", "814+127=", "347+835=", "575+367=", "23+54=", "62+27="]
    assert _recipe_stream(4, 3) == ["917+132=", "33+63=", "5+8=", "374+312="]


def test_heldout_sets() -> None:
    assert [p.prompt for p in AdditionTask(MAX_DIGITS, seed=SEED).unseen_3digit(4)] == [
        "746+294=", "376+866=", "738+252=", "310+690="]
    assert [p.prompt for p in AdditionTask(1, seed=SEED).sample(4, "heldout")] == ["9+3=", "5+5=", "4+1=", "7+6="]


def test_sft_ids(tmp_path: Path) -> None:
    tokenizer = write_char_tokenizer(tmp_path, ALPHABET, chat_template=ADDITION_CHAT_TEMPLATE)
    problems = AdditionTask(MAX_DIGITS, seed=SEED, digit_weights=DIGIT_WEIGHTS).sample(3, "train")
    assert [encode_sft(p, tokenizer) for p in problems] == [
        ([0, 5, 8, 4, 12, 10, 5, 5, 13, 3, 3, 11, 7, 1], 9),
        ([0, 10, 3, 6, 12, 3, 4, 9, 13, 11, 6, 3, 1], 9),
        ([0, 5, 6, 9, 12, 10, 5, 7, 13, 3, 3, 10, 4, 1], 9),
    ]
    # what GRPO's rollouts and the evaluation prompt the engine with
    assert [tokenizer.encode(p.prompt) for p in problems] == [
        [0, 5, 8, 4, 12, 10, 5, 5, 13], [0, 10, 3, 6, 12, 3, 4, 9, 13], [0, 5, 6, 9, 12, 10, 5, 7, 13]]


def test_the_recipe_uses_these_streams() -> None:
    import dsv4
    from dsv4.core.runconfig import load_run_config
    from dsv4.rl.recipe import TrainConfig, _addition_task

    config = load_run_config(TrainConfig, Path(dsv4.__file__).parent / "recipes" / "addition.yaml", [])
    assert (config.task, config.seed, config.max_digits, config.digit_weights) == ("addition", SEED, MAX_DIGITS,
                                                                                  DIGIT_WEIGHTS)
    task = _addition_task(config)
    assert task.sft_problems is task.grpo_problems  # one training stream for both phases
    assert [p.prompt for p in task.sft_problems(6, 0)] == _recipe_stream(6, 0)
    assert [p.prompt for p in task.grpo_problems(4, 3)] == _recipe_stream(4, 3)
    assert [p.prompt for p in task.eval_problems[:4]] == ["746+294=", "376+866=", "738+252=", "310+690="]
    assert len(task.eval_problems) == 500 and task.max_new_tokens == MAX_DIGITS + 2
    assert all(p.reference == {"answer": p.answer} for p in task.eval_problems)  # what the verifier gets

"""The addition task: problems, determinism, the digit mix, a held-out split disjoint by construction, SFT ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dsv4.rl.tasks import ALPHABET, AdditionTask, Problem, encode_sft, split_of
from dsv4.testing.tokenizers import write_char_tokenizer


def test_problem() -> None:
    p = Problem.of(123, 456)
    assert p == Problem(prompt="123+456=", answer="579")
    assert p.operands == (123, 456)
    assert Problem.of(0, 0).answer == "0" and Problem.of(999, 1).answer == "1000"
    assert AdditionTask.target(p) == "579"
    with pytest.raises(ValueError, match="non-negative"):
        Problem.of(-1, 2)


def test_samples_are_correct_and_in_range() -> None:
    task = AdditionTask(max_digits=3, seed=0)
    for split in ("train", "heldout"):
        for p in task.sample(500, split):  # type: ignore[arg-type]
            a, b = p.operands
            assert 0 <= a < 1000 and 0 <= b < 1000
            assert p.answer == str(a + b) and p.prompt == f"{a}+{b}="
            assert set(p.prompt + p.answer) <= set(ALPHABET)


def test_digit_mix() -> None:
    # d is drawn from 1..3 for each problem; the larger operand's length is d except when both happen to be
    # short (probability 1/100 for d = 3, 1/10 for d = 2), so each length shows up roughly a third of the time.
    task = AdditionTask(max_digits=3, seed=1)
    longest = Counter(max(len(str(a)), len(str(b))) for a, b in (p.operands for p in task.sample(3000)))
    assert set(longest) == {1, 2, 3}
    for d in (1, 2, 3):
        assert 0.2 < longest[d] / 3000 < 0.45
    assert all(max(p.operands) < 100 for p in AdditionTask(max_digits=2, seed=1).sample(300))


def test_digit_weights() -> None:
    task = AdditionTask(max_digits=3, seed=1, digit_weights=[0, 1, 3])
    longest = Counter(max(len(str(a)), len(str(b))) for a, b in (p.operands for p in task.sample(4000)))
    assert 0.65 < longest[3] / 4000 < 0.85  # 3/4 of the draws, plus the rare short 3-digit pair lost
    assert longest[1] < 0.05 * 4000  # only 2-digit draws with two 1-digit operands (1/100 of them)
    with pytest.raises(ValueError, match="digit_weights"):
        AdditionTask(max_digits=3, digit_weights=[1, 1])
    with pytest.raises(ValueError, match="digit_weights"):
        AdditionTask(max_digits=2, digit_weights=[0, 0])


def test_deterministic_given_the_seed() -> None:
    a, b = AdditionTask(seed=7), AdditionTask(seed=7)
    assert a.sample(50) == b.sample(50)
    assert a.sample(20, "heldout") == b.sample(20, "heldout")
    assert AdditionTask(seed=8).sample(50) != AdditionTask(seed=7).sample(50)
    # the split streams are independent: drawing held-out problems does not shift the training stream
    c, d = AdditionTask(seed=7), AdditionTask(seed=7)
    c.sample(13, "heldout")
    assert c.sample(30) == d.sample(30)
    # successive calls continue the stream
    e = AdditionTask(seed=7)
    assert e.sample(20) + e.sample(30) == AdditionTask(seed=7).sample(50)


def test_split_is_a_fixed_property_of_the_pair() -> None:
    # pinned: changing the hash would silently change every evaluation set
    heldout_1digit = sorted((a, b) for a in range(10) for b in range(10) if split_of(a, b) == "heldout")
    assert heldout_1digit == [(1, 4), (3, 3), (3, 9), (4, 1), (5, 5), (6, 7), (7, 6), (9, 3)]
    two = [(a, b) for a in range(100) for b in range(100)]
    held = {ab for ab in two if split_of(*ab) == "heldout"}
    assert len(held) == 992  # ≈ 10 %
    assert all(split_of(b, a) == split_of(a, b) for a, b in two)  # a commuted twin is never in the other split


def test_train_and_heldout_are_disjoint() -> None:
    task = AdditionTask(max_digits=2, seed=3)
    train = {p.operands for p in task.sample(3000, "train")}
    held = {p.operands for p in task.sample(300, "heldout")}
    assert train and held and not train & held
    assert all(split_of(*ab) == "train" for ab in train)
    assert all(split_of(*ab) == "heldout" for ab in held)
    # nor through commutation
    assert not {(b, a) for a, b in held} & train


def test_unseen_3digit() -> None:
    task = AdditionTask(max_digits=3, seed=0)
    probe = task.unseen_3digit(200)
    assert len(set(probe)) == 200
    assert all(100 <= a <= 999 and 100 <= b <= 999 and split_of(a, b) == "heldout"
               for a, b in (p.operands for p in probe))
    # the same set on every call, whatever was sampled before and whatever max_digits says
    task.sample(100)
    task.sample(10, "heldout")
    assert task.unseen_3digit(200) == probe
    assert AdditionTask(max_digits=5, seed=0).unseen_3digit(200) == probe
    assert task.unseen_3digit(50) == probe[:50]
    train = {p.operands for p in task.sample(5000)}
    assert not train & {p.operands for p in probe}


def test_errors() -> None:
    with pytest.raises(ValueError, match="max_digits"):
        AdditionTask(max_digits=0)
    with pytest.raises(ValueError, match="split"):
        AdditionTask().sample(1, "test")  # type: ignore[arg-type]


def test_encode_sft_with_the_char_tokenizer(tmp_path: Path) -> None:
    tok = write_char_tokenizer(tmp_path, alphabet=ALPHABET)
    ids, n_prompt = encode_sft(Problem.of(12, 3), tok)
    # BOS 0, EOS 1, "0" is 2 … "9" is 11, "+" 12, "=" 13
    assert ids == [0, 3, 4, 12, 5, 13, 3, 7, 1]
    assert n_prompt == 6
    assert tok.decode(ids[n_prompt:]) == "15"


def test_problem_carries_its_reference_and_response() -> None:
    p = Problem("Q: 2+2?", reference={"answer": 4, "unit": "apples"}, response="4 apples")
    assert p.answer == "4" and p.reference == {"answer": 4, "unit": "apples"} and p.response == "4 apples"
    assert Problem.of(1, 2).reference == {"answer": "3"} and Problem.of(1, 2).response is None
    # equal problems hash equally; the reference takes part in equality
    assert len({p, Problem("Q: 2+2?", reference={"answer": 4, "unit": "apples"}, response="4 apples")}) == 1
    assert p != Problem("Q: 2+2?", reference={"answer": 5, "unit": "apples"}, response="4 apples")
    assert Problem("1+2=", "3") == Problem("1+2=", reference={"answer": "3"})
    with pytest.raises(ValueError, match="no reference answer"):
        _ = Problem("code", reference={"tests": []}).answer
    with pytest.raises(ValueError, match="disagrees"):
        Problem("1+2=", "3", reference={"answer": "4"})


def test_encode_sft_trains_on_the_response(tmp_path: Path) -> None:
    tok = write_char_tokenizer(tmp_path, alphabet=ALPHABET)
    ids, n_prompt = encode_sft(Problem("12+3=", "15", response="15 "), tok)
    assert ids == [0, 3, 4, 12, 5, 13, 3, 7, 14, 1] and n_prompt == 6  # the response, its space (14), EOS
    with pytest.raises(ValueError, match="no reference answer"):
        encode_sft(Problem("12+3=", reference={"pattern": "1."}), tok)  # no response and no answer

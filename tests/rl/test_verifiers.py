"""The answer, math and format verifiers: tables of equivalent / different answers, extraction,
anti-gaming, recorded failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from dsv4.core.interfaces import VerifyResult, VerifySample
from dsv4.core.plugins import get_registry
from dsv4.rl.verifiers import ExactVerifier, FormatVerifier, MathVerifier, NumericVerifier, RegexVerifier
from dsv4.rl.verifiers.answer import boxed_contents, extract_spans, normalize_text, numbers_in


def run(verifier: Any, samples: Sequence[VerifySample]) -> list[VerifyResult]:
    return asyncio.run(verifier.verify(samples))


def one(verifier: Any, completion: str, reference: dict[str, Any] | None = None) -> VerifyResult:
    (result,) = run(verifier, [VerifySample("q", completion, reference or {})])
    return result


def test_builtins_are_registered() -> None:
    assert get_registry().names("verifier")[:6] == ["exact", "numeric", "math", "regex", "format", "code"]


# --------------------------------------------------------------------------------------------------
# numeric / exact
# --------------------------------------------------------------------------------------------------
NUMERIC_CASES = [  # (completion, reference answer, expected reward)
    ("#### 42", "42", 1.0),
    ("#### 42.0", "42", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("The answer is 1,234,567.", 1234567, 1.0),
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{3/4}", 0.75, 1.0),
    ("Answer: 1.5e3", "1500", 1.0),
    (r"Answer: $1.5 \times 10^{3}$", "1500", 1.0),
    ("Answer: 2.5E-3", "0.0025", 1.0),
    ("so the total is $18.", "18", 1.0),
    (r"\boxed{\$18}", "18.00", 1.0),
    ("final answer: −7", "-7", 1.0),
    ("Answer: 0.3333333", "1/3", 1.0),  # within abs_tol 1e-6
    ("the answer is 50%", "50", 1.0),  # percent="strip"
    ("#### 43", "42", 0.0),
    ("Answer: 0.333", "1/3", 0.0),
    ("#### 1000001", "1000000", 0.0),
    (r"\boxed{0.76}", "3/4", 0.0),
    ("#### -42", "42", 0.0),
    ("#### 4200", "42", 0.0),
    ("no number at all", "42", 0.0),
    ("", "42", 0.0),
]


@pytest.fixture(scope="module")
def numeric() -> NumericVerifier:
    return NumericVerifier()


@pytest.mark.parametrize(("completion", "answer", "reward"), NUMERIC_CASES)
def test_numeric_table(numeric: NumericVerifier, completion: str, answer: Any, reward: float) -> None:
    result = one(numeric, completion, {"answer": answer})
    assert result.reward == reward, result
    assert result.correct is (reward == 1.0)
    assert result.error is None


def test_numeric_batch_keeps_order(numeric: NumericVerifier) -> None:
    samples = [VerifySample("q", c, {"answer": a}) for c, a, _ in NUMERIC_CASES]
    assert [r.reward for r in run(numeric, samples)] == [r for _, _, r in NUMERIC_CASES]


EXACT_CASES = [
    (r"\boxed{Paris}", "paris", 1.0),
    ("Answer: Paris.", "Paris", 1.0),
    ("  paris  ", "Paris", 1.0),  # "full" fallback: the whole answer
    (r"\boxed{\text{Paris}}", "Paris", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### 5.0", "5", 1.0),
    ("**Answer:** B", "b", 1.0),
    ("Answer: new   york", "New York", 1.0),
    (r"\boxed{Rome}", "Paris", 0.0),
    ("I think it is Paris", "Paris", 0.0),  # not an answer span
    (r"\boxed{5.01}", "5", 0.0),
    ("", "Paris", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "reward"), EXACT_CASES)
def test_exact_table(completion: str, answer: str, reward: float) -> None:
    result = one(ExactVerifier(), completion, {"answer": answer})
    assert (result.reward, result.error) == (reward, None), result


def test_exact_case_sensitive_and_list_of_answers() -> None:
    assert one(ExactVerifier(case_sensitive=True), r"\boxed{paris}", {"answer": "Paris"}).reward == 0.0
    assert one(ExactVerifier(), r"\boxed{NYC}", {"answer": ["New York", "NYC"]}).reward == 1.0


@pytest.mark.parametrize(
    ("extract", "completion", "reward"),
    [
        ("boxed", r"2+2 is \boxed{4}, not 5", 1.0),
        ("boxed", "the answer is 4", 0.0),  # no box, no answer
        ("gsm8k", "2 + 2 = 4\n#### 4", 1.0),
        ("gsm8k", r"\boxed{4}", 0.0),
        ("answer", "We add.\nFinal answer = 4", 1.0),
        ("last_number", "2 + 2 gives 4", 1.0),
        ("last_number", "4 is wrong, it is 5", 0.0),
        ("auto", r"Answer: 5 but \boxed{4}", 1.0),  # boxed first
        ("auto", "<think>\\boxed{5}</think> #### 4", 1.0),  # the boxed draft inside <think> is ignored
        ("auto", "<think>\\boxed{4}</think>\nAnswer: 5", 0.0),  # only what follows the reasoning counts
        ("gsm8k", "the total #### 4", 0.0),  # "####" starts a line
    ],
)
def test_numeric_extractors(extract: str, completion: str, reward: float) -> None:
    assert one(NumericVerifier(extract=extract), completion, {"answer": 4}).reward == reward


def test_regex_extractor_and_its_timeout() -> None:
    v = NumericVerifier(extract="regex", pattern=r"RESULT=(\S+)")
    assert one(v, "RESULT=12", {"answer": 12}).reward == 1.0
    assert one(v, "RESULT 12", {"answer": 12}).reward == 0.0
    # A catastrophically backtracking pattern is killed: a recorded failure, in bounded time.
    slow = NumericVerifier(extract="regex", pattern=r"^(?:a+)+(b)$", regex_timeout=0.5)
    start = time.monotonic()
    result = one(slow, "a" * 40 + "!", {"answer": 1})
    assert time.monotonic() - start < 10
    assert result.reward == 0.0 and result.error is not None and "timed out" in result.error


def test_tolerances_and_percentages() -> None:
    assert one(NumericVerifier(abs_tol=0.01), "#### 3.14", {"answer": "3.14159"}).reward == 1.0
    assert one(NumericVerifier(), "#### 3.14", {"answer": "3.14159"}).reward == 0.0
    assert one(NumericVerifier(rel_tol=0.01), "#### 6.0e23", {"answer": "6.022e23"}).reward == 1.0
    assert one(NumericVerifier(rel_tol=0.001), "#### 6.0e23", {"answer": "6.022e23"}).reward == 0.0
    assert one(NumericVerifier(percent="fraction"), "#### 50%", {"answer": 0.5}).reward == 1.0
    assert one(NumericVerifier(percent="fraction"), "#### 50%", {"answer": 50}).reward == 0.0
    assert one(NumericVerifier(percent="either"), "#### 50%", {"answer": 50}).reward == 1.0
    assert one(NumericVerifier(percent="either"), "#### 50%", {"answer": "0.5"}).reward == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "the answer is 5 or 6 or 7",
        "Answer: 5, 6, 7",
        r"\boxed{5} ... on second thought \boxed{6}",
        "#### 5\n#### 6",
        "1 2 3 4 5 6 7",  # a list where the last number is the answer: the strict default refuses it
        "5, 6 and 7",
    ],
)
def test_answer_spraying_scores_zero(numeric: NumericVerifier, completion: str) -> None:
    for answer in (5, 6, 7):
        result = one(numeric, completion, {"answer": answer})
        assert result.reward == 0.0 and result.error is None, result
        assert result.details["reason"] == "several different answers"


def test_spraying_allowed_when_not_strict() -> None:
    assert one(NumericVerifier(strict_single=False), "1 2 3 4 5", {"answer": 5}).reward == 1.0
    assert one(ExactVerifier(strict_single=False), r"\boxed{x}\boxed{y}", {"answer": "y"}).reward == 1.0
    assert one(ExactVerifier(), r"\boxed{x}\boxed{y}", {"answer": "y"}).reward == 0.0
    # The same answer repeated is not spraying.
    assert one(NumericVerifier(), r"\boxed{5} so \boxed{5.0}", {"answer": 5}).reward == 1.0


JUNK = ["", "   ", "\x00\x01", "None", "🙂🙂", "\\boxed{", "#### ", "answer:", "x" * 100_000]


@pytest.mark.parametrize("junk", JUNK)
def test_junk_scores_zero(numeric: NumericVerifier, junk: str) -> None:
    for verifier in (numeric, ExactVerifier()):
        result = one(verifier, junk, {"answer": "42"})
        assert (result.reward, result.correct, result.error) == (0.0, False, None), result


def test_missing_or_bad_reference_is_a_recorded_failure(numeric: NumericVerifier) -> None:
    assert one(numeric, "#### 4", {}).error == "reference has no 'answer'"
    assert "not a single number" in (one(numeric, "#### 4", {"answer": "four"}).error or "")


def test_extraction_helpers() -> None:
    assert boxed_contents(r"a \boxed{\frac{1}{2}} b \fbox{x} \boxed{unclosed") == [r"\frac{1}{2}", "x"]
    assert boxed_contents("\\boxed{" * 50_000) == []  # linear time, no recursion
    assert extract_spans("x\n#### 7\n", "auto", numeric=True) == ("gsm8k", ["7"])
    assert [str(n) for n in numbers_in(r"1,234 and \frac{1}{4} and 2e-3 and 7%")] == ["1234", "1/4", "1/500", "7%"]
    assert numbers_in("1e99999999 " + "9" * 5000) == []  # absurd numbers are skipped, quickly
    assert normalize_text(" 1,234.50 ") == "1234.5" and normalize_text(r"\text{Yes}.") == "yes"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"extract": "regex", "pattern": "(unclosed"}, "(unclosed"),
        ({"extract": "regex", "pattern": r"\d+"}, "exactly one capture group"),
        ({"extract": "regex"}, "needs a `pattern`"),
        ({"extract": "full"}, "exact-only"),
        ({"rel_tol": -1}, "rel_tol"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_numeric_refuses_bad_options(options: dict[str, Any], fragment: str) -> None:
    reason = NumericVerifier.refuse(options)
    assert reason is not None and fragment in reason
    with pytest.raises(ValueError, match="option"):
        NumericVerifier(**options)


# --------------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def math_verifier() -> Iterator[MathVerifier]:
    verifier = MathVerifier(max_workers=2, timeout=20.0)
    yield verifier
    verifier.close()


MATH_CASES = [
    (r"\frac{1}{2}", r"The answer is $\boxed{0.5}$.", 1.0),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", 1.0),
    (r"\{1, 2, 3\}", r"\boxed{\{3, 2, 1\}}", 1.0),
    ("[0, 1)", r"\boxed{[0,1)}", 1.0),
    ("x^2 + 2x + 1", r"\boxed{(x+1)^2}", 1.0),
    (r"\frac{\pi}{2}", r"\boxed{\pi/2}", 1.0),
    ("3", "Final answer: 3", 1.0),
    (r"50\%", r"\boxed{0.5}", 1.0),
    (r"\frac{1}{2}", r"\boxed{0.51}", 0.0),
    ("(0, 1)", r"\boxed{[0, 1]}", 0.0),
    (r"\{1, 2\}", r"\boxed{\{1, 2, 3\}}", 0.0),
    ("x^2 + 1", r"\boxed{(x+1)^2}", 0.0),
    ("5", "I think 5 or 6", 0.0),  # spraying
    ("5", r"\boxed{5} or maybe \boxed{6}", 0.0),
    ("5", "", 0.0),
    ("5", "no answer here", 0.0),
    # LaTeX written without delimiters, and intervals / sets / tuples / lists that are one answer
    (r"\sqrt{8}", r"2\sqrt{2}", 1.0),
    (r"\sqrt{8}", r"The answer is 2\sqrt{2}", 1.0),
    ("[0,1)", "[0,1)", 1.0),
    ("[0,1)", r"x \in [0, 1)", 1.0),
    (r"\{2,1\}", r"The answer is $\{1,2\}$.", 1.0),
    ("(2,5)", "The interval is (2, 5).", 1.0),
    ("1, 2", "The roots are 1, 2", 1.0),
    ("1, 2", "The roots are 1, 2, 3", 0.0),
    ("[0,1)", "[0,1]", 0.0),
    ("25", "12 + 13 = 25", 1.0),
    ("579", "I think 578, no wait, 579", 1.0),
    ("579", "578, 579", 0.0),  # a bare list of candidates is spraying
    ("579", "1, 2, 579", 0.0),
    ("579", "(578, 579)", 0.0),  # a bracketed list is one answer, and a wrong one
]


def test_math_equivalence_table(math_verifier: MathVerifier) -> None:
    samples = [VerifySample("q", pred, {"answer": gold}) for gold, pred, _ in MATH_CASES]
    results = run(math_verifier, samples)
    for (gold, pred, want), result in zip(MATH_CASES, results):
        assert result.reward == want, (gold, pred, result)
        assert result.error is None, (gold, pred, result)


def test_math_pathological_input_is_a_recorded_failure(math_verifier: MathVerifier) -> None:
    # sympy would evaluate 9^(9^(9^9)) for ever: math-verify's alarm (in the worker's main thread) fires.
    start = time.monotonic()
    result = one(MathVerifier(parse_timeout=1, timeout=10.0, max_workers=1), r"\boxed{9^{9^{9^{9}}}}", {"answer": "1"})
    assert result.reward == 0.0 and result.error is not None and "math-verify" in result.error
    assert time.monotonic() - start < 15
    # With math-verify's own timeout off, the hard timeout kills the worker instead.
    killer = MathVerifier(parse_timeout=0, timeout=1.5, max_workers=1)
    start = time.monotonic()
    results = run(killer, [VerifySample("q", r"\boxed{9^{9^{9^{9}}}}", {"answer": "1"}),
                           VerifySample("q", r"\boxed{2}", {"answer": "2"})])
    assert time.monotonic() - start < 15
    assert results[0].error is not None and "timed out" in results[0].error and results[0].reward == 0.0
    assert results[1].reward == 1.0  # a fresh worker took over
    killer.close()


def test_math_bad_reference(math_verifier: MathVerifier) -> None:
    assert one(math_verifier, r"\boxed{1}", {}).error == "reference has no 'answer'"


# --------------------------------------------------------------------------------------------------
# regex / format
# --------------------------------------------------------------------------------------------------
def test_regex_matches_and_non_matches() -> None:
    v = RegexVerifier(pattern=r"<answer>\d+</answer>")
    results = run(v, [VerifySample("q", c) for c in ("<answer>42</answer>", " <answer>7</answer>\n",
                                                      "<answer>x</answer>", "say <answer>42</answer>", "")])
    assert [r.reward for r in results] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert one(RegexVerifier(pattern=r"\d+", mode="search"), "say 42").reward == 1.0
    assert one(RegexVerifier(pattern="yes", flags=["IGNORECASE"]), "YES").reward == 1.0
    assert one(RegexVerifier(pattern="a", mismatch_reward=-1.0, reward=2.0), "b").reward == -1.0
    v.close()


def test_regex_pattern_from_reference() -> None:
    v = RegexVerifier()
    results = run(v, [VerifySample("q", "abc", {"pattern": "a.c"}), VerifySample("q", "abc", {"pattern": "x"}),
                      VerifySample("q", "abc", {}), VerifySample("q", "abc", {"pattern": "(bad"})])
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0]
    assert results[2].error is not None and results[3].error is not None and "(bad" in results[3].error
    v.close()


def test_regex_backtracking_is_killed_per_sample() -> None:
    v = RegexVerifier(pattern=r"(a+)+$", timeout=0.5)
    start = time.monotonic()
    results = run(v, [VerifySample("q", "aaa"), VerifySample("q", "a" * 40 + "!"), VerifySample("q", "b")])
    assert time.monotonic() - start < 15
    assert results[0].reward == 1.0 and results[2].reward == 0.0 and results[2].error is None
    assert results[1].error is not None and "timed out" in results[1].error
    v.close()


@pytest.mark.parametrize("pattern", ["(unclosed", "a{2,1}", "*start", "[z-a]"])
def test_bad_regex_is_refused_with_a_reason_naming_it(pattern: str) -> None:
    reason = RegexVerifier.refuse({"pattern": pattern})
    assert reason is not None and repr(pattern) in reason
    assert ExactVerifier.refuse({"extract": "regex", "pattern": pattern}) is not None
    assert RegexVerifier.refuse({"pattern": "ok", "flags": ["NOPE"]}) is not None


FORMAT_CASES = [
    ("<think>reasoning</think>\n<answer>4</answer>", 1.0),
    ("  <think>r</think><answer>4</answer>\n", 1.0),
    ("<answer>4</answer><think>r</think>", 0.0),  # wrong order
    ("<think>r</think> chatter <answer>4</answer>", 0.0),  # text outside the tags
    ("<think>r</think><answer> </answer>", 0.0),  # empty answer
    ("<think>r</think><answer>4</answer><answer>5</answer>", 0.0),  # tag repeated
    ("<think>r<answer>4</answer></think>", 0.0),  # nested, not in sequence
    ("just 4", 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "reward"), FORMAT_CASES)
def test_format_rules(completion: str, reward: float) -> None:
    assert one(FormatVerifier(), completion).reward == reward


def test_format_partial_credit_and_length() -> None:
    v = FormatVerifier(partial=True, max_chars=40)
    assert one(v, "<think>r</think><answer>4</answer>").reward == 1.0
    result = one(v, "<think>r</think><answer>4</answer>" + " " * 40)  # only too long
    assert result.reward == pytest.approx(0.75) and result.details["failed"] == ["length"]
    assert one(FormatVerifier(tags=["answer"], allow_text_outside=True), "so <answer>4</answer>").reward == 1.0
    assert FormatVerifier.refuse({"tags": ["ok", "no spaces"]}) is not None


# --------------------------------------------------------------------------------------------------
# Crashes inside a verifier are recorded failures
# --------------------------------------------------------------------------------------------------
def test_internal_crash_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("kaboom")

    samples = [VerifySample("q", "#### 4", {"answer": 4}), VerifySample("q", "<answer>4</answer>", {"answer": 4})]
    for cls in (NumericVerifier, ExactVerifier, FormatVerifier):
        monkeypatch.setattr(cls, "_check", boom)
        results = run(cls(), samples)
        assert len(results) == 2
        assert all(r.reward == 0.0 and r.error is not None and "kaboom" in r.error for r in results)


def test_math_worker_crash_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    import dsv4.rl.verifiers.math as math_module

    async def dead(*args: Any, **kwargs: Any) -> Any:
        from dsv4.rl.verifiers._pool import WorkerCrashed

        raise WorkerCrashed("worker exited unexpectedly")

    verifier = math_module.MathVerifier(max_workers=1)
    monkeypatch.setattr(verifier._pool, "call", dead)
    (result,) = run(verifier, [VerifySample("q", r"\boxed{1}", {"answer": "1"})])
    assert result.reward == 0.0 and result.error is not None and "exited" in result.error

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("unexpected")

    monkeypatch.setattr(verifier, "_check", broken)
    results = run(verifier, [VerifySample("q", "x", {"answer": "1"})] * 3)
    assert [r.error for r in results] == ["verifier crashed: KeyError: 'unexpected'"] * 3


def test_worker_pool_survives_a_dying_worker() -> None:
    import os

    from dsv4.rl.verifiers._pool import WorkerCrashed, WorkerPool

    pool = WorkerPool(1)

    async def go() -> tuple[Any, Any]:
        with pytest.raises(WorkerCrashed):
            await pool.call(os._exit, 3, timeout=30)
        return await pool.call(os.getpid, timeout=30), await pool.call(divmod, 7, 2, timeout=30)

    pid, quotient = asyncio.run(go())
    assert pid != os.getpid() and quotient == (3, 1)
    pool.close()

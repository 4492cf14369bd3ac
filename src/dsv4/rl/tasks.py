"""Problems (a prompt and its verifier reference), and the learning recipe's addition task: ``"123+456="`` →
``"579"``, with a held-out split by construction. Dataset-driven problems are read by :mod:`dsv4.rl.dataset`.

The model's tokenizer is character-level, made by ``write_char_tokenizer(path, alphabet=ALPHABET)``: id 0 BOS,
id 1 EOS, then ``"0123456789+= "`` in order (``"0"`` is id 2, ``"+"`` id 12, ``"="`` id 13). Prompts and answers
use only digits, ``+`` and ``=``; the space is in the alphabet so that stray spaces in decoded text survive.

Split. Whether a problem ``a+b`` is held out depends only on the unordered pair ``{a, b}``: the first 8 bytes
of ``blake2b("min(a,b)+max(a,b)")`` as an integer, modulo 10, equal to 0 (≈ 10 % of pairs). So

- the split is a fixed property of the problem: the same for every seed, every ``max_digits`` and every run;
- train and held-out can never share a problem, and a held-out ``a+b`` does not leak through its commuted
  twin ``b+a`` either (a model that learnt ``b+a`` would not have to generalise to answer ``a+b``).

Sampling is rejection sampling from the task distribution restricted to the split, from a per-split random
stream (``random.Random`` seeded with ``"{seed}:{split}"``), so drawing evaluation problems does not change
the training stream, and everything is reproducible from the seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dsv4.engine.tokenizer import Tokenizer

__all__ = ["ALPHABET", "AdditionTask", "Problem", "Split", "encode_sft", "split_of"]

ALPHABET = "0123456789+= "
Split = Literal["train", "heldout"]
_HELDOUT_MODULUS = 10  # 1 in 10 unordered pairs is held out
_MAX_TRIES_PER_PROBLEM = 10_000  # rejection keeps ~10 % for held-out; far beyond this a split is empty


@dataclass(frozen=True, init=False)
class Problem:
    """A prompt and what judges its completions.

    ``reference`` is what a verifier reads (:attr:`~dsv4.core.interfaces.VerifySample.reference`): ``{"answer":
    "579"}`` for an addition problem, a dataset record's own fields (``answer``, ``tests``, ``pattern``, …) for a
    dataset problem. ``response`` is the completion SFT trains on; ``None`` means the answer is (the addition
    task's convention). ``Problem(prompt, answer)`` is shorthand for ``reference={"answer": answer}``. Treat
    ``reference`` as read-only; it takes part in equality but not in the hash (a dict has none).
    """

    prompt: str
    reference: Mapping[str, Any] = field(hash=False)
    response: str | None

    def __init__(self, prompt: str, answer: str | None = None, *, reference: Mapping[str, Any] | None = None,
                 response: str | None = None) -> None:
        ref = dict(reference or {})
        if answer is not None:
            if "answer" in ref and ref["answer"] != answer:
                raise ValueError(f"answer={answer!r} disagrees with reference['answer']={ref['answer']!r}")
            ref["answer"] = answer
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "reference", ref)
        object.__setattr__(self, "response", response)

    @classmethod
    def of(cls, a: int, b: int) -> Problem:
        """The problem ``a+b``."""
        if a < 0 or b < 0:
            raise ValueError(f"operands {a}, {b}: the task adds non-negative integers")
        return cls(prompt=f"{a}+{b}=", answer=str(a + b))

    @property
    def answer(self) -> str:
        """``reference["answer"]`` as text (an addition problem's decimal sum, without leading zeros)."""
        if "answer" not in self.reference:
            raise ValueError(f"problem {self.prompt[:80]!r} has no reference answer")
        value = self.reference["answer"]
        return value if isinstance(value, str) else str(value)

    @property
    def operands(self) -> tuple[int, int]:
        """``(a, b)``, read back from the prompt."""
        left, right = self.prompt.removesuffix("=").split("+")
        return int(left), int(right)


def split_of(a: int, b: int) -> Split:
    """Which split the problem ``a+b`` belongs to (see the module docstring); symmetric in ``a`` and ``b``."""
    lo, hi = min(a, b), max(a, b)
    digest = hashlib.blake2b(f"{lo}+{hi}".encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "big") % _HELDOUT_MODULUS == 0 else "train"


class AdditionTask:
    """Random addition problems of up to ``max_digits`` digits per operand, deterministic given ``seed``.

    A problem draws ``d`` from ``1..max_digits`` (uniformly, or in proportion to ``digit_weights``), then
    both operands uniformly from ``0..10^d − 1``, so (unweighted) 1-, 2- and 3-digit problems appear
    equally often (by the larger operand's range) and short operands mix with long ones. Samples are
    i.i.d.: repeats are possible, as in a stream of fresh problems.
    """

    def __init__(self, max_digits: int = 3, *, seed: int = 0, digit_weights: Sequence[float] | None = None) -> None:
        if max_digits < 1:
            raise ValueError(f"max_digits={max_digits}: need at least 1")
        if digit_weights is not None:
            if len(digit_weights) != max_digits or min(digit_weights) < 0 or sum(digit_weights) <= 0:
                raise ValueError(
                    f"digit_weights={list(digit_weights)}: need {max_digits} non-negative weights, not all zero"
                )
        self.max_digits = max_digits
        self.digit_weights = list(digit_weights) if digit_weights is not None else None
        self.seed = seed
        self._rngs: dict[str, random.Random] = {s: random.Random(f"{seed}:{s}") for s in ("train", "heldout")}

    def sample(self, n: int, split: Split = "train") -> list[Problem]:
        """``n`` problems of ``split``; successive calls continue that split's stream."""
        if split not in self._rngs:
            raise ValueError(f"split={split!r}: choose 'train' or 'heldout'")
        rng = self._rngs[split]
        out: list[Problem] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > _MAX_TRIES_PER_PROBLEM * n:
                raise RuntimeError(f"no {split} problem found with max_digits={self.max_digits}")
            if self.digit_weights is None:
                d = rng.randint(1, self.max_digits)
            else:
                d = rng.choices(range(1, self.max_digits + 1), weights=self.digit_weights)[0]
            a, b = rng.randrange(10**d), rng.randrange(10**d)
            if split_of(a, b) == split:
                out.append(Problem.of(a, b))
        return out

    def unseen_3digit(self, n: int) -> list[Problem]:
        """The acceptance set: ``n`` distinct held-out problems with both operands exactly 3 digits (100–999).

        The same list on every call for a given seed (its own random stream, started afresh), and never a
        training problem, whatever ``max_digits`` the task was made with.
        """
        rng = random.Random(f"{self.seed}:unseen_3digit")
        seen: set[tuple[int, int]] = set()
        out: list[Problem] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > _MAX_TRIES_PER_PROBLEM * n:
                raise RuntimeError(f"cannot find {n} distinct held-out 3-digit problems")
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            if (a, b) not in seen and split_of(a, b) == "heldout":
                seen.add((a, b))
                out.append(Problem.of(a, b))
        return out

    @staticmethod
    def target(problem: Problem) -> str:
        """The completion text the model should produce, ``problem.answer``; SFT data appends EOS after it."""
        return problem.answer


def encode_sft(problem: Problem, tokenizer: Tokenizer) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: ``ids = [BOS] + prompt + target + [EOS]`` and the number of leading prompt ids
    (BOS included). The target is the problem's ``response``, else its answer (:meth:`AdditionTask.target`).
    A trainer predicts ``ids[i+1]`` from row ``i`` and trains on the completion only, i.e. on targets
    ``ids[n_prompt:]`` (rows ``n_prompt − 1`` … ``len(ids) − 2``).

    The prompt and the target are tokenised apart, as generation sees them: the engine encodes the prompt,
    then samples the completion token by token. A prompt that already starts with the BOS (a rendered chat
    template) gets no second one.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; SFT targets end with EOS")
    target = problem.response if problem.response is not None else AdditionTask.target(problem)
    prompt = tokenizer.encode(problem.prompt)  # adds BOS
    completion = tokenizer.encode(target, add_special_tokens=False)
    return [*prompt, *completion, eos], len(prompt)

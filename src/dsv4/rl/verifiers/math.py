"""``math``: mathematical equivalence of the final answer and the reference, decided by math-verify.

The answer is taken from ``\\boxed{...}`` first, then from a final-answer phrase or the last expression
(math-verify's extraction), after the completion's reasoning; a completion that writes LaTeX without
delimiters has its last line's answer wrapped in ``$…$`` first (``_tasks.bare_answer``).
``\\frac{1}{2}`` and ``0.5``, ``2\\sqrt{2}`` and ``\\sqrt{8}``, ``\\{1,2,3\\}`` and ``\\{3,2,1\\}``,
``[0, 1)`` written either way are equivalent; different values, intervals or sets are not.

math-verify times out with ``signal.alarm``, which works only in a main thread, and sympy can still
spend a long time in C code. So every check runs in a worker process (its main thread, the alarm
enabled) and the worker is killed when a sample exceeds the hard ``timeout``: a hang or a crash is
that sample's recorded failure, and the event loop never waits on sympy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import Field

from dsv4.core.interfaces import VerifyResult, VerifySample
from dsv4.rl.verifiers._common import (
    CAPABILITIES,
    Options,
    failure,
    parse_options,
    refusal,
    strip_reasoning,
    verify_each,
)
from dsv4.rl.verifiers._pool import WorkerError, WorkerPool, WorkerTimeout
from dsv4.rl.verifiers._tasks import math_equivalent
from dsv4.rl.verifiers.answer import boxed_contents, ends_in_list

__all__ = ["MathOptions", "MathVerifier"]


class MathOptions(Options):
    """Options of ``math``."""

    reference_key: str = Field("answer", description="Key of the reference answer in a sample's `reference`.")
    timeout: float = Field(10.0, gt=0, description="Hard seconds per sample; past it the worker is killed.")
    parse_timeout: int = Field(
        3, ge=0, description="math-verify's own limit per parse / comparison, in seconds (0: only `timeout`)."
    )
    max_workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), gt=0,
                             description="Worker processes (samples checked at once).")
    strict_single: bool = Field(True, description="Score 0 when the completion offers several different answers.")
    strip_think: bool = Field(True, description="Ignore everything up to the last </think>.")
    max_chars: int = Field(10_000, gt=0, description="Only the last max_chars characters are parsed.")
    float_rounding: int = Field(6, ge=0, description="math-verify: decimal places numbers are rounded to.")
    numeric_precision: int = Field(15, gt=0, description="math-verify: significant digits of numeric checks.")


# A list that closes its line inside brackets: one interval, set or tuple ("[0, 1)", "\\{1, 2\\}", "(3, 4).").
_ENCLOSED = re.compile(r"[(\[{][^()\[\]{}]*[)\]}]\s*[.!;]?\s*$")


def _sprayed(text: str, golds: Sequence[str]) -> bool:
    """Several different boxed answers, or (with none boxed) a trailing list of different numbers that is
    not one bracketed answer, when the reference is a single value (a reference with a comma is itself
    a list, and a list answer is then compared as a whole)."""
    boxed = {"".join(b.split()) for b in boxed_contents(text)}
    if boxed:
        return len(boxed) > 1
    if any("," in g for g in golds):
        return False
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    return ends_in_list(last) and _ENCLOSED.search(last) is None


class MathVerifier:
    """``math``: 1 when the final answer is mathematically equivalent to the reference, else 0."""

    name: ClassVar[str] = "math"
    capabilities: ClassVar[frozenset[str]] = CAPABILITIES

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(MathOptions, options)
        self._pool = WorkerPool(self.options.max_workers, preload=("math_verify",))

    @classmethod
    def refuse(cls, options: Mapping[str, Any]) -> str | None:
        """``None`` if ``options`` are valid and math-verify is installed, else the reason."""
        import importlib.util

        if importlib.util.find_spec("math_verify") is None:
            return "the math-verify package is not installed (pip install 'math-verify>=0.7')"
        return refusal(MathOptions, options)

    async def verify(self, samples: Sequence[VerifySample]) -> list[VerifyResult]:
        """One result per sample, in order; never raises for a bad sample."""
        return await verify_each(samples, self._check, concurrency=self.options.max_workers)

    def close(self) -> None:
        """Stop the worker processes (they are started again if the verifier is used again)."""
        self._pool.close()

    async def _check(self, sample: VerifySample) -> VerifyResult:
        reference = sample.reference
        key = self.options.reference_key
        if not isinstance(reference, Mapping) or key not in reference:
            return failure(f"reference has no {key!r}")
        raw = reference[key]
        golds = [str(g) for g in (raw if isinstance(raw, list | tuple) else [raw]) if g is not None]
        if not golds:
            return failure(f"reference {key!r} is empty")
        text = sample.completion if isinstance(sample.completion, str) else ""
        if self.options.strip_think:
            text = strip_reasoning(text)
        text = text[-self.options.max_chars :]
        if not text.strip():
            return VerifyResult(0.0, False, details={"reason": "no answer"})
        if self.options.strict_single and _sprayed(text, golds):
            return VerifyResult(0.0, False, details={"reason": "several different answers"})
        o = self.options
        try:
            equivalent, extracted = await self._pool.call(
                math_equivalent, golds, text, o.parse_timeout, o.float_rounding, o.numeric_precision, timeout=o.timeout
            )
        except WorkerTimeout:
            return failure(f"math-verify timed out after {o.timeout:g}s (worker killed)")
        except WorkerError as exc:
            return failure(f"math-verify failed: {exc}")
        reason = "equivalent" if equivalent else ("no answer" if extracted is None else "not equivalent")
        return VerifyResult(float(equivalent), bool(equivalent), details={"extracted": extracted, "reason": reason})

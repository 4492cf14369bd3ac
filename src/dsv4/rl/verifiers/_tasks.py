"""The functions verifiers run inside :class:`~dsv4.rl.verifiers._pool.WorkerPool` workers.

Kept apart, importing nothing but the standard library at module level: a worker imports only this
module (and what a task preloads), so it starts in milliseconds instead of loading torch through
:mod:`dsv4.core.interfaces`.
"""

from __future__ import annotations

import re

__all__ = ["bare_answer", "math_equivalent", "regex_match_all", "regex_spans"]

_DELIMITERS = ("$", "\\boxed", "\\fbox", "\\(", "\\[")
# Prose that introduces a final answer on its line ("The answer is", "the roots are", "Answer:").
_CUE = re.compile(r"(?i)(?:\banswer\b(?:\s+is)?\s*:?|\bis\b|\bare\b|\bequals\b|:)\s*")
_COMMAND = re.compile(r"\\[A-Za-z]+")


def bare_answer(completion: str) -> str | None:
    """The final answer of a completion that writes LaTeX without delimiters ("2\\sqrt{2}", "[0, 1)",
    "x \\in [0,1)", "The roots are 1, 2"), wrapped in ``$…$`` for math-verify's LaTeX extraction: the
    last line, after its last answer cue, when what is left is an expression rather than prose.
    ``None`` when the completion has delimiters or boxes (math-verify finds those itself) or no such line.
    """
    if any(d in completion for d in _DELIMITERS):
        return None
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return None
    line = lines[-1]
    cues = list(_CUE.finditer(line))
    if cues:
        line = line[cues[-1].end() :]
    line = line.strip().rstrip(".!;").strip()
    if not line or re.search(r"[A-Za-z]{2,}", _COMMAND.sub(" ", line)):  # words: prose, not an expression
        return None
    return f"${line}$"


def regex_spans(pattern: str, text: str) -> list[str]:
    """Every first-group match of a user ``pattern`` (a pattern may backtrack for ever: hence a worker)."""
    return [m.group(1) or "" for m in re.finditer(pattern, text)]


def regex_match_all(pattern: str, flags: int, mode: str, texts: list[str]) -> list[bool]:
    """Whether each text matches ``pattern`` by ``mode`` (``fullmatch``, ``search`` or ``match``)."""
    method = getattr(re.compile(pattern, flags), mode)
    return [method(t) is not None for t in texts]


def math_equivalent(
    golds: list[str], completion: str, parse_timeout: int, float_rounding: int, numeric_precision: int
) -> tuple[bool, str | None]:
    """(equivalent to one of ``golds``, the answer math-verify extracted from ``completion``).

    Runs in a worker's main thread, where math-verify's ``signal.alarm`` timeouts work.
    """
    from math_verify import (  # type: ignore[import-untyped]
        ExprExtractionConfig,
        LatexExtractionConfig,
        parse,
        verify,
    )

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    limit = parse_timeout or None  # None turns math-verify's alarm off; the pool's timeout still holds
    bare = bare_answer(completion)
    pred = parse(bare, extraction_config=config, parsing_timeout=limit, raise_on_error=True) if bare else []
    if not pred:
        pred = parse(completion, extraction_config=config, parsing_timeout=limit, raise_on_error=True)
    if not pred:
        return False, None
    extracted = str(pred[-1])[:200]
    for gold_text in golds:
        # A bare reference ("\frac{1}{2}") is LaTeX without delimiters; math-verify wants them.
        wrapped = gold_text if "$" in gold_text or "\\boxed" in gold_text else f"${gold_text}$"
        gold = parse(wrapped, extraction_config=config, parsing_timeout=limit, raise_on_error=True)
        if not gold:
            raise ValueError(f"reference answer {gold_text[:200]!r} could not be parsed")
        if verify(gold, pred, float_rounding=float_rounding, numeric_precision=numeric_precision,
                  timeout_seconds=limit, raise_on_error=True):
            return True, extracted
    return False, extracted

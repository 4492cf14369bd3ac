"""``code``: run the completion's Python against the task's tests in a sandbox; reward = tests passed.

The code is the last ```` ```python ```` fenced block of the completion after its reasoning (else the last
unlabelled fenced block, else the whole text). Tests come from the sample's reference::

    {"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]}       # stdin → stdout, trailing whitespace ignored
    {"assert_tests": ["assert add(1, 2) == 3", ...]}              # function-style, run after the code

Every test runs in a fresh process inside :func:`~dsv4.rl.verifiers.sandbox.run_sandboxed` (no
network, read-only filesystem but a private tmpfs, unprivileged per-run uid, CPU / memory / process /
file-size limits, wall-clock timeout; see :mod:`dsv4.rl.verifiers._sandbox_harness`). Samples run
concurrently, at most ``max_workers`` at a time. A test that crashes, times out or hits a limit is
recorded in ``error`` (reward counts only passed tests); a wrong answer is not an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

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
from dsv4.rl.verifiers.sandbox import SandboxLimits, run_sandboxed

__all__ = ["CodeOptions", "CodeVerifier", "extract_code", "reference_tests"]

Isolation = Literal["user", "netns", "mountns", "pidns", "ipcns"]
#: Outcomes that are the program's fault without being a crash: no ``error`` for these.
_CLEAN_FAILURES = frozenset({"passed", "wrong_answer"})


class CodeOptions(Options):
    """Options of ``code``."""

    timeout: float = Field(5.0, gt=0, le=600, description="Wall-clock seconds per test.")
    cpu_seconds: int | None = Field(None, gt=0, description="CPU seconds per test process (None: ceil(timeout)).")
    memory_mb: int = Field(512, ge=32, description="Address-space limit per process, MiB.")
    max_processes: int = Field(16, ge=1, description="Processes (and threads) the program may have at once.")
    max_file_mb: int = Field(16, ge=1, description="Largest file (stdout included) the program may write, MiB.")
    disk_mb: int = Field(64, ge=1, description="Size of the private directory the program may write in, MiB.")
    max_workers: int = Field(default_factory=lambda: min(8, os.cpu_count() or 1), gt=0,
                             description="Samples run at once.")
    all_or_nothing: bool = Field(False, description="Reward 1 only when every test passes (else the fraction).")
    stop_on_failure: bool | None = Field(None, description="Skip the remaining tests after a failure "
                                                           "(None: when all_or_nothing).")
    python: str | None = Field(None, description="Interpreter for the candidate code (None: this one).")
    python_guards: bool = Field(True, description="Also refuse sockets/processes/ctypes in an audit hook.")
    require: tuple[Isolation, ...] = Field(
        ("user", "netns", "mountns"),
        description="Isolation that must be available, else samples fail with the reason instead of running.",
    )
    strip_think: bool = Field(True, description="Ignore everything up to the last </think>.")
    max_tests: int = Field(1000, gt=0, description="More tests than this in one reference is an error.")

    @field_validator("python")
    @classmethod
    def _executable(cls, python: str | None) -> str | None:
        if python is not None and not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ValueError(f"{python!r} is not an executable file")
        return python


def extract_code(text: str) -> str:
    """The last ```` ```python ```` (or ```` ```py ````) block, else the last unlabelled block, else ``text``.

    Line by line rather than one regex: a regex over unclosed fences can take quadratic time.
    """
    labelled: list[str] = []
    plain: list[str] = []
    lines: list[str] | None = None
    language = ""
    for line in text.splitlines():
        stripped = line.strip()
        if lines is None:
            if stripped.startswith("```"):
                lines, language = [], stripped[3:].strip().lower()
        elif stripped.startswith("```"):
            block = "\n".join(lines) + "\n"
            if language in ("python", "py", "python3"):
                labelled.append(block)
            elif not language:
                plain.append(block)
            lines = None  # a block in another language is not the answer
        else:
            lines.append(line)
    if labelled:
        return labelled[-1]
    if plain:
        return plain[-1]
    return text


def reference_tests(reference: Mapping[str, Any], max_tests: int) -> list[dict[str, str]] | str:
    """The sandbox tests a reference describes, or the reason it describes none."""
    if not isinstance(reference, Mapping):
        return "reference is not a mapping"
    tests: list[dict[str, str]] = []
    io_tests = reference.get("tests", [])
    if not isinstance(io_tests, list | tuple):
        return "reference 'tests' must be a list of {'input', 'output'}"
    for k, test in enumerate(io_tests):
        if not isinstance(test, Mapping) or not isinstance(test.get("output"), str):
            return f"reference 'tests'[{k}] needs a string 'output'"
        stdin = test.get("input", "")
        if not isinstance(stdin, str):
            return f"reference 'tests'[{k}]['input'] must be a string"
        tests.append({"stdin": stdin, "stdout": test["output"]})
    asserts = reference.get("assert_tests", [])
    if not isinstance(asserts, list | tuple) or not all(isinstance(a, str) for a in asserts):
        return "reference 'assert_tests' must be a list of strings"
    for k, source in enumerate(asserts):
        # A blank test would pass any program; a broken one would be blamed on the program.
        if not source.strip():
            return f"reference 'assert_tests'[{k}] is empty"
        try:
            compile(source, f"assert_tests[{k}]", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
            return f"reference 'assert_tests'[{k}] is not valid Python: {type(exc).__name__}: {exc}"
    tests.extend({"assert": a} for a in asserts)
    if not tests:
        return "reference has no 'tests' or 'assert_tests'"
    if len(tests) > max_tests:
        return f"reference has {len(tests)} tests, more than max_tests={max_tests}"
    return tests


class CodeVerifier:
    """``code``: fraction of the task's tests the completion's program passes, run in a sandbox."""

    name: ClassVar[str] = "code"
    capabilities: ClassVar[frozenset[str]] = CAPABILITIES | {"sandboxed"}

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(CodeOptions, options)
        o = self.options
        self.limits = SandboxLimits(
            timeout=o.timeout, cpu_seconds=o.cpu_seconds, memory_mb=o.memory_mb, max_processes=o.max_processes,
            max_file_mb=o.max_file_mb, disk_mb=o.disk_mb,
        )

    @classmethod
    def refuse(cls, options: Mapping[str, Any]) -> str | None:
        """``None`` if ``options`` are valid on this platform, else the reason."""
        if not sys.platform.startswith("linux"):
            return f"the code sandbox needs Linux (namespaces, rlimits), not {sys.platform}"
        return refusal(CodeOptions, options)

    async def verify(self, samples: Sequence[VerifySample]) -> list[VerifyResult]:
        """One result per sample, in order; never raises for a bad sample."""
        return await verify_each(samples, self._check, concurrency=self.options.max_workers)

    async def _check(self, sample: VerifySample) -> VerifyResult:
        o = self.options
        tests = reference_tests(sample.reference, o.max_tests)
        if isinstance(tests, str):
            return failure(tests)
        text = sample.completion if isinstance(sample.completion, str) else ""
        if o.strip_think:
            text = strip_reasoning(text)
        code = extract_code(text)
        if not code.strip():
            return VerifyResult(0.0, False, details={"reason": "no code", "passed": 0, "total": len(tests)})
        stop = o.all_or_nothing if o.stop_on_failure is None else o.stop_on_failure
        run = await run_sandboxed(
            code, tests, self.limits, python=o.python, guards=o.python_guards, require=o.require, stop_on_failure=stop
        )
        details: dict[str, Any] = {
            "passed": sum(t.passed for t in run.tests),
            "total": len(tests),
            "tests": [{"status": t.status, "seconds": t.seconds, "detail": t.detail} for t in run.tests],
            "isolation": dict(run.isolation),
            "uid": run.uid,
        }
        if run.error is not None:
            return failure(run.error, **details)
        passed, total = details["passed"], len(tests)
        correct = passed == total
        reward = float(correct) if o.all_or_nothing else passed / total
        crashed = [(k, t) for k, t in enumerate(run.tests) if t.status not in _CLEAN_FAILURES]
        error = None
        if crashed:
            k, first = crashed[0]
            error = (f"{len(crashed)} of {total} tests did not run cleanly; "
                     f"test {k}: {first.status}: {first.detail[-300:]}")
        return VerifyResult(reward, correct, error=error, details=details)

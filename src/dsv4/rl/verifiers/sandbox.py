"""Run untrusted Python against tests in a throw-away OS sandbox, from asyncio.

:func:`run_sandboxed` starts the harness (:mod:`dsv4.rl.verifiers._sandbox_harness`, a stdlib-only
script) in a subprocess of its own session, hands it the code and tests, and waits for its report
without blocking the event loop. The harness enters new network, mount, pid and IPC namespaces and
runs each test as a fresh unprivileged uid with resource limits; the isolation it achieved comes back
in :attr:`SandboxRun.isolation`, and ``require`` makes missing isolation a refusal to run rather than
a silent downgrade. Whatever happens (a timeout, a crash, cancellation), the harness's session is
killed, every process of the run's uid is killed, and the temporary directory is removed before
:func:`run_sandboxed` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HARNESS", "ISOLATION_KEYS", "SandboxLimits", "SandboxRun", "TestRun", "run_sandboxed"]

#: The harness script, run by path (``python -I``), so it never imports dsv4.
HARNESS = Path(__file__).with_name("_sandbox_harness.py")
#: Isolation properties a run reports (see the harness's docstring for what each means).
ISOLATION_KEYS = ("user", "netns", "mountns", "pidns", "ipcns", "rlimits", "guards")
# Per-run uids come from a range no real account uses, so "kill all of this uid" hits only this run.
_UID_RANGE = (1 << 20, 1 << 30)


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Per-test limits."""

    timeout: float = 5.0  # wall-clock seconds
    cpu_seconds: int | None = None  # RLIMIT_CPU; None: ceil(timeout)
    memory_mb: int = 512  # RLIMIT_AS, per process
    max_processes: int = 16  # RLIMIT_NPROC of the sandbox user (threads count too)
    max_file_mb: int = 16  # RLIMIT_FSIZE: any file written, captured stdout included
    disk_mb: int = 64  # size of the private tmpfs the program may write in


@dataclass(frozen=True, slots=True)
class TestRun:
    """One test's outcome.

    ``status`` is ``passed``, ``wrong_answer``, ``exited_early`` (an assert test exited before its
    asserts ran), ``runtime_error``, ``timeout``, ``cpu_limit``, ``memory_limit``, ``output_limit``,
    ``killed`` or ``sandbox_error``.
    """

    __test__ = False  # not a pytest test class, whatever its name

    status: str
    seconds: float = 0.0
    detail: str = ""

    @property
    def passed(self) -> bool:
        """Whether the test passed."""
        return self.status == "passed"


@dataclass(frozen=True, slots=True)
class SandboxRun:
    """What a sandboxed run reported: per-test outcomes (tests not run are missing), the isolation
    achieved, the run's uid (None when not root), and an error when the sandbox itself failed."""

    tests: tuple[TestRun, ...] = ()
    isolation: Mapping[str, bool] = field(default_factory=dict)
    error: str | None = None
    uid: int | None = None


def _default_python() -> str:
    """The base interpreter behind this one. Candidate code needs only the standard library, and a
    virtual environment's own directory may sit where the sandbox hides everything (e.g. under /tmp)."""
    return os.path.realpath(sys.executable)


def _expose_paths(python: str) -> list[str]:
    paths = {sys.base_prefix, sys.base_exec_prefix} if os.path.realpath(python) == _default_python() else set()
    real = os.path.realpath(python)
    paths.add(os.path.dirname(os.path.dirname(real)))  # the interpreter's own prefix (bin/..)
    # A virtual environment's interpreter is a link into its base: its own bin/.. (pyvenv.cfg, its
    # site-packages) is needed too, as the sandbox sees nothing of the host but what is listed here.
    paths.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    return sorted(paths)


async def run_sandboxed(
    code: str,
    tests: Sequence[Mapping[str, str]],
    limits: SandboxLimits = SandboxLimits(),
    *,
    python: str | None = None,
    guards: bool = True,
    require: Collection[str] = ("user", "netns", "mountns"),
    stop_on_failure: bool = False,
) -> SandboxRun:
    """Run ``code`` against ``tests`` in the sandbox.

    A test is ``{"stdin": ..., "stdout": ...}`` (the program's output must equal ``stdout`` up to
    trailing whitespace) or ``{"assert": source}`` (run after the code; it must finish). Never raises
    for anything the code does; a sandbox that cannot start is reported in :attr:`SandboxRun.error`.
    """
    python = python or _default_python()
    root = os.geteuid() == 0
    uid = _UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) if root else None
    job = {
        "code": code,
        "tests": [dict(t) for t in tests],
        "uid": uid,
        "python": python,
        "expose": _expose_paths(python),
        "limits": {
            "timeout": limits.timeout,
            "cpu": limits.cpu_seconds or max(1, math.ceil(limits.timeout)),
            "memory_mb": limits.memory_mb,
            "processes": limits.max_processes,
            "file_mb": limits.max_file_mb,
            "disk_mb": limits.disk_mb,
        },
        "guards": guards,
        "require": list(require),
        "stop_on_failure": stop_on_failure,
    }
    # Per test: its timeout, plus process start and clean-up; plus the harness's own start.
    deadline = len(tests) * (limits.timeout + 2.0) + 20.0
    base = await asyncio.to_thread(tempfile.mkdtemp, prefix="dsv4_sandbox_")
    job["base"] = base
    proc: asyncio.subprocess.Process | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-B", str(HARNESS),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: one killpg ends the harness and its children
        )
        payload = json.dumps(job).encode()  # json escapes lone surrogates, so any str travels
        try:
            out, err = await asyncio.wait_for(proc.communicate(payload), deadline)
        except TimeoutError:
            error = f"sandbox did not finish within {deadline:g}s"
        else:
            try:
                report = json.loads(out)
            except ValueError:
                error = f"sandbox failed (exit {proc.returncode}): {err.decode(errors='replace')[-500:]}"
    except OSError as exc:
        error = f"sandbox could not start: {exc}"
    finally:
        if proc is not None and proc.returncode is None:
            # At once, not in a coroutine a closing event loop might cancel: with the harness (pid 1 of
            # its namespace) killed, the kernel kills everything the code started.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        # Shielded: a cancelled verify() still reaps, sweeps the uid and removes the directory.
        await asyncio.shield(_clean_up(proc, uid, base, report))
    if report is None:
        return SandboxRun(error=error, uid=uid)
    return SandboxRun(
        tests=tuple(TestRun(t["status"], t["seconds"], t["detail"]) for t in report["tests"]),
        isolation=report["isolation"],
        error=report["error"],
        uid=uid,
    )


async def _clean_up(
    proc: asyncio.subprocess.Process | None, uid: int | None, base: str, report: dict[str, Any] | None
) -> None:
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(Exception):
            await proc.wait()
    # A clean run inside a pid namespace left nothing behind (the harness swept after each test and
    # the namespace died with it); anything else gets a sweep of the run's uid.
    clean = report is not None and report.get("isolation", {}).get("pidns", False)
    if uid is not None and not clean:
        with contextlib.suppress(Exception):
            # The harness does it (single-threaded, so it may fork helpers that become the uid).
            sweeper = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-B", str(HARNESS), "--sweep", str(uid),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await sweeper.wait()
    await asyncio.to_thread(shutil.rmtree, base, True)

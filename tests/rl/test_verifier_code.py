"""The sandboxed code verifier: right and wrong programs, and containment of hostile ones.

Every hostile program runs twice, with the Python-level guards on and off, so the OS-level walls
(namespaces, unprivileged uid, rlimits, kill-by-uid) are shown to hold on their own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsv4.core.interfaces import VerifyResult, VerifySample
from dsv4.rl.verifiers.code import CodeVerifier, extract_code, reference_tests
from dsv4.rl.verifiers.sandbox import run_sandboxed
from dsv4.testing.net import CountingListener

REPO = Path(__file__).resolve().parents[2]
ADD = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "20 22\n", "output": "42\n"},
                 {"input": "-1 1\n", "output": "0\n"}]}


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


def run(verifier: CodeVerifier, samples: list[VerifySample]) -> list[VerifyResult]:
    return asyncio.run(verifier.verify(samples))


def processes_of(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes owned by ``uid``, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def my_children() -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{os.getpid()}\n" in status:
                children.add(int(entry))
    return children


@pytest.fixture(scope="module", autouse=True)
def sandbox_available() -> None:
    report = asyncio.run(run_sandboxed("print(1)", [{"stdin": "", "stdout": "1"}]))
    if report.error is not None:
        pytest.skip(f"the sandbox cannot run here: {report.error}")


# --------------------------------------------------------------------------------------------------
# Correct and wrong programs
# --------------------------------------------------------------------------------------------------
def test_correct_and_wrong_stdio_programs() -> None:
    v = CodeVerifier(timeout=3.0)
    right = fenced("a, b = map(int, input().split())\nprint(a + b)")
    wrong = fenced("a, b = map(int, input().split())\nprint(a * b)")
    half = fenced("a, b = map(int, input().split())\nprint(a + b if a > 0 else 7)")
    results = run(v, [VerifySample("q", right, ADD), VerifySample("q", wrong, ADD), VerifySample("q", half, ADD)])
    assert [r.reward for r in results] == [1.0, 0.0, pytest.approx(2 / 3)]
    assert [r.correct for r in results] == [True, False, False]
    assert all(r.error is None for r in results)  # a wrong answer is not an error
    assert results[1].details["tests"][0]["status"] == "wrong_answer"
    iso = results[0].details["isolation"]
    assert all(iso[k] for k in ("user", "netns", "mountns", "pidns", "rlimits", "guards")), iso


def test_trailing_whitespace_is_ignored_and_assert_tests() -> None:
    v = CodeVerifier(timeout=3.0)
    ws = fenced("print('3   ')\nprint()\nprint()")
    asserts = {"assert_tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]}
    func = fenced("def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(input())")
    results = run(v, [VerifySample("q", ws, {"tests": [{"input": "", "output": "3"}]}),
                      VerifySample("q", func, asserts)])
    assert results[0].reward == 1.0
    assert results[1].reward == pytest.approx(2 / 3) and results[1].error is None  # the __main__ block did not run


def test_all_or_nothing_stops_at_the_first_failure() -> None:
    v = CodeVerifier(timeout=3.0, all_or_nothing=True)
    half = fenced("a, b = map(int, input().split())\nprint(a + b if a > 0 else 7)")
    (result,) = run(v, [VerifySample("q", half, ADD)])
    assert result.reward == 0.0 and not result.correct
    assert [t["status"] for t in result.details["tests"]] == ["passed", "passed", "wrong_answer"]


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_asserts_does_not_pass(exit_call: str) -> None:
    v = CodeVerifier(timeout=3.0)
    (result,) = run(v, [VerifySample("q", fenced(f"def add(a, b): return 0\n{exit_call}"),
                                     {"assert_tests": ["assert add(1, 2) == 3"]})])
    assert result.reward == 0.0
    assert result.details["tests"][0]["status"] in ("exited_early", "runtime_error")


def test_code_extraction() -> None:
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("<x>\n```\nc = 3\n```") == "c = 3\n"
    assert extract_code("```bash\nls\n```\nprint(1)") == "```bash\nls\n```\nprint(1)"
    assert extract_code("print(1)") == "print(1)"
    assert extract_code("```" * 200_000) == "```" * 200_000  # no fence pair: linear, whole text


def test_bad_references_and_empty_code_are_recorded() -> None:
    v = CodeVerifier(timeout=3.0)
    results = run(v, [VerifySample("q", "print(1)", {}), VerifySample("q", "print(1)", {"tests": "nope"}),
                      VerifySample("q", "", ADD), VerifySample("q", "print(1)", {"tests": [{"input": "x"}]})])
    assert [r.reward for r in results] == [0.0] * 4
    assert results[0].error == "reference has no 'tests' or 'assert_tests'"
    assert results[1].error is not None and results[3].error is not None
    assert results[2].error is None and results[2].details["reason"] == "no code"
    assert isinstance(reference_tests({"assert_tests": ["assert True"]}, 10), list)


def test_samples_run_concurrently_with_a_bound() -> None:
    sleeper = VerifySample("q", fenced("import time\ntime.sleep(0.6)\nprint('ok')"),
                           {"tests": [{"input": "", "output": "ok"}]})
    v = CodeVerifier(timeout=5.0, max_workers=3)
    start = time.monotonic()
    results = run(v, [sleeper] * 6)
    elapsed = time.monotonic() - start
    assert [r.reward for r in results] == [1.0] * 6
    assert 1.2 <= elapsed < 3.6, elapsed  # two waves of three, not six in a row, not six at once


def test_internal_crash_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    import dsv4.rl.verifiers.code as code_module

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no sandbox for you")

    monkeypatch.setattr(code_module, "run_sandboxed", broken)
    results = run(CodeVerifier(), [VerifySample("q", "print(3)", ADD)] * 2)
    assert [(r.reward, r.error) for r in results] == [(0.0, "verifier crashed: OSError: no sandbox for you")] * 2


def test_refuses_bad_options() -> None:
    assert "timeout" in (CodeVerifier.refuse({"timeout": -1}) or "")
    assert "python" in (CodeVerifier.refuse({"python": "/nonexistent/python"}) or "")
    assert "require" in (CodeVerifier.refuse({"require": ["teleport"]}) or "")
    assert CodeVerifier.refuse({"timeout": 2.0, "require": []}) is None


# --------------------------------------------------------------------------------------------------
# Containment: one batch of hostile programs, run concurrently with guards on and off
# --------------------------------------------------------------------------------------------------
TIMEOUT = 2.0
ESCAPES = [f"/tmp/dsv4_escape_{uuid.uuid4().hex}", str(REPO / f"dsv4_escape_{uuid.uuid4().hex}")]
HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass",
    # Prints the right output and exits at once, leaving a detached child that left its session.
    "detached_child": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    while True: time.sleep(0.1)\n"
                      "print('ok')",
    "infinite_loop": "while True:\n    pass",
    "sleeper": "import time\ntime.sleep(60)",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))",
    "huge_alloc": "x = bytearray(64 * 2**30)\nprint('ok')",
    "network": "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('ok')",
    "dns": "import socket\nsocket.getaddrinfo('pypi.org', 443)\nprint('ok')",
    "write_outside": "for path in {escapes!r}:\n    open(path, 'w').write('escaped')\nprint('ok')",
    "output_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
}


@pytest.fixture(scope="module")
def hostile_results() -> Iterator[dict[tuple[str, bool], Any]]:
    listener = CountingListener.tcp()
    # The host itself can reach the listener: the sandbox's failure to is the sandbox's doing.
    socket.create_connection(("127.0.0.1", listener.port), timeout=1).close()
    time.sleep(0.3)
    host_connections = listener.accepted
    children_before = my_children()
    names = list(HOSTILE)
    samples = [
        VerifySample("q", fenced(HOSTILE[n].format(port=listener.port, escapes=ESCAPES)),
                     {"tests": [{"input": "", "output": "ok"}]})
        for n in names
    ]

    async def both() -> tuple[list[VerifyResult], list[VerifyResult]]:
        kw: dict[str, Any] = {"timeout": TIMEOUT, "max_workers": len(names), "memory_mb": 256, "max_processes": 8}
        guarded = CodeVerifier(python_guards=True, **kw).verify(samples)
        bare = CodeVerifier(python_guards=False, **kw).verify(samples)
        return await asyncio.gather(guarded, bare)

    start = time.monotonic()
    guarded, bare = asyncio.run(both())
    elapsed = time.monotonic() - start
    time.sleep(0.3)
    out: dict[tuple[str, bool], Any] = {}
    for name, g, b in zip(names, guarded, bare):
        out[name, True], out[name, False] = g, b
    out["elapsed"] = elapsed  # type: ignore[index]
    out["connections"] = listener.accepted - host_connections  # type: ignore[index]
    out["new_children"] = my_children() - children_before  # type: ignore[index]
    listener.close()
    yield out
    for path in ESCAPES:
        Path(path).unlink(missing_ok=True)


# Without guards the detached child's program prints the right output and exits 0, so its test
# passes (reward 1 is right); what matters there is that its child is killed: tested separately.
CONTAINED = [(n, g) for n in HOSTILE for g in (True, False) if (n, g) != ("detached_child", False)]


@pytest.mark.parametrize(("name", "guards"), CONTAINED, ids=[f"{n}-{'guards' if g else 'os'}" for n, g in CONTAINED])
def test_hostile_program_is_contained(hostile_results: dict[Any, Any], name: str, guards: bool) -> None:
    result: VerifyResult = hostile_results[name, guards]
    assert result.reward == 0.0 and not result.correct, result
    assert result.error is not None, result  # a recorded failure, not a wrong answer
    (test,) = result.details["tests"]
    assert test["seconds"] <= TIMEOUT + 1.0, test
    uid = result.details["uid"]
    assert processes_of(uid) == [], f"processes of the sandbox uid {uid} survived"
    expected = {
        "fork_bomb": {"timeout", "cpu_limit"},
        "detached_child": {"runtime_error"},
        "infinite_loop": {"timeout", "cpu_limit"},
        "sleeper": {"timeout"},
        "memory_bomb": {"memory_limit", "timeout"},  # starved of CPU by the fork bombs, the clock may win
        "huge_alloc": {"memory_limit"},
        "network": {"runtime_error"},
        "dns": {"runtime_error"},
        "write_outside": {"runtime_error"},
        "output_flood": {"output_limit", "timeout"},
    }[name]
    assert test["status"] in expected, test


def test_memory_limit_alone() -> None:
    v = CodeVerifier(timeout=5.0, memory_mb=256, python_guards=False)
    (result,) = run(v, [VerifySample("q", fenced(HOSTILE["memory_bomb"]), {"tests": [{"input": "", "output": "ok"}]})])
    assert result.details["tests"][0]["status"] == "memory_limit" and result.error is not None
    assert "MemoryError" in result.details["tests"][0]["detail"]


def test_detached_child_is_killed_but_program_passes(hostile_results: dict[Any, Any]) -> None:
    result = hostile_results["detached_child", False]
    assert result.details["tests"][0]["status"] == "passed" and result.reward == 1.0
    assert processes_of(result.details["uid"]) == []


def test_network_never_reached_the_host(hostile_results: dict[Any, Any]) -> None:
    assert hostile_results["connections"] == 0
    for guards in (True, False):
        detail = hostile_results["network", guards].details["tests"][0]["detail"]
        assert ("network access is disabled" if guards else "Network is unreachable") in detail, detail


def test_nothing_was_written_outside(hostile_results: dict[Any, Any]) -> None:
    for path in ESCAPES:
        assert not Path(path).exists(), path
    detail = hostile_results["write_outside", False].details["tests"][0]["detail"]
    assert "Permission denied" in detail or "Read-only file system" in detail, detail


def test_test_process_unharmed_and_no_strays(hostile_results: dict[Any, Any]) -> None:
    assert hostile_results["elapsed"] < 30, hostile_results["elapsed"]
    assert hostile_results["new_children"] == set()
    assert os.path.isdir(REPO / "src")  # still here, still ours

"""Hostile programs beyond the basic ones of test_verifier_code.py: forged assert results, host files
and sockets, memory held by many processes, leaks between tests, odd programs and bad references.

All hostile programs run in one concurrent batch (module fixture), mostly with the Python guards off,
so what holds is the OS-level sandbox. A stdio test's expected output is often "contained": the
program prints it only when its attack failed, so reward 1 there means the sandbox held.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsv4.core.interfaces import VerifyResult, VerifySample
from dsv4.rl.verifiers.code import CodeVerifier
from dsv4.rl.verifiers.sandbox import run_sandboxed
from dsv4.testing.net import CountingListener

ADD_ASSERTS = {"assert_tests": ["assert add(1, 2) == 3", "assert 5 == add(2, 3)", "assert add(2, 2) in (4, 40)"]}
ADD = "def add(a, b):\n    return a + b\n"
SECRET = "the-hidden-answer-4242"


def fenced(code: str) -> str:
    return f"```python\n{code}\n```\n"


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module", autouse=True)
def sandbox_available() -> None:
    report = asyncio.run(run_sandboxed("print(1)", [{"stdin": "", "stdout": "1"}]))
    if report.error is not None:
        pytest.skip(f"the sandbox cannot run here: {report.error}")


# --------------------------------------------------------------------------------------------------
# Assert tests: the result cannot be forged
# --------------------------------------------------------------------------------------------------
FORGERS = {
    # An object equal to everything.
    "always_equal": "class A:\n    def __eq__(self, other): return True\n    __hash__ = object.__hash__\n"
                    "def add(a, b):\n    return A()",
    # An int equal to everything.
    "int_always_equal": "class I(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n"
                        "def add(a, b):\n    return I(0)",
    # Skips the test: the runner then writes its "finished" nonce.
    "patched_exec": "import builtins\ndef add(a, b): return 0\nbuiltins.exec = lambda *args, **kwargs: None",
    "patched_compile": "import builtins\n_c = builtins.compile\ndef add(a, b): return 0\n"
                       "builtins.compile = lambda src, name, mode, *a, **k: _c('pass', name, mode)",
    # Reads the runner's nonce from its frame, writes it to the status file and leaves.
    "forged_nonce": "import sys, os\ndef add(a, b): return 0\nf = sys._getframe(1).f_locals\n"
                    "fd = int(f.get('status', f.get('status_fd')))\n"
                    "os.write(fd, f['nonce'])\nos._exit(0)",
    "forged_finish": "import sys, os\ndef add(a, b): return 0\nf = sys._getframe(1).f_locals\n"
                     "fd = int(f.get('status', f.get('status_fd')))\n"
                     "os.write(fd, b'end ' + f['nonce'] + b'\\n')\nos._exit(0)",
    "exit_in_function": "def add(a, b):\n    raise SystemExit(0)",
    "os_exit_in_function": "import os\ndef add(a, b):\n    os._exit(0)",
    "keyboard_interrupt": "def add(a, b):\n    raise KeyboardInterrupt",
    "base_exception": "class E(BaseException): pass\ndef add(a, b):\n    raise E()",
    "fake_marker": "import sys\ndef add(a, b): return 0\nprint('all tests passed')\nprint('end', file=sys.stderr)",
}
# Correct programs whose values are not plain builtins must still pass (and an in-process assert).
CORRECT_ASSERTS = {
    "plain": (ADD, ADD_ASSERTS),
    "int_enum": ("import enum\nclass N(enum.IntEnum):\n    THREE = 3\n    FIVE = 5\n    FOUR = 4\n"
                 "def add(a, b):\n    return N(a + b)", ADD_ASSERTS),
    "containers": ("import collections\nP = collections.namedtuple('P', 'x y')\ndef pair(): return P(1, 2)\n"
                   "def od(): return collections.OrderedDict(a=1)\ndef keys(): return {'a': 1}.keys()\n"
                   "def half(): return 0.5",
                   {"assert_tests": ["assert pair() == (1, 2)", "assert od() == {'a': 1}", "assert keys() == {'a'}",
                                     "assert half() == 0.5 and True", "assert abs(half() - 0.5) < 1e-9"]}),
    "item_scalar": ("class Int64:  # like numpy's: no int subclass, its value by .item()\n"
                    "    def __init__(self, v): self.v = v\n    def item(self): return self.v\n"
                    "    def __eq__(self, other): return self.v == other\n    __hash__ = None\n"
                    "def add(a, b):\n    return Int64(a + b)", ADD_ASSERTS),
    "check_function": (ADD, {"assert_tests": ["def check(candidate):\n    assert candidate(1, 2) == 3\n"
                                              "    assert candidate(0, 0) == 0\n\ncheck(add)"]}),
}


# --------------------------------------------------------------------------------------------------
# One concurrent batch of everything
# --------------------------------------------------------------------------------------------------
def host_programs(secret_file: str, sock_path: str) -> dict[str, tuple[str, dict[str, Any]]]:
    contained = {"tests": [{"input": "", "output": "contained"}]}
    return {
        # A data set on the host holding the answers: the program must not be able to read it.
        "read_host_file": (f"print(open({secret_file!r}).read().strip())",
                           {"tests": [{"input": "", "output": SECRET}]}),
        "list_host": ("import os\nseen = [p for p in ('/work', '/home', '/opt', '/mnt', '/srv', '/var', '/run', '/sys')"
                      " if os.path.exists(p)]\nprint('contained' if not seen else seen)", contained),
        "unix_socket": (f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect({sock_path!r})\n"
                        "print('connected')", {"tests": [{"input": "", "output": "connected"}]}),
        "environment": ("import os\nleaked = [k for k in os.environ if 'DSV4_SECRET' in k]\n"
                        "try:\n    leaked.append(open('/proc/1/environ').read())\nexcept OSError:\n    pass\n"
                        "print('contained' if not leaked else leaked)", contained),
        # Five processes of 100 MiB each, each under the 256 MiB per-process limit, 500 MiB together.
        "memory_in_many_processes": (
            "import os, time\nkids = []\nfor _ in range(5):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = bytearray(100 * 2**20)\n        for i in range(0, len(b), 4096): b[i] = 1\n"
            "        time.sleep(2)\n        os._exit(0)\n    kids.append(pid)\n"
            "for pid in kids: os.waitpid(pid, 0)\nprint('ok')", {"tests": [{"input": "", "output": "ok"}]}),
        # System V shared memory created (and detached) by one test must be gone for the next.
        "sysv_shm_leak": (
            "import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
            "if sys.stdin.read() == 'make':\n    for _ in range(3):\n"
            "        sid = libc.shmget(0, 32 << 20, 0o1600)\n        a = libc.shmat(sid, None, 0)\n"
            "        ctypes.memset(a, 1, 32 << 20)\n        libc.shmdt(ctypes.c_void_p(a))\n"
            "    print('made')\nelse:\n    rows = open('/proc/sysvipc/shm').read().splitlines()[1:]\n"
            "    print('contained' if not rows else f'{len(rows)} leaked')",
            {"tests": [{"input": "make", "output": "made"}, {"input": "check", "output": "contained"}]}),
        "many_files": ("import os\nn = 0\ntry:\n    while n < 50000:\n        open(f'f{n}', 'w').close()\n"
                       "        n += 1\nexcept OSError:\n    pass\nprint('contained' if n < 50000 else 'unbounded')", contained),
        # Then frees the disk again: the captured stdout lives on it too.
        "fill_disk": ("import os\nn = 0\ntry:\n    while n < 200:\n        with open(f'big{n}', 'wb') as f:\n"
                      "            f.write(b'x' * 2**20)\n        n += 1\nexcept OSError:\n    pass\n"
                      "for name in os.listdir('.'): os.remove(name)\n"
                      "print('contained' if n < 200 else 'unbounded')", contained),
        # kill(-1) reaches every process the caller may signal: only the program's own (none here).
        "kill_everything": ("import os, signal\nfor target in (os.getppid(), 1, -1):\n    try:\n"
                            "        os.kill(target, signal.SIGKILL)\n    except OSError:\n        pass\n"
                            "print('contained')", contained),
        "thread_bomb": ("import threading, time\nn = 0\ntry:\n    while n < 500:\n"
                        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
                        "        n += 1\nexcept RuntimeError:\n    pass\nprint('contained' if n < 500 else n, flush=True)\n"
                        "import os\nos._exit(0)", contained),
        "write_symlink": ("import os\nos.symlink('/usr/lib/escape_probe', 'link')\nopen('link', 'w').write('x')",
                          contained),
        "segfault": ("import ctypes\nctypes.string_at(0)", contained),
        # C recursion past the stack (the recursion limit lifted): a segfault.
        "deep_recursion": ("import sys\nsys.setrecursionlimit(10**7)\nx = []\nfor _ in range(10**6):\n    x = [x]\n"
                           "print(repr(x)[:10])", contained),
        "non_utf8_output": ("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x00 contained\\n')", contained),
        "syntax_error": ("def f(:\n    pass", contained),
        "prints_nothing": ("x = 1", {"tests": [{"input": "", "output": "3"}]}),
        "reads_stdin_twice": ("print(input())\nprint(input())", {"tests": [{"input": "one\n", "output": "one"}]}),
        "long_code": ("#" * 3_000_000 + "\nprint('contained')", contained),
    }


EXPECTED_STATUS = {
    "read_host_file": {"runtime_error"},
    "unix_socket": {"runtime_error"},
    "memory_in_many_processes": {"memory_limit"},
    "write_symlink": {"runtime_error"},
    "segfault": {"killed"},
    "deep_recursion": {"killed", "memory_limit", "runtime_error"},
    "non_utf8_output": {"wrong_answer"},
    "syntax_error": {"runtime_error"},
    "prints_nothing": {"wrong_answer"},
    "reads_stdin_twice": {"runtime_error"},
}
# The program prints "contained" when its attack failed: these pass.
CONTAINED_BY_OUTPUT = ("list_host", "environment", "sysv_shm_leak", "many_files", "fill_disk", "kill_everything",
                       "thread_bomb", "long_code")


@pytest.fixture(scope="module")
def batch() -> Iterator[dict[str, Any]]:
    # Outside /tmp (the old sandbox already hid /tmp) and readable by everyone, like a data set would be.
    host_dir = tempfile.mkdtemp(prefix="dsv4_escape_", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.chmod(host_dir, 0o755)
    secret_file = os.path.join(host_dir, "answers.txt")
    Path(secret_file).write_text(SECRET)
    os.chmod(secret_file, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    listener = CountingListener.unix(os.path.join(host_dir, "service.sock"))
    os.environ["DSV4_SECRET_API_KEY"] = "sk-do-not-leak"
    hosts = host_programs(secret_file, os.path.join(host_dir, "service.sock"))
    good = VerifySample("q", fenced("a, b = map(int, input().split())\nprint(a + b)"),
                        {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]})

    async def everything() -> tuple[list[VerifyResult], ...]:
        # Dozens of sandboxes at once on as few as two cores: a generous clock (no program here means to
        # run long; the limits under test are memory, processes, disk and files).
        kw: dict[str, Any] = {"timeout": 30.0, "memory_mb": 256, "max_processes": 8, "disk_mb": 16, "max_file_mb": 4}
        forgers = [VerifySample("q", fenced(code), ADD_ASSERTS) for code in FORGERS.values()]
        correct = [VerifySample("q", fenced(code), ref) for code, ref in CORRECT_ASSERTS.values()]
        host = [VerifySample("q", fenced(code), ref) for code, ref in hosts.values()]
        big = CodeVerifier(python_guards=False, disk_mb=1, timeout=3.0)  # the code alone fills the disk
        return await asyncio.gather(
            CodeVerifier(python_guards=False, max_workers=len(forgers), **kw).verify(forgers),
            CodeVerifier(python_guards=True, max_workers=len(forgers), **kw).verify(forgers),
            CodeVerifier(python_guards=False, max_workers=len(correct), **kw).verify(correct),
            CodeVerifier(python_guards=False, max_workers=len(host), **kw).verify(host),
            # Good samples run alongside all of the above and must not notice.
            CodeVerifier(max_workers=4, **kw).verify([good] * 4),
            big.verify([VerifySample("q", fenced("#" * (2 << 20) + "\nprint(3)"), {"tests": [{"input": "", "output": "3"}]})]),
        )

    try:
        bare, guarded, correct, host, good_results, big = asyncio.run(everything())
    finally:
        os.environ.pop("DSV4_SECRET_API_KEY", None)
        listener.close()
        shutil.rmtree(host_dir, ignore_errors=True)
    yield {
        "forged": {**{(n, False): r for n, r in zip(FORGERS, bare)}, **{(n, True): r for n, r in zip(FORGERS, guarded)}},
        "correct": dict(zip(CORRECT_ASSERTS, correct)),
        "host": dict(zip(hosts, host)),
        "good": good_results,
        "big": big[0],
        "connections": listener.accepted,
    }


FORGED = [(n, g) for n in FORGERS for g in (False, True)]


@pytest.mark.parametrize(("name", "guards"), FORGED, ids=[f"{n}-{'guards' if g else 'os'}" for n, g in FORGED])
def test_assert_results_cannot_be_forged(batch: dict[str, Any], name: str, guards: bool) -> None:
    result: VerifyResult = batch["forged"][name, guards]
    assert result.reward == 0.0 and not result.correct, result
    assert [t["status"] for t in result.details["tests"]] != ["passed"] * 3, result
    assert processes_of(result.details["uid"]) == []


@pytest.mark.parametrize("name", list(CORRECT_ASSERTS))
def test_correct_programs_still_pass_judged_asserts(batch: dict[str, Any], name: str) -> None:
    result: VerifyResult = batch["correct"][name]
    assert result.reward == 1.0 and result.correct and result.error is None, result


@pytest.mark.parametrize("name", list(EXPECTED_STATUS))
def test_hostile_or_broken_program_fails_cleanly(batch: dict[str, Any], name: str) -> None:
    result: VerifyResult = batch["host"][name]
    assert result.reward == 0.0 and not result.correct, result
    statuses = {t["status"] for t in result.details["tests"]}
    assert statuses <= EXPECTED_STATUS[name], result
    if statuses - {"wrong_answer"}:
        assert result.error is not None, result  # a crash is recorded, a wrong answer is not an error
    assert processes_of(result.details["uid"]) == []


@pytest.mark.parametrize("name", CONTAINED_BY_OUTPUT)
def test_attack_failed_inside_the_program(batch: dict[str, Any], name: str) -> None:
    result: VerifyResult = batch["host"][name]
    assert result.reward == 1.0, result  # the program printed "contained"
    assert processes_of(result.details["uid"]) == []


def test_host_socket_and_file_never_reached(batch: dict[str, Any]) -> None:
    assert batch["connections"] == 0
    detail = batch["host"]["read_host_file"].details["tests"][0]["detail"]
    assert "No such file or directory" in detail and SECRET not in detail, detail


def test_good_samples_unaffected_by_hostile_neighbours(batch: dict[str, Any]) -> None:
    assert [(r.reward, r.error) for r in batch["good"]] == [(1.0, None)] * 4


def test_code_larger_than_the_disk_is_a_recorded_failure(batch: dict[str, Any]) -> None:
    result: VerifyResult = batch["big"]
    assert result.reward == 0.0 and result.error is not None and "No space left" in result.error, result


# --------------------------------------------------------------------------------------------------
# References and interpreters
# --------------------------------------------------------------------------------------------------
def test_bad_assert_references_are_errors_not_rewards() -> None:
    v = CodeVerifier(timeout=3.0)
    refs = [{"assert_tests": [""]}, {"assert_tests": ["   \n"]}, {"assert_tests": ["assert add(1, 2) == "]},
            {"assert_tests": ["assert True\x00"]}, {"assert_tests": "assert True"}, {"tests": [None]},
            {"tests": [{"input": 1, "output": "3"}]}, {"tests": [], "assert_tests": []}]
    results = asyncio.run(v.verify([VerifySample("q", fenced(ADD), ref) for ref in refs]))
    for ref, result in zip(refs, results):
        assert result.reward == 0.0 and result.error is not None and result.error.startswith("reference"), (ref, result)
        assert "tests" not in result.details, result  # nothing ran
    assert "not valid Python" in (results[2].error or "")


def test_virtual_environment_interpreter_runs() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtual environment")
    venv_python = Path(sys.prefix) / "bin" / "python"
    v = CodeVerifier(timeout=5.0, python=str(venv_python))
    (result,) = asyncio.run(v.verify([VerifySample("q", fenced("import sys\nprint(sys.prefix)"),
                                                   {"tests": [{"input": "", "output": str(venv_python.parents[1])}]})]))
    assert result.reward == 1.0, result

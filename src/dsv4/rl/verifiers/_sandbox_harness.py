"""The sandbox harness: runs candidate Python code against tests under OS-level isolation.

:mod:`dsv4.rl.verifiers.sandbox` runs this file as a script (``python -I -B _sandbox_harness.py``) with a
JSON job on stdin; it writes one JSON report on stdout. Standard library only, and never imported by
dsv4 itself. Process tree (when run as root)::

    launcher       unshare(net, mount, pid, ipc), then fork
    └─ harness     pid 1 of the new pid namespace: private mounts, then for each test:
       └─ runner   ``python -I -c RUNNER`` as a fresh unprivileged uid, rlimits, its own session

What each isolation key of the report means (``require`` names keys that must hold before any
candidate code runs):

``user``     the runner runs as a per-run uid that owns nothing but its work directory, so it cannot
             write elsewhere, RLIMIT_NPROC counts only its own processes, and "kill every process of
             that uid" also finds processes that left the session (a fork bomb calling setsid)
``netns``    a new network namespace with no interface up: no connection (not even to the host's
             loopback) and no DNS
``mountns``  a private mount namespace and a new root holding, read-only, only the system
             directories (/usr, /lib...), a few /etc files, a few devices and the interpreter; an empty
             /tmp, a fresh /proc showing only the program's own processes, and the work directory's
             tmpfs (size- and inode-limited, gone with the namespace), the only writable place. No
             other file of the host (home directories, the data the tests come from) is visible
``pidns``    a new pid namespace: when the harness exits or is killed, the kernel kills what is left
``ipcns``    a new IPC namespace (no System V shared memory with the host)
``rlimits``  CPU time, address space, file size, process count, no core dumps (per test process)
``guards``   an audit hook in the runner refuses sockets, process creation, ctypes and writes outside
             the work directory: defence in depth only, never the only wall
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import re
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

# The runner: the only code that runs as the sandbox user. It reads a per-test nonce before the
# candidate code runs and writes it back only after the assert test finished, so a program that
# exits early (sys.exit(0), os._exit(0)) before the asserts ran does not pass. That nonce is in the
# program's own process, so a program that goes looking for it can forge it: the asserts that matter
# most (``assert E == literal``) are therefore judged by the harness instead (see _judged_outside),
# from values the runner reports (``__dsv4_value__``) on the status file.
RUNNER = r'''
import os, sys

def _guard(workdir):
    root = os.path.abspath(workdir) + os.sep
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    spawn = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
             "subprocess.Popen", "pty.spawn"}

    def hook(event, args):
        if event.startswith("socket."):
            raise PermissionError("network access is disabled in the sandbox")
        if event in spawn:
            raise PermissionError("starting processes is disabled in the sandbox")
        if event.startswith("ctypes."):
            raise PermissionError("ctypes is disabled in the sandbox")
        if event == "open" and len(args) >= 3 and isinstance(args[0], (str, bytes)):
            mode, flags = args[1], args[2]
            if (isinstance(flags, int) and flags & writing) or (isinstance(mode, str) and set(mode) & set("wax+")):
                path = os.path.abspath(os.fsdecode(args[0]))
                if not (path + os.sep).startswith(root) and path != "/dev/null":
                    raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")

    sys.addaudithook(hook)

def _plain(value, depth=0):
    # An exact builtin copy of ``value`` (a namedtuple becomes a tuple, an IntEnum an int, an
    # OrderedDict a dict, a dict's keys a set...) whose repr the harness reads back with literal_eval.
    if depth > 100:
        raise ValueError("nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    for base in (int, float, complex, str, bytes):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (set, frozenset, type({}.keys()), type({}.items()))):
        return {_plain(v, depth + 1) for v in value}
    item = getattr(type(value), "item", None)
    if callable(item):  # a numpy scalar (np.int64 is no int) or 0-d array: its Python value
        return _plain(item(value), depth + 1)
    raise TypeError(type(value).__name__)

def _main():
    mode, guard, workdir, solution, test, nonce_fd, status_fd = sys.argv[1:8]
    # Bound before the program runs: replacing builtins.exec or os.write must not skip the test.
    run, build, write, status = exec, compile, os.write, int(status_fd)
    nonce = os.read(int(nonce_fd), 64)
    os.close(int(nonce_fd))
    with open(solution, "rb") as f:
        source = f.read()
    test_source = None
    if test:
        with open(test, "rb") as f:
            test_source = f.read()
    sys.argv[:] = ["solution.py"]
    if guard == "1":
        _guard(workdir)
    scope = {"__name__": "__main__" if mode == "stdio" else "solution", "__builtins__": __builtins__}
    run(build(source, "solution.py", "exec"), scope)
    if test_source is not None:
        def report(k, value):
            try:
                text = repr(_plain(value))
            except Exception:
                text = "?" + type(value).__name__  # no plain value: not equal to any literal
            write(status, b"%d %s\n" % (k, text.encode("utf-8", "backslashreplace")))

        scope["__dsv4_value__"] = report
        run(build(test_source, "test.py", "exec"), scope)
    write(status, b"end " + nonce + b"\n")

_main()
'''


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def _prctl(option: int, value: int) -> None:
    _libc.prctl(option, value, 0, 0, 0)


def _emit(report: dict[str, Any]) -> None:
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(1, data) :]


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def main() -> int:
    """Read the job, enter new namespaces, fork the harness (pid 1 there) and wait for it.

    ``--sweep UID`` instead kills every process of ``UID`` (the verifier's clean-up after a failed run).
    """
    if sys.argv[1:2] == ["--sweep"]:
        _sweep(int(sys.argv[2]), pidns=False)
        return 0
    job = json.loads(sys.stdin.buffer.read())
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the verifier died: nothing of ours may outlive it
    iso = {k: False for k in ("user", "netns", "mountns", "pidns", "ipcns", "rlimits", "guards")}
    if os.geteuid() == 0:
        flags = {"netns": CLONE_NEWNET, "mountns": CLONE_NEWNS, "pidns": CLONE_NEWPID, "ipcns": CLONE_NEWIPC}
        if _libc.unshare(sum(flags.values())) == 0:
            iso.update(dict.fromkeys(flags, True))
        else:  # some kernels or containers allow only some namespaces: take what is there
            for key, flag in flags.items():
                iso[key] = _libc.unshare(flag) == 0
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            report = harness(job, iso)
            code = 0
        except BaseException as exc:  # noqa: BLE001  (report anything, then leave)
            report = {"isolation": iso, "tests": [], "error": f"sandbox harness failed: {type(exc).__name__}: {exc}"}
        _emit(report)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return 0 if os.waitstatus_to_exitcode(status) == 0 else 1


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------
def harness(job: dict[str, Any], iso: dict[str, bool]) -> dict[str, Any]:
    """Set up the filesystem, check the required isolation, run the tests; the report."""
    base: str = job["base"]
    uid: int | None = job["uid"] if os.geteuid() == 0 else None
    if uid is not None:
        if _uid_in_use(uid):
            raise RuntimeError(f"uid {uid} is already in use")
        iso["user"] = True
    if iso["mountns"]:
        try:
            _mount(None, "/", None, MS_REC | MS_PRIVATE)  # first: nothing we mount may reach the host
        except OSError:
            iso["mountns"] = False  # nothing was changed yet: carry on without a private filesystem
        else:
            _private_filesystem(base, job["expose"], job["limits"]["disk_mb"])
    if iso["ipcns"]:
        # System V shared memory outlives its processes and is in nobody's resident memory: in this
        # namespace a segment goes when its last process detaches (the memory watch sees it until then).
        with open("/proc/sys/kernel/shm_rmid_forced", "w") as f:
            f.write("1")
    dirs = _prepare_dirs(base, uid)
    iso["rlimits"] = True
    iso["guards"] = bool(job["guards"])
    missing = [key for key in job["require"] if not iso.get(key)]
    if missing:
        return {"isolation": iso, "tests": [], "error": f"sandbox lacks required isolation: {', '.join(missing)}"
                " (this machine cannot provide it; drop it from `require` to run anyway)"}
    solution = os.path.join(dirs["code"], "solution.py")
    _write(solution, job["code"], 0o644)
    results = []
    for test in job["tests"]:
        result = _run_test(test, solution, job, dirs, uid, iso)
        results.append(result)
        if job["stop_on_failure"] and result["status"] != "passed":
            break
    return {"isolation": iso, "tests": results, "error": None}


def _uid_in_use(uid: int) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if str(uid) in line.split()[1:]:
                                return True
                            break
            except OSError:
                continue
    return False


def _mount_points() -> list[tuple[str, str]]:
    """(mount point, per-mount options) of every mount, in mount order."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            points.append((path, fields[5]))
    return points


_FLAG_NAMES = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}


# The new root holds only what an interpreter needs: the system's programs and libraries, the few /etc
# files the dynamic loader and the C library read, and a few devices. Everything else of the host (home
# directories, /work, /opt, /mnt, data sets holding the tests' answers, host sockets) is not there.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf", "hosts")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"))
#: Files (inodes) the work tmpfs may hold: creating millions of empty files would cost kernel memory
#: that no size limit counts.
_MAX_INODES = 16384


def _private_filesystem(base: str, expose: list[str], disk_mb: int) -> None:
    """Change root to a new tree: read-only bind mounts of the system directories and of the interpreter
    (``expose``) only, an empty read-only /tmp, a few devices, a fresh /proc, and at ``base`` a
    size-limited tmpfs, the only writable place. The tree is built on a tmpfs mounted over ``base`` (an
    empty directory of ours), moved onto / and entered with chroot (as with pivot_root, the old root is
    then under the new one, out of every path's reach)."""
    root = base
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in ("/tmp", "/proc", "/dev", base):
        os.makedirs(root + path, 0o755, exist_ok=True)
    bound: list[str] = []
    for path in (*_SYSTEM_DIRS, *(f"/etc/{n}" for n in _ETC_FILES), *(f"/dev/{n}" for n in _DEVICES)):
        if os.path.islink(path):  # e.g. /bin -> usr/bin on a merged /usr: the same link
            os.makedirs(os.path.dirname(root + path), 0o755, exist_ok=True)
            os.symlink(os.readlink(path), root + path)
        elif os.path.exists(path):
            _bind(path, root + path)
            bound.append(path)
    for path in expose:
        path = os.path.abspath(path)
        # Never the whole host; nothing already there (making its directories would write to the host).
        if path != "/" and os.path.isdir(path) and not any(path == b or path.startswith(b + "/") for b in bound):
            _bind(path, root + path)
            bound.append(path)
    for name, target in _DEV_LINKS:
        os.symlink(target, f"{root}/dev/{name}")
    _mount("tmpfs", root + base, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={int(disk_mb)}m,nr_inodes={_MAX_INODES},mode=0755")
    # Read-only: every mount of the new tree (the tree's own tmpfs, and mounts below a bound directory)
    # but the work tmpfs.
    for path, options in _mount_points():
        if path == root or (path.startswith(root + "/") and path != root + base):
            _remount_read_only(path, options)
    os.chdir(root)
    _mount(root, "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    # hidepid=2: the program sees its own processes only (not the harness, pid 1).
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    except OSError:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _bind(source: str, target: str) -> None:
    """Bind-mount ``source`` read-only at ``target`` (created: a directory, or an empty file)."""
    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
    if os.path.isdir(source):
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        with open(target, "ab"):
            pass
    _mount(source, target, None, MS_BIND | MS_REC)
    # At once, not at the end: nothing made later below ``target`` may land on the host's filesystem.
    _remount_read_only(target, next((o for p, o in reversed(_mount_points()) if p == target), ""))


def _remount_read_only(path: str, options: str) -> None:
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY  # MS_BIND: this mount only, never the filesystem itself
    for name in options.split(","):
        flags |= _FLAG_NAMES.get(name, 0)
    _check(_libc.mount(None, _b(path), None, flags, None), f"remount {path} read-only")


def _prepare_dirs(base: str, uid: int | None) -> dict[str, str]:
    os.chmod(base, 0o755)
    dirs = {"work": os.path.join(base, "work"), "io": os.path.join(base, "io"), "code": os.path.join(base, "code")}
    for name, mode in (("work", 0o700), ("io", 0o700), ("code", 0o755)):
        os.makedirs(dirs[name], exist_ok=True)
        os.chmod(dirs[name], mode)
    if uid is not None:
        os.chown(dirs["work"], uid, uid)
    return dirs


def _write(path: str, text: str, mode: int) -> None:
    with open(path, "wb") as f:
        f.write(text.encode("utf-8", "surrogatepass"))
    os.chmod(path, mode)


# --------------------------------------------------------------------------------------------------
# One test
# --------------------------------------------------------------------------------------------------
def _set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)  # lowering needs no privilege; raising would fail
    resource.setrlimit(which, (value, value))


def _drop_privileges(uid: int | None, limits: dict[str, Any], nproc: int) -> None:
    """Runs in the test process between fork and exec (the harness is single-threaded)."""
    cpu = int(limits["cpu"])
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    # Soft limit: SIGXCPU; the hard limit one second later is SIGKILL for a program that catches it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1 if hard == resource.RLIM_INFINITY else min(cpu + 1, hard)))
    _set_limit(resource.RLIMIT_AS, int(limits["memory_mb"]) << 20)
    _set_limit(resource.RLIMIT_FSIZE, int(limits["file_mb"]) << 20)
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_NOFILE, 256)
    _set_limit(resource.RLIMIT_NPROC, nproc)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can hand privileges back
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _own_processes() -> int:
    uid = str(os.getuid())
    count = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                count += any(line.startswith("Uid:") and line.split()[1] == uid for line in f)
        except OSError:
            continue
    return count


def _wait(proc: subprocess.Popen[bytes], timeout: float, uid: int | None, memory: int) -> str | None:
    """Wait for ``proc`` to exit within ``timeout``: None, or why it is still running: ``"timeout"``,
    or ``"memory"`` once the processes of ``uid`` together hold more than ``memory`` bytes (RLIMIT_AS
    bounds each process alone: a program that forks could hold ``max_processes`` times as much)."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            # A pidfd is readable once the process exited; with no uid to watch, one wait does.
            left = deadline - time.monotonic()
            step = max(0.0, min(left, 0.02) if uid is not None else left)
            if fd is not None:
                if select.select([fd], [], [], step)[0]:
                    return None
            else:
                try:
                    proc.wait(step)
                    return None
                except subprocess.TimeoutExpired:
                    pass
            if time.monotonic() >= deadline:
                return "timeout"
            if uid is not None and _resident(uid) > memory:
                return "memory"
    finally:
        if fd is not None:
            os.close(fd)


def _resident(uid: int) -> int:
    """Bytes resident in the processes of ``uid`` (pages they share count once per process)."""
    pages = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    with open(f"/proc/{pid}/statm") as f:
                        pages += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return pages * os.sysconf("SC_PAGE_SIZE")


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _sweep(uid: int, pidns: bool) -> None:
    """Kill every process of ``uid``: a forked helper becomes ``uid`` and calls kill(-1, SIGKILL), which
    reaches exactly that user's processes, until none is left."""
    for _ in range(1000):
        if pidns:
            _reap()  # orphans are ours to reap; zombies would still count as processes
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                code = 3  # nothing left to kill
            except BaseException:  # noqa: BLE001
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            break
        time.sleep(0.002)
    if pidns:
        _reap()


_RUNNER_FRAME = re.compile(r'^  File "<string>", line \d+, in (?:<module>|_main|report)\n', re.MULTILINE)


def _tail(data: bytes, limit: int = 600) -> str:
    # The runner's own frames say nothing about the candidate's code: leave them out.
    text = _RUNNER_FRAME.sub("", data.decode("utf-8", "replace")).strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _judged_outside(source: str) -> tuple[str, list[tuple[str, Any]]]:
    """``source`` with each ``assert E == L`` / ``assert L == E`` / ``assert E in L`` (``L`` a literal)
    replaced by ``__dsv4_value__(k, E)``, and the comparisons (``("==" or "in", L)``). The program only
    reports E's value; the harness compares it with L, which never enters the sandbox, so no program
    passes such an assert without computing the value: an object whose ``__eq__`` is always true,
    patched builtins, a forged status file or nonce, os._exit before the asserts, none of these helps.
    Other asserts still run inside the program's process, where a program that takes its own
    interpreter apart could fake them."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return source, []  # run as it is: the runner reports the error
    expected: list[tuple[str, Any]] = []

    class Split(ast.NodeTransformer):
        def visit_Assert(self, node: ast.Assert) -> ast.AST:
            test = node.test
            if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq | ast.In)):
                return node
            op = "==" if isinstance(test.ops[0], ast.Eq) else "in"
            sides = [(test.left, test.comparators[0])] + ([(test.comparators[0], test.left)] if op == "==" else [])
            for expr, literal in sides:
                try:
                    value = ast.literal_eval(literal)
                except Exception:  # noqa: BLE001  (not a literal)
                    continue
                call = ast.Call(ast.Name("__dsv4_value__", ast.Load()), [ast.Constant(len(expected)), expr], [])
                expected.append((op, value))
                return ast.copy_location(ast.Expr(call), node)
            return node

    try:
        split = ast.unparse(ast.fix_missing_locations(Split().visit(tree)))
    except (ValueError, MemoryError, RecursionError):
        return source, []
    return (split, expected) if expected else (source, [])


def _compare(status: bytes, expected: list[tuple[str, Any]]) -> tuple[str, str] | None:
    """Whether the values the program reported (lines ``k repr``) match ``expected``: None, or
    ``("wrong", why)`` when one does not, ``("missing", why)`` when an assert never reported."""
    seen = set()
    for line in status.split(b"\n"):
        number, _, text = line.partition(b" ")
        if not line or number == b"end":
            continue
        k = int(number) if number.isdigit() and len(number) < 9 else -1
        if not 0 <= k < len(expected):
            return "wrong", f"unexpected report {line[:80]!r}"
        if text.startswith(b"?"):
            return "wrong", f"assert {k}: returned a {text[1:80].decode(errors='replace')}, not a plain value"
        try:
            value = ast.literal_eval(text.decode())
        except Exception:  # noqa: BLE001  (not a literal: forged, or inf / nan)
            return "wrong", f"assert {k}: got {text[:200].decode(errors='replace')}"
        op, literal = expected[k]
        try:  # plain values only: nothing of the program's takes part
            right = value == literal if op == "==" else value in literal
        except TypeError:  # e.g. an unhashable value `in` a set
            right = False
        if not right:
            return "wrong", f"assert {k}: got {text[:200].decode(errors='replace')}"
        seen.add(k)
    missing = [k for k in range(len(expected)) if k not in seen]
    return ("missing", f"assert {missing[0]} never ran") if missing else None


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").rstrip().split("\n"))


def _run_test(
    test: dict[str, str],
    solution: str,
    job: dict[str, Any],
    dirs: dict[str, str],
    uid: int | None,
    iso: dict[str, bool],
) -> dict[str, Any]:
    limits = job["limits"]
    work, io = dirs["work"], dirs["io"]
    # A fresh work directory per test: nothing one test leaves behind is seen by the next.
    shutil.rmtree(work, ignore_errors=True)
    os.mkdir(work, 0o700)
    if uid is not None:
        os.chown(work, uid, uid)
    mode = "assert" if "assert" in test else "stdio"
    test_path = ""
    expected: list[tuple[str, Any]] = []  # the comparisons of the asserts judged here
    if mode == "assert":
        test_path = os.path.join(dirs["code"], "test.py")  # written now: later tests stay unseen
        source, expected = _judged_outside(test["assert"])
        _write(test_path, source, 0o644)
    paths = {name: os.path.join(io, name) for name in ("stdin", "stdout", "stderr", "status")}
    _write(paths["stdin"], test.get("stdin", ""), 0o600)
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    status_fd = os.open(paths["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    nproc = int(limits["processes"]) + (0 if uid is not None else _own_processes())
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [job["python"], "-I", "-B", "-X", "utf8", "-c", RUNNER, mode, "1" if job["guards"] else "0", work,
            solution, test_path, str(nonce_r), str(status_fd)]
    start = time.monotonic()
    try:
        with (
            open(paths["stdin"], "rb") as fin,
            open(paths["stdout"], "wb") as fout,
            open(paths["stderr"], "wb") as ferr,
        ):
            proc = subprocess.Popen(
                argv, stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env, close_fds=True,
                pass_fds=(nonce_r, status_fd), start_new_session=True,
                preexec_fn=lambda: _drop_privileges(uid, limits, nproc),
            )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"status": "sandbox_error", "seconds": 0.0, "detail": f"could not start the test: {exc}"}
    finally:
        os.close(nonce_r)
        os.close(status_fd)
    stopped = _wait(proc, float(limits["timeout"]), uid, int(limits["memory_mb"]) << 20)
    seconds = round(time.monotonic() - start, 4)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the program left running in its session
    except OSError:
        pass
    proc.kill()
    rc = proc.wait()
    if uid is not None:
        _sweep(uid, iso["pidns"])  # and whatever left the session
    with open(paths["stdout"], "rb") as f:
        out = f.read((int(limits["file_mb"]) << 20) + 1)
    with open(paths["stderr"], "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 4000))
        err = f.read()
    # Reported values: as long as the literals they are compared with, and then some.
    cap = (1 << 20) + 4 * len(test.get("assert", ""))
    with open(paths["status"], "rb") as f:
        status_data = f.read(cap + 1)
    completed = status_data.endswith(b"end " + nonce + b"\n")  # the test ran to its end
    mismatch = _compare(status_data, expected) if expected and len(status_data) <= cap else None
    if expected and len(status_data) > cap:
        mismatch = "wrong", f"reported more than {cap} bytes of values"
    if test_path:
        os.remove(test_path)
    if stopped == "timeout":
        return {"status": "timeout", "seconds": seconds, "detail": f"still running after {limits['timeout']}s"}
    if stopped == "memory":
        return {"status": "memory_limit", "seconds": seconds,
                "detail": f"its processes together used more than {limits['memory_mb']} MiB"}
    if rc < 0:
        status = {int(signal.SIGXCPU): "cpu_limit", int(signal.SIGXFSZ): "output_limit"}.get(-rc, "killed")
        return {"status": status, "seconds": seconds, "detail": f"killed by {signal.strsignal(-rc) or -rc}"}
    if rc != 0:
        # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE surfaces as an EFBIG traceback.
        detail = _tail(err)
        if mode == "assert" and detail.rsplit("\n", 1)[-1].startswith("AssertionError"):
            return {"status": "wrong_answer", "seconds": seconds, "detail": detail}  # a failed assert: an answer
        if mismatch is not None and mismatch[0] == "wrong":  # a wrong value came first
            return {"status": "wrong_answer", "seconds": seconds, "detail": mismatch[1]}
        status = "runtime_error"
        if b"MemoryError" in err:
            status = "memory_limit"
        elif b"File too large" in err:
            status = "output_limit"
        return {"status": status, "seconds": seconds, "detail": detail}
    if mode == "assert":
        if not completed:
            return {"status": "exited_early", "seconds": seconds, "detail": "exited before the test finished"}
        if mismatch is not None:  # wrong, or never ran (the test's run was skipped: a forged finish)
            return {"status": "wrong_answer", "seconds": seconds, "detail": mismatch[1]}
        return {"status": "passed", "seconds": seconds, "detail": ""}
    got = out.decode("utf-8", "replace")
    if _normalize(got) == _normalize(test["stdout"]):
        return {"status": "passed", "seconds": seconds, "detail": ""}
    return {"status": "wrong_answer", "seconds": seconds, "detail": f"output: {_tail(out, 200)!r}"}


if __name__ == "__main__":
    sys.exit(main())

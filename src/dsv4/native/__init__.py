"""dsv4's fused CPU kernels: C compiled on first use with the system compiler, called through ctypes.

A CPU decode step in eager PyTorch is mostly dispatch and memory traffic of small ops: the mHC
Sinkhorn loop alone is ~120 tiny kernels per sublayer, decode attention copies every window row and
entry it reads into a gathered tensor before two small batched products, and each expert of a decode
step pays two small BLAS calls and a SwiGLU of several ops. The kernels in ``dsv4_cpu.c`` do such
work in one call each (:mod:`dsv4.native.kernels` wraps them): mHC pre/post, RMSNorm, RoPE, sink
attention and the lightning indexer's top-k that read rows straight from the KV pool by slot, block compression,
the MoE router and routed experts, the pool's slot lookup. They serve inference only (no autograd,
not batch-invariant), float32 on the CPU; every caller keeps its PyTorch path, which is the
reference the kernels are tested against. The exception is the Sinkhorn loop of training
(forward and backward): those two kernels repeat PyTorch's arithmetic bit for bit, so they serve
autograd and batch-invariant mode too (:func:`dsv4.kernels.mhc.sinkhorn`).

Building: the first :func:`library` call compiles ``dsv4_cpu.c`` (about half a second) into
``$DSV4_CACHE_DIR`` (default ``~/.cache/dsv4``)``/native/`` (a per-user temporary directory if that
is not writable), keyed by the source, the flags, the compiler and this CPU, so a cached build is
never loaded on a machine it was not made for. The compiler is ``$CC`` or ``cc``/``gcc``/``clang``
on the ``PATH``; the fastest flag set that builds is used (without OpenMP, e.g. Apple's clang, the
kernels run on one thread). If none works, or ``DSV4_NATIVE=0``, :func:`library` returns ``None``
(with the reason in :func:`unavailable_reason`) and every caller takes its PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

from loguru import logger

__all__ = ["ABI", "available", "cache_dir", "library", "unavailable_reason"]

ABI = 4  # must equal DSV4_NATIVE_ABI in dsv4_cpu.c
# Tried in order: the fastest build first; -march=native or -fopenmp may be unsupported
# (e.g. Apple's clang has no OpenMP: the kernels then run on one thread).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_COMMON = ["-std=gnu11", "-shared", "-fPIC", "-fno-math-errno"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$DSV4_CACHE_DIR/native`` or ``~/.cache/dsv4/native``."""
    root = os.environ.get("DSV4_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dsv4"
    )
    return Path(root) / "native"


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; ``None`` if disabled or it cannot be built."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib, reason = _load()
            _state["lib"], _state["reason"] = lib, reason
            if reason is not None and os.environ.get("DSV4_NATIVE", "1") != "0":
                logger.warning("dsv4 native CPU kernels unavailable ({}); using the PyTorch paths", reason)
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the native kernels are usable in this process."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (``None`` if it did not)."""
    library()
    return _state.get("reason")  # type: ignore[return-value]


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("DSV4_NATIVE", "1") == "0":
        return None, "disabled by DSV4_NATIVE=0"
    import torch  # noqa: F401  (torch's OpenMP runtime must be loaded first: the kernels share it)

    source = resources.files(__package__).joinpath("dsv4_cpu.c").read_bytes()
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found ($CC, cc, gcc or clang)"
    errors = []
    for flags in _FLAG_SETS:
        try:
            path = _build(compiler, flags, source)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
            continue
        if lib.dsv4_native_abi() != ABI:
            return None, f"{path} has ABI {lib.dsv4_native_abi()}, expected {ABI}"
        _declare(lib)
        return lib, None
    return None, f"{compiler} failed: " + "; ".join(errors)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _machine_key(compiler: str) -> bytes:
    """What a build depends on besides the source: compiler version, architecture, CPU features."""
    parts = [platform.machine(), platform.system()]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        parts.append(version.splitlines()[0] if version else "")
    except (OSError, subprocess.SubprocessError):
        parts.append("?")
    try:  # -march=native builds use this CPU's instructions
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            parts += sorted({line for line in f if line.startswith(("flags", "Features", "model name"))})
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts).encode()


def _build(compiler: str, flags: list[str], source: bytes) -> Path:
    key = hashlib.sha256(source + repr(flags + _COMMON).encode() + _machine_key(compiler)).hexdigest()[:20]
    name = f"dsv4_cpu-{key}.so"
    # A read-only home (some containers) must not cost the kernels: fall back to a per-user temp dir.
    fallback = Path(tempfile.gettempdir()) / f"dsv4-native-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    for out_dir in (cache_dir(), fallback):
        if (out_dir / name).exists():
            return out_dir / name
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(out_dir, os.W_OK):
            break
    else:
        raise OSError(f"no writable directory for the build ({cache_dir()}, {fallback})")
    target = out_dir / name
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = Path(tmp) / "dsv4_cpu.c"
        src.write_bytes(source)
        built = Path(tmp) / "dsv4_cpu.so"
        proc = subprocess.run(
            [compiler, *flags, *_COMMON, "-o", str(built), str(src), "-lm"],
            capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            raise subprocess.SubprocessError(proc.stderr or f"exit code {proc.returncode}")
        os.replace(built, target)  # atomic: a concurrent build or a reader sees a whole file or none
    return target


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int32
    lib.dsv4_native_abi.restype = ctypes.c_int
    # Kernels that index storage by caller-provided ids return a status (0: fine, else an id was out
    # of range and nothing out of bounds was read); the others return nothing.
    signatures: dict[str, tuple[list[type], type | None]] = {
        "dsv4_sink_attention": ([i64, i64, i64, ptr, f32, ptr, ptr, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, ptr],
                                i64),
        "dsv4_hc_pre": ([i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr, f32, f32, i64, ptr, ptr, ptr], None),
        "dsv4_hc_post": ([i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr], None),
        "dsv4_sinkhorn": ([i64, i64, i64, f32, ptr, ptr, ptr], None),
        "dsv4_sinkhorn_backward": ([i64, i64, i64, f32, ptr, ptr, ptr, ptr], None),
        "dsv4_rms_norm": ([i64, i64, ptr, i64, ptr, f32, ptr], None),
        "dsv4_moe_experts": ([i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, f32, ptr], i64),
        "dsv4_moe_gate": ([i64, i64, i64, ptr, ptr, ptr, i32, i64, ptr, f32, ptr, ptr], i64),
        "dsv4_rope": ([i64, i64, i64, i64, ptr, ptr, i32, ptr], None),
        "dsv4_compress": ([i64, i64, i64, i32, ptr, i64, ptr, ptr, ptr, ptr, f32, ptr, i64, ptr], i64),
        "dsv4_indexer_topk": ([i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, ptr, i64, i64, f32, ptr, ptr],
                              i64),
        "dsv4_slots": ([i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, ptr], None),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result

"""benchmarks/bench_kernels.py: skips with its reason where nothing can be timed; every case it would
time runs (at tiny sizes, under the interpreter)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dsv4_triton.device import INTERPRET_ENV

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_kernels.py"


def _bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_skips_with_a_reason(interpret: str) -> None:
    if interpret == "0" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the benchmark would run")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, INTERPRET_ENV: interpret})
    assert done.returncode == 0, done.stderr
    reason = "the interpreter's timings mean nothing" if interpret == "1" else "no CUDA GPU"
    assert done.stdout.startswith("bench_kernels: skipped: ") and reason in done.stdout


def test_every_case_runs_at_tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench(monkeypatch)
    dims = bench.Dims(hidden=32, streams=2, heads=2, head_dim=32, rope_dim=8, q_lora=16, experts=4, top_k=2,
                      inter=16, window=4, entries=4, index_heads=2, index_dim=16, vocab=50, sinkhorn_iters=3)
    cases = bench.cases(5, dims, torch.device("cpu"), torch.float32)
    assert len(cases) == 12
    for case in cases:
        case.run()
        assert case.bytes > 0 and case.flops > 0, case.name

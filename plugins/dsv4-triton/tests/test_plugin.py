"""Discovery, registration and refusals: the plugin as dsv4 sees it once installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dsv4.core.config import ModelConfig
from dsv4.core.plugins import get_registry
from dsv4_triton.attention import TritonAttentionBackend
from dsv4_triton.device import INTERPRET_ENV, interpreted
from dsv4_triton.experts import TritonExpertExecutor
from dsv4_triton.kernel_set import TritonKernels

CLASSES = {"kernel_set": TritonKernels, "expert_executor": TritonExpertExecutor,
           "attention_backend": TritonAttentionBackend}


def _python(*args: str, **env: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **env},
                          check=True, timeout=120)
    return done.stdout


def test_importing_the_plugin_imports_neither_torch_nor_triton() -> None:
    code = "import sys, dsv4_triton; print(sorted({'torch', 'triton'} & set(sys.modules)))"
    assert _python("-c", code) == "[]\n"


def test_dsv4_plugins_lists_it() -> None:
    listed = {p["name"]: p for p in json.loads(_python("-m", "dsv4.cli", "plugins", "--json"))}
    assert listed["triton"]["distribution"] == "dsv4-triton"
    assert listed["triton"]["provides"] == {kind: ["triton"] for kind in CLASSES}


@pytest.mark.parametrize("kind", CLASSES)
def test_registered(kind: str) -> None:
    assert get_registry().get(kind, "triton") is CLASSES[kind]


def _refusals(device: str) -> list[str | None]:
    cfg, dev = ModelConfig.tiny(), torch.device(device)
    return [TritonKernels.refuse(cfg, dev, "inference"), TritonExpertExecutor.refuse(cfg, dev),
            TritonAttentionBackend.refuse(cfg, dev)]


def test_serves_cuda_and_refuses_the_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INTERPRET_ENV)
    assert _refusals("cuda") == [None, None, None]
    for reason in _refusals("cpu"):
        assert reason is not None and "CUDA" in reason and f"{INTERPRET_ENV}=1" in reason
    monkeypatch.setenv(INTERPRET_ENV, "1")
    assert _refusals("cpu") == [None, None, None]
    assert all(reason is not None for reason in _refusals("meta"))


def test_the_kernel_set_computes_inference_steps_only() -> None:
    cfg, cpu = ModelConfig.tiny(), torch.device("cpu")
    assert "does not compute 'autograd' steps" in (TritonKernels.refuse(cfg, cpu, "autograd") or "")
    assert "does not compute 'batch_invariant' steps" in (TritonKernels.refuse(cfg, cpu, "batch_invariant") or "")


@pytest.mark.parametrize("value", ["1", "true", "On", "YES", "0", "", "2", " 1"])
def test_reads_the_switch_as_triton_does(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from triton._C.libtriton import getenv_bool  # Triton's own reader of its switches

    monkeypatch.setenv(INTERPRET_ENV, value)
    assert interpreted() == getenv_bool(INTERPRET_ENV, False)

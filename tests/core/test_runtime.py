"""Allocator tuning: applied once on Linux/glibc, and switchable off by the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dsv4
from dsv4.core.runtime import tune_allocator

_PROBE = "from dsv4.core.runtime import tune_allocator; print(tune_allocator(), tune_allocator())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuning_applies_once_on_linux() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    assert dsv4.tune_allocator is tune_allocator


def test_tuning_can_be_switched_off() -> None:
    env = {**os.environ, "DSV4_MALLOC_TUNING": "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "False"]

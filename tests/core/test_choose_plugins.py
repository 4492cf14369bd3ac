"""``choose_plugins``: the one place "auto" is decided, for every plugin kind and step mode."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from dsv4.core.config import ModelConfig
from dsv4.core.hookspecs import hookimpl
from dsv4.core.plugins import PluginChoice, PluginError, build_registry, choose_plugins
from dsv4.kernels import ReferenceKernels
from dsv4.native import available

CPU = torch.device("cpu")
CFG = ModelConfig.tiny()
needs_native = pytest.mark.skipif(not available(), reason="no C compiler: the native plugins refuse")


@needs_native
def test_auto_takes_the_native_plugins_for_inference_only() -> None:
    choice = choose_plugins(CFG, CPU)
    assert (choice.attention_backend, choice.expert_executor) == ("cpu", "cpu")
    assert dict(choice.kernels) == {"autograd": "reference", "inference": "cpu", "batch_invariant": "batch_invariant"}


@needs_native
def test_auto_without_native_kernels_or_in_batch_invariant_mode() -> None:
    plain = choose_plugins(CFG, CPU, native_kernels=False)
    assert (plain.attention_backend, plain.expert_executor, plain.kernels["inference"]) == (
        "reference", "grouped", "cpu")  # MKL-packed linears are still the cpu kernel set's
    neither = choose_plugins(CFG, CPU, native_kernels=False, packed_weights=False)
    assert neither.kernels["inference"] == "reference"
    exact = choose_plugins(CFG, CPU, batch_invariant=True)
    assert (exact.attention_backend, exact.expert_executor) == ("reference", "reference")


def test_off_the_cpu_auto_falls_back_to_pytorch() -> None:
    meta = choose_plugins(CFG, torch.device("meta"))
    assert (meta.attention_backend, meta.expert_executor) == ("reference", "grouped")
    assert dict(meta.kernels) == {"autograd": "reference", "inference": "reference",
                                  "batch_invariant": "batch_invariant"}


def test_a_named_kernel_set_computes_the_modes_it_declares() -> None:
    assert dict(choose_plugins(CFG, CPU, kernels="reference").kernels) == {
        "autograd": "reference", "inference": "reference", "batch_invariant": "batch_invariant"}
    with pytest.raises(PluginError, match="kernel_set 'cpu' cannot serve.*CPU only"):
        choose_plugins(CFG, torch.device("meta"), kernels="cpu")
    with pytest.raises(PluginError, match="unknown kernel_set 'nope'.*available: 'reference'"):
        choose_plugins(CFG, CPU, kernels="nope")
    with pytest.raises(PluginError, match="attention_backend 'cpu' cannot serve"):
        choose_plugins(CFG, torch.device("meta"), attention_backend="cpu")


class _Kernels(ReferenceKernels):
    name: ClassVar[str] = "third-party"
    capabilities: ClassVar[frozenset[str]] = frozenset({"inference"})


class _Plugin:
    @hookimpl
    def register_kernel_sets(self) -> list[type[Any]]:
        return [_Kernels]


def test_a_passed_in_model_keeps_third_party_plugins_under_auto() -> None:
    registry = build_registry([_Plugin()], load_entry_points=False)
    held = PluginChoice("reference", "reference",
                        {"autograd": "reference", "inference": "third-party", "batch_invariant": "batch_invariant"})
    choice = choose_plugins(CFG, CPU, current=held, registry=registry, native_kernels=False, packed_weights=False)
    assert choice.kernels["inference"] == "third-party"  # kept
    assert choice.expert_executor == "grouped"  # a built-in PyTorch one: swapped for the auto choice
    named = choose_plugins(CFG, CPU, kernels="reference", current=held, registry=registry)
    assert named.kernels["inference"] == "reference"  # a named choice replaces it


def test_the_model_package_has_no_backend_device_or_mode_branch() -> None:
    """Such choices live in the plugins behind the seams (issue: model code reads like the reference)."""
    from pathlib import Path

    import dsv4.model

    banned = ("is_grad_enabled", "inference_mode", "dsv4.native", ".native", "device.type", "is_cuda",
              "if self.invariant", "invariant=", "PackedWeight")
    for path in Path(dsv4.model.__file__).parent.glob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        found = [word for word in banned if word in code]
        assert not found, f"{path.name}: {found}"


class _DeviceKernels(ReferenceKernels):
    """A hardware plugin's kernel set: it serves the meta device (a stand-in for a GPU) and nothing else."""

    name: ClassVar[str] = "device-kernels"
    capabilities: ClassVar[frozenset[str]] = frozenset({"inference"})

    @classmethod
    def refuse(cls, config: Any, device: torch.device, mode: Any) -> str | None:
        return None if device.type == "meta" and mode == "inference" else "serves the meta device only"


class _DevicePlugin:
    @hookimpl
    def register_kernel_sets(self) -> list[type[Any]]:
        return [_DeviceKernels]


@needs_native
def test_auto_prefers_an_installed_hardware_plugin_where_it_serves() -> None:
    registry = build_registry([_DevicePlugin()], load_entry_points=False)
    assert choose_plugins(CFG, torch.device("meta"), registry=registry).kernels["inference"] == "device-kernels"
    on_cpu = choose_plugins(CFG, CPU, registry=registry)
    assert on_cpu.kernels["inference"] == "cpu"  # it refuses the CPU; dsv4's native kernels serve it
    plain = choose_plugins(CFG, CPU, registry=registry, native_kernels=False, packed_weights=False)
    assert plain.kernels["inference"] == "reference"


def test_a_model_that_ran_native_plugins_serves_a_batch_invariant_engine() -> None:
    """dsv4's own plugins (the native ``cpu`` ones included) are swapped under "auto": a model an engine ran
    with them can then be handed to a batch-invariant engine."""
    held = PluginChoice("cpu", "cpu", {"autograd": "reference", "inference": "cpu", "batch_invariant": "batch_invariant"})
    choice = choose_plugins(CFG, CPU, current=held, batch_invariant=True)
    assert (choice.attention_backend, choice.expert_executor) == ("reference", "reference")

"""The plugin system: documented hooks, registry validation and selection, entry points, a real install."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import pytest
from loguru import logger

from dsv4 import cli
from dsv4.core import hookspecs, plugins
from dsv4.core.hookspecs import hookimpl
from dsv4.core.interfaces import INTERFACES
from dsv4.core.plugins import ALLOW_LIST_ENV, PluginError, PluginInfo, Provider, Registry, build_registry

SAMPLE_PLUGIN = Path(__file__).parents[1] / "plugins" / "sample_plugin"


# --------------------------------------------------------------------------------------------------
# Fakes: implementation classes and plugins built in the test
# --------------------------------------------------------------------------------------------------
class FakeBackend:
    """A minimal AttentionBackend; subclasses set ``name`` and the reason ``refuse`` gives."""

    name: ClassVar[str] = "fake"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    reason: ClassVar[str | None] = None

    @classmethod
    def refuse(cls, config: Any, device: Any) -> str | None:
        return cls.reason

    def kv_streams(self) -> list[Any]:
        return []

    def plan(self, batch: Any, pool: Any) -> Any:
        return None

    def forward(self, layer: Any, inputs: Any, metadata: Any) -> Any:
        return None


def backend(name: str, reason: str | None = None, **attrs: Any) -> type[Any]:
    """A FakeBackend subclass named ``name`` (``attrs`` override class attributes)."""
    return type(f"Backend_{name}", (FakeBackend,), {"name": name, "reason": reason, **attrs})


def fake_plugin(plugin_name: str, **hooks: list[Any]) -> types.ModuleType:
    """A plugin module whose hook ``hook`` returns ``hooks[hook]``."""
    module = types.ModuleType(plugin_name)
    for hook, classes in hooks.items():
        setattr(module, hook, _returning(classes))
    return module


def _returning(classes: list[Any]) -> Any:
    @hookimpl
    def impl() -> list[Any]:
        return classes

    return impl


def registry_of(*plugin_objects: object) -> Registry:
    return build_registry(plugin_objects, load_entry_points=False, builtins=False)


# --------------------------------------------------------------------------------------------------
# Hook specifications
# --------------------------------------------------------------------------------------------------
def test_every_hook_is_documented_and_fills_a_kind() -> None:
    specs = {name: obj for name, obj in vars(hookspecs).items() if hasattr(obj, "dsv4_spec")}
    assert set(specs) == set(hookspecs.REGISTRATION_HOOKS)
    assert sorted(hookspecs.REGISTRATION_HOOKS.values()) == sorted(INTERFACES)
    for name, spec in specs.items():
        doc = (spec.__doc__ or "").strip()
        assert doc, f"hook {name} has no docstring"
        assert "\n" not in doc, f"hook {name}: docstrings are one line"


# --------------------------------------------------------------------------------------------------
# Registry: registration and validation
# --------------------------------------------------------------------------------------------------
def test_registers_classes_with_their_provider() -> None:
    x, y = backend("x"), backend("y")
    registry = registry_of(fake_plugin("a", register_attention_backends=[x, y], register_verifiers=[]))

    assert registry.names("attention_backend") == ["x", "y"]
    assert registry.names("verifier") == []
    assert registry.get("attention_backend", "y") is y
    assert registry.provider("attention_backend", "x") == Provider("a")
    assert registry.describe() == [PluginInfo("a", None, None, {"attention_backend": ("x", "y")})]


def test_duplicate_names_are_rejected_naming_both_providers() -> None:
    first = fake_plugin("a", register_attention_backends=[backend("x")])
    second = fake_plugin("b", register_attention_backends=[backend("x")])
    with pytest.raises(PluginError, match=r"'x' is registered twice: by plugin 'a' .* and by plugin 'b'"):
        registry_of(first, second)


def test_same_name_in_different_kinds_is_fine() -> None:
    class Executor:
        name: ClassVar[str] = "x"
        capabilities: ClassVar[frozenset[str]] = frozenset()

        @classmethod
        def refuse(cls, config: Any, device: Any) -> str | None:
            return None

        def forward(self, experts: Any, x: Any, idx: Any, weights: Any, limit: float) -> Any:
            return x

    registry = registry_of(
        fake_plugin("a", register_attention_backends=[backend("x")], register_expert_executors=[Executor])
    )
    assert registry.get("expert_executor", "x") is Executor


def test_missing_protocol_method_is_named() -> None:
    no_plan = backend("x", plan=None)
    with pytest.raises(PluginError, match=r"plugin 'a' registers an invalid attention_backend .*: missing .* plan$"):
        registry_of(fake_plugin("a", register_attention_backends=[no_plan]))


class SchedulerWithoutFinish:
    """Written from the Scheduler Protocol, but without ``finish`` (which the engine calls)."""

    name: ClassVar[str] = "no-finish"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def refuse(cls, options: Any) -> str | None:
        return None

    def add(self, seq: Any) -> None: ...
    def schedule(self) -> Any: ...
    def abort(self, request_id: str) -> list[Any]: ...
    def has_work(self) -> bool: ...


def test_every_method_the_engine_calls_is_required() -> None:
    with pytest.raises(PluginError, match=r"invalid scheduler .*: missing Scheduler method\(s\): finish$"):
        registry_of(fake_plugin("a", register_schedulers=[SchedulerWithoutFinish]))


@pytest.mark.parametrize(
    ("attrs", "problem"),
    [
        ({"name": ""}, "`name` must be a non-empty str"),
        ({"name": None}, "`name` must be a non-empty str"),
        ({"capabilities": {"paged"}}, "`capabilities` must be a frozenset of str"),
        ({"refuse": None}, "missing AttentionBackend method(s): refuse"),
    ],
)
def test_malformed_classes_are_rejected(attrs: dict[str, Any], problem: str) -> None:
    bad = type("Bad", (FakeBackend,), attrs)
    with pytest.raises(PluginError) as info:
        registry_of(fake_plugin("a", register_attention_backends=[bad]))
    assert problem in str(info.value)


def test_hook_must_return_a_list_of_classes() -> None:
    with pytest.raises(PluginError, match="not a class"):
        registry_of(fake_plugin("a", register_attention_backends=[FakeBackend()]))
    with pytest.raises(PluginError, match=r"register_attention_backends\(\) must return a list"):
        registry_of(fake_plugin("a", register_attention_backends=FakeBackend))  # type: ignore[arg-type]


def test_failing_hook_names_the_plugin() -> None:
    @hookimpl
    def register_kv_pools() -> list[Any]:
        raise ImportError("no module named 'kernels'")

    plugin = types.ModuleType("a")
    plugin.register_kv_pools = register_kv_pools  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"plugin 'a' failed in register_kv_pools\(\): ImportError: no module"):
        registry_of(plugin)


def test_misspelt_hook_is_an_error() -> None:
    with pytest.raises(PluginError, match="register_attention_backend"):
        registry_of(fake_plugin("a", register_attention_backend=[backend("x")]))


# --------------------------------------------------------------------------------------------------
# Registry: selection
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_and_cpu() -> Registry:
    return registry_of(
        fake_plugin("a", register_attention_backends=[backend("gpu", "needs a CUDA device"), backend("cpu")])
    )


def test_get_unknown_name_lists_available(gpu_and_cpu: Registry) -> None:
    with pytest.raises(PluginError, match=r"^unknown attention_backend 'tpu'; available: 'gpu', 'cpu'$"):
        gpu_and_cpu.get("attention_backend", "tpu")
    with pytest.raises(PluginError, match=r"^unknown kind 'attention'; kinds: attention_backend, kv_pool"):
        gpu_and_cpu.names("attention")


def test_select_reports_the_refusal(gpu_and_cpu: Registry) -> None:
    assert gpu_and_cpu.select("attention_backend", "cpu", None, "cpu").name == "cpu"
    with pytest.raises(PluginError) as info:
        gpu_and_cpu.select("attention_backend", "gpu", None, "cpu")
    assert str(info.value) == "attention_backend 'gpu' cannot serve this configuration: needs a CUDA device"


def test_first_available_skips_refusers(gpu_and_cpu: Registry) -> None:
    assert gpu_and_cpu.first_available("attention_backend", None, "cpu").name == "cpu"
    assert gpu_and_cpu.first_available("attention_backend", None, "cpu", prefer=["tpu", "gpu"]).name == "cpu"


def test_first_available_lists_every_reason() -> None:
    registry = registry_of(fake_plugin("a", register_attention_backends=[backend("gpu", "needs a CUDA device")]))
    with pytest.raises(PluginError) as info:
        registry.first_available("attention_backend", None, "cpu", prefer=["tpu"])
    assert str(info.value) == (
        "no attention_backend can serve this configuration: 'tpu': not installed; 'gpu': needs a CUDA device"
    )
    with pytest.raises(PluginError, match="no verifier can serve this configuration: none is registered"):
        registry.first_available("verifier", {})


# --------------------------------------------------------------------------------------------------
# Entry points and the DSV4_PLUGINS allow-list
# --------------------------------------------------------------------------------------------------
def fake_distribution(root: Path, name: str, version: str, entry_points: dict[str, str]) -> list[EntryPoint]:
    """The ``dsv4`` entry points of a distribution's metadata written under ``root`` (not on sys.path)."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[dsv4]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    return list(importlib.metadata.Distribution.at(info).entry_points)


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plugins 'alpha' and 'beta' (each a backend of that name) and 'broken' (fails to import)."""
    eps: list[EntryPoint] = []
    for name in ("alpha", "beta"):
        module = f"fake_dsv4_{name}"
        monkeypatch.setitem(sys.modules, module, fake_plugin(module, register_attention_backends=[backend(name)]))
        eps += fake_distribution(tmp_path, f"dsv4-{name}", "1.0", {name: module})
    eps += fake_distribution(tmp_path, "dsv4-broken", "2.0", {"broken": "fake_dsv4_nonexistent_module"})
    monkeypatch.setattr(plugins, "_entry_points", lambda: eps)
    monkeypatch.delenv(ALLOW_LIST_ENV, raising=False)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    messages: list[str] = []
    handler = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(handler)


@pytest.mark.usefixtures("installed")
def test_unset_allow_list_loads_everything() -> None:
    with pytest.raises(PluginError) as info:
        build_registry(builtins=False)
    assert str(info.value).startswith(
        "plugin 'broken' (dsv4-broken 2.0) failed to import (fake_dsv4_nonexistent_module): ModuleNotFoundError"
    )


@pytest.mark.usefixtures("installed")
def test_allow_list_selects_plugins(monkeypatch: pytest.MonkeyPatch, warnings: list[str]) -> None:
    monkeypatch.setenv(ALLOW_LIST_ENV, " beta,alpha ")  # the broken plugin is never imported
    registry = build_registry(builtins=False)
    assert registry.names("attention_backend") == ["alpha", "beta"]  # installed order, not list order
    assert registry.provider("attention_backend", "beta") == Provider("beta", "dsv4-beta", "1.0")
    assert warnings == []


@pytest.mark.usefixtures("installed")
def test_empty_allow_list_loads_no_third_party_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_LIST_ENV, "")
    assert build_registry(builtins=False).describe() == []


@pytest.mark.usefixtures("installed")
def test_allow_listed_plugin_not_installed_warns(monkeypatch: pytest.MonkeyPatch, warnings: list[str]) -> None:
    monkeypatch.setenv(ALLOW_LIST_ENV, "alpha,gamma,builtin")
    assert build_registry(builtins=False).names("attention_backend") == ["alpha"]
    assert len(warnings) == 1
    assert "DSV4_PLUGINS names plugins that are not installed: gamma" in warnings[0]


def test_get_registry_is_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Registry] = []

    def build() -> Registry:
        built.append(registry_of())
        return built[-1]

    monkeypatch.setattr(plugins, "build_registry", build)
    plugins.reset_registry()
    try:
        assert plugins.get_registry() is plugins.get_registry() is built[0]
        plugins.reset_registry()
        assert plugins.get_registry() is built[1]
    finally:
        plugins.reset_registry()


def test_builtins_registered() -> None:
    registry = build_registry(load_entry_points=False)
    assert {kind: registry.names(kind) for kind in INTERFACES} == {
        "attention_backend": ["reference", "cpu"],
        "kv_pool": ["paged"],
        "expert_executor": ["reference", "grouped", "cpu"],
        "verifier": ["exact", "numeric", "math", "regex", "format", "code"],
        "scheduler": ["fcfs"],
        "kernel_set": ["reference", "batch_invariant", "cpu"],
    }
    [info] = registry.describe()
    assert (info.name, info.distribution) == ("builtin", "dsv4")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def two_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = registry_of(
        fake_plugin("a", register_attention_backends=[backend("x"), backend("y")]), fake_plugin("b")
    )
    monkeypatch.setattr(plugins, "get_registry", lambda: registry)


@pytest.mark.usefixtures("two_plugins")
def test_cli_plugins_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "plugin  distribution  version  kind               names",
        "a       -             -        attention_backend  x, y",
        "b       -             -        -",
    ]


@pytest.mark.usefixtures("two_plugins")
def test_cli_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "a", "distribution": None, "version": None, "provides": {"attention_backend": ["x", "y"]}},
        {"name": "b", "distribution": None, "version": None, "provides": {}},
    ]


def test_cli_reports_plugin_errors_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> Registry:
        raise PluginError("plugin 'x' failed to import")

    monkeypatch.setattr(plugins, "get_registry", broken)
    assert cli.main(["plugins"]) == 2
    assert capsys.readouterr().err == "error: plugin 'x' failed to import\n"


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"dsv4 {importlib.metadata.version('dsv4')}\n"


# --------------------------------------------------------------------------------------------------
# A real third-party package, installed with pip and discovered through its entry point
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed sample plugin, to put on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("sample_plugin")
    # Built from a copy: pip builds in-tree and would leave build/ and *.egg-info in the repository.
    source = shutil.copytree(SAMPLE_PLUGIN, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return site


def run_python(site: Path, *args: str, **env: str) -> str:
    """stdout of ``python *args`` with the sample plugin installed; fails the test on a non-zero exit."""
    environ = {k: v for k, v in os.environ.items() if k != ALLOW_LIST_ENV} | {"PYTHONPATH": str(site)} | env
    done = subprocess.run([sys.executable, *args], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_installed_plugin_is_listed(sample_site: Path) -> None:
    listed = json.loads(run_python(sample_site, "-m", "dsv4.cli", "plugins", "--json"))
    assert [p["name"] for p in listed] == ["builtin", "sample"]
    assert listed[1] == {
        "name": "sample",
        "distribution": "dsv4-sample-plugin",
        "version": "0.1.0",
        "provides": {"attention_backend": ["sample"], "expert_executor": ["sample-experts"],
                     "kernel_set": ["sample-kernels"]},
    }


def test_installed_plugin_is_left_out_by_an_empty_allow_list(sample_site: Path) -> None:
    listed = json.loads(run_python(sample_site, "-m", "dsv4.cli", "plugins", "--json", DSV4_PLUGINS=""))
    assert [p["name"] for p in listed] == ["builtin"]


def test_installed_plugin_is_selected_by_name(sample_site: Path) -> None:
    code = (
        "from dsv4.core.plugins import get_registry\n"
        "cls = get_registry().get('attention_backend', 'sample')\n"
        "print(cls.__module__, cls.__name__)"
    )
    assert run_python(sample_site, "-c", code) == "dsv4_sample_plugin SampleAttentionBackend\n"


def test_installed_kernel_set_passes_the_contract_and_serves(sample_site: Path) -> None:
    code = (
        "import torch, dsv4\n"
        "from dsv4.core.config import ModelConfig\n"
        "from dsv4.core.plugins import get_registry\n"
        "from dsv4.testing.contracts import check_kernel_set\n"
        "from dsv4.testing.models import random_model\n"
        "check_kernel_set(get_registry().get('kernel_set', 'sample-kernels'))\n"
        "model = random_model(ModelConfig.tiny(), seed=0)\n"
        "engine = dsv4.Engine(random_model(ModelConfig.tiny(), seed=0), kernels='sample-kernels')\n"
        "print(engine.model.kernels.names())\n"
        "params = dsv4.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)\n"
        "got = engine.generate([[3, 4, 5, 6]], params)[0].outputs[0].token_ids\n"
        "from dsv4.testing.models import greedy_reference\n"
        "print(got == greedy_reference(model, [3, 4, 5, 6], 6))\n"
    )
    names, same = run_python(sample_site, "-c", code).splitlines()
    assert names == "{'autograd': 'reference', 'inference': 'sample-kernels', 'batch_invariant': 'batch_invariant'}"
    assert same == "True"

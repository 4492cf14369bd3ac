"""Every built-in implementation of a core interface passes the shared contract checks."""

from __future__ import annotations

import pytest

from dsv4.core.plugins import build_registry
from dsv4.testing import contracts

# dsv4's own implementations: an installed third-party plugin runs these checks in its own tests (a
# hardware plugin may rightly refuse this machine, e.g. a GPU kernel set on a CPU).
REG = build_registry(load_entry_points=False)


@pytest.mark.parametrize("name", REG.names("attention_backend"))
def test_attention_backend_contract(name: str) -> None:
    contracts.check_attention_backend(REG.get("attention_backend", name))


@pytest.mark.parametrize("name", REG.names("expert_executor"))
def test_expert_executor_contract(name: str) -> None:
    contracts.check_expert_executor(REG.get("expert_executor", name))


@pytest.mark.parametrize("name", REG.names("kv_pool"))
def test_kv_pool_contract(name: str) -> None:
    contracts.check_kv_pool(REG.get("kv_pool", name))


@pytest.mark.parametrize("name", REG.names("scheduler"))
def test_scheduler_contract(name: str) -> None:
    contracts.check_scheduler(REG.get("scheduler", name))


def _verifier_cases() -> dict[str, tuple[dict[str, object], list[tuple[object, float]]]]:
    """Options and known (sample, reward) cases per built-in verifier; others run with {} and none."""
    from dsv4.core.interfaces import VerifySample as S

    add_one = {"tests": [{"input": "1\n", "output": "2\n"}, {"input": "41\n", "output": "42\n"}]}
    return {
        "exact": ({}, [(S("", r"so \boxed{Paris}", {"answer": "paris"}), 1.0),
                       (S("", r"\boxed{Rome}", {"answer": "Paris"}), 0.0)]),
        "numeric": ({}, [(S("", "#### 1,234", {"answer": 1234}), 1.0), (S("", "it is 5 or 6", {"answer": 5}), 0.0)]),
        "math": ({}, [(S("", r"\boxed{\frac{1}{2}}", {"answer": "0.5"}), 1.0),
                      (S("", r"\boxed{3}", {"answer": "2"}), 0.0)]),
        "regex": ({"pattern": r"\d+"}, [(S("", " 42 ", {}), 1.0), (S("", "4a2", {}), 0.0)]),
        "format": ({}, [(S("", "<think>hm</think>\n<answer>4</answer>", {}), 1.0), (S("", "4", {}), 0.0)]),
        "code": ({"timeout": 3.0}, [(S("", "```python\nprint(int(input()) + 1)\n```", add_one), 1.0),
                                   (S("", "```python\nprint(2)\n```", add_one), 0.5)]),
    }


@pytest.mark.parametrize("name", REG.names("verifier"))
def test_verifier_contract(name: str) -> None:
    options, cases = _verifier_cases().get(name, ({}, []))
    contracts.check_verifier(REG.get("verifier", name), options, cases=cases)


@pytest.mark.parametrize("name", REG.names("kernel_set"))
def test_kernel_set_contract(name: str) -> None:
    contracts.check_kernel_set(REG.get("kernel_set", name))

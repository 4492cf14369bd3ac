"""The Triton plugin (``plugins/dsv4-triton``) compiled for CUDA: the CPU reference's logits and tokens.

Its own tests run the same kernels in Triton's interpreter on the CPU; these run them as GPU code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4 import Engine, SamplingParams

pytest.importorskip("dsv4_triton", reason="the dsv4-triton plugin is not installed (pip install -e plugins/dsv4-triton)")

TOL = 1e-4
TRITON = {"kernels": "triton", "attention_backend": "triton", "expert_executor": "triton"}
PLUGINS = [{"kernels": "triton", "attention_backend": "reference", "expert_executor": "grouped"}, TRITON]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _compiled() -> None:
    if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes"):
        pytest.skip("TRITON_INTERPRET is set: the kernels would run in the interpreter, not compiled for the GPU")


@pytest.mark.parametrize("plugins", PLUGINS, ids=["kernels", "all"])
def test_logits_match_the_cpu_reference(checkpoint: Path, plugins: dict[str, str]) -> None:
    model = dsv4.load_model(checkpoint, device="cuda", **plugins)
    assert model.plugins.kernels["inference"] == "triton"
    ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(ids.cuda()).cpu(), dsv4.load_model(checkpoint)(ids)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 5, "page_size": 4}],
                         ids=["whole-prefill", "chunked-prefill"])
@pytest.mark.parametrize("plugins", PLUGINS, ids=["kernels", "all"])
def test_engine_greedy_tokens_equal_the_cpu_engines(
    checkpoint: Path, prompts: list[list[int]], plugins: dict[str, str], options: dict[str, int]
) -> None:
    gpu = Engine(checkpoint, device="cuda", **plugins, **options)
    choice = gpu.model.plugins
    assert choice.kernels["inference"] == "triton"
    assert (choice.attention_backend, choice.expert_executor) == (plugins["attention_backend"], plugins["expert_executor"])
    cpu = Engine(checkpoint, native_kernels=False, packed_weights=False, **options)
    tokens = [[o.outputs[0].token_ids for o in e.generate(prompts, GREEDY)] for e in (gpu, cpu)]
    assert tokens[0] == tokens[1]

"""The engine on CUDA: the CPU engine's tokens (greedy, and seeded samples), its logprobs within 1e-4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import dsv4
from dsv4 import Engine, SamplingParams

TOL = 1e-4
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
# n=3: the prompt is prefilled once and its cache forked; each sample draws from its own seeded CPU generator
SAMPLED = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
# The CPU side in plain PyTorch (no C kernels to compile, no MKL packing); both are ignored on CUDA.
PYTORCH = {"native_kernels": False, "packed_weights": False}


def _run(engine: Engine, prompts: list[list[int]]) -> tuple[list[list[list[int]]], list[list[float]]]:
    """Tokens per prompt and sample, and every sampled token's logprob, for GREEDY then SAMPLED."""
    tokens, logprobs = [], []
    for params in (GREEDY, SAMPLED):
        for out in engine.generate(prompts, params):
            tokens.append([list(c.token_ids) for c in out.outputs])
            logprobs.append([lp for c in out.outputs for lp in c.token_logprobs or []])
    return tokens, logprobs


def _assert_same(got: tuple[Any, Any], want: tuple[Any, Any]) -> None:
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1], strict=True):
        assert len(g) == len(w) and max(abs(a - b) for a, b in zip(g, w, strict=True)) <= TOL


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 5, "page_size": 4}],
                         ids=["whole-prefill", "chunked-prefill"])  # chunks cut inside compression blocks
def test_tokens_equal_the_cpu_engines(checkpoint: Path, prompts: list[list[int]], options: dict[str, int]) -> None:
    cpu = Engine(checkpoint, return_token_logprobs=True, **PYTORCH, **options)
    gpu = Engine(checkpoint, device="cuda", return_token_logprobs=True, **PYTORCH, **options)
    assert gpu.model.embed.weight.is_cuda and gpu.pool.buffer(0, "win").is_cuda
    _assert_same(_run(gpu, prompts), _run(cpu, prompts))
    assert gpu.expert_load() == cpu.expert_load()  # summed on the device, read once here


def test_a_model_passed_in_on_cuda_keeps_its_cache_beside_it(checkpoint: Path, prompts: list[list[int]]) -> None:
    gpu = Engine(dsv4.load_model(checkpoint, device="cuda"), return_token_logprobs=True)  # no device option
    assert gpu.pool.buffer(0, "win").is_cuda
    _assert_same(_run(gpu, prompts), _run(Engine(checkpoint, return_token_logprobs=True, **PYTORCH), prompts))


def test_the_prefix_cache_on_cuda(checkpoint: Path, prompts: list[list[int]]) -> None:
    """Requests resumed from prefix-cache checkpoints (pages shared and copied on the device) give the
    tokens of an engine without the cache."""
    options = dict(device="cuda", return_token_logprobs=True, max_num_batched_tokens=7, page_size=4,
                   window_checkpoint_interval=5)
    cached = Engine(checkpoint, **options)
    plain = Engine(checkpoint, prefix_cache=False, **options)
    longer = [p + p[:7] for p in prompts]  # each resent with more: resumes inside it
    for batch in (prompts, longer, prompts):
        _assert_same(_run(cached, batch), _run(plain, batch))
    assert cached.kv_stats()["prefix_cache"]["hit_tokens"] > 0

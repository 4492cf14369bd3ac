"""Engine options: one model, its plugins, the KV pool's size, the batch limits and the prefix cache.

Each option is also a ``dsv4.Engine(...)`` keyword, a ``key=value`` override of ``dsv4 serve`` /
``dsv4 batch`` (``engine.<key>``) and a key of a recipe's ``engine:`` section.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from dsv4.core.kv import StreamSpec
from dsv4.core.runconfig import RunConfigModel

__all__ = ["DTYPES", "EngineConfig", "pool_pages"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(RunConfigModel):
    """Engine options (each is also a ``dsv4.Engine(...)`` keyword and a ``key=value`` override)."""

    model: str | None = None  # checkpoint directory (config.json, safetensors, tokenizer.json)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # CPU: keep float32
    device: str = "cpu"  # where a checkpoint is loaded ("cuda", "cuda:1"); a model passed in stays where it is
    # Plugin names (see `dsv4 plugins`). "auto" (decided by dsv4.core.plugins.choose_plugins): the
    # native-kernel "cpu" plugins where they apply (CPU, native_kernels, not batch_invariant), else the
    # "reference" backend, for experts "grouped" (batched small steps) or "reference" in batch-invariant
    # mode, and for kernels "reference" (autograd), "batch_invariant", and "cpu" or "reference" for
    # inference. A named kernel set computes every step mode it declares. A model passed in keeps
    # third-party plugins under "auto"; built-in PyTorch ones are swapped for the auto choice.
    attention_backend: str = "auto"
    expert_executor: str = "auto"
    kernels: str = "auto"
    kv_pool: str = "paged"
    scheduler: str = "fcfs"
    fake_quant: bool = False  # reproduce the reference's FP8/FP4 activation quantisation
    max_model_len: int | None = Field(default=None, ge=2)  # prompt + output; default min(config, 8192)
    max_num_seqs: int = Field(default=64, ge=1)  # sequences running at once
    max_num_batched_tokens: int = Field(default=2048, ge=1)  # new tokens per step (prefill chunks + decodes)
    chunked_prefill: bool = True
    page_size: int = Field(default=16, ge=1)
    # Context tokens the compressed-entry pools hold across all sequences (default: every running
    # sequence at max_model_len, so nothing is ever preempted); smaller values trade memory for preemption.
    kv_cache_tokens: int | None = Field(default=None, ge=1)
    # Compute every sampled token's logprob (RL rollouts need them); costs a pass over the vocabulary.
    return_token_logprobs: bool = False
    # Record every layer's expert (and indexer) choices per token, for routing replay in RL training.
    record_routing: bool = False
    # Batch-invariant numerics (true on-policy RL): a token's logits do not depend on its batch.
    batch_invariant: bool = False
    # Small-batch fp32 CPU linears through MKL-packed weights (1.3–2x faster per linear at 4–256
    # rows; the packed copies cost about the weights' memory again), in the "cpu" kernel set. Ignored
    # off the CPU, without MKL, and in batch-invariant mode.
    packed_weights: bool = True
    # Fused C kernels for CPU inference (dsv4.native: mHC, norms, rope and the router in the "cpu"
    # kernel set; attention, compression and experts through the "cpu" plugins that "auto" then
    # picks), compiled on first use. Ignored off the CPU, in batch-invariant mode and where no C
    # compiler works (the PyTorch paths run instead).
    native_kernels: bool = True
    # n > 1: prefill the prompt once and give the other samples a copy of its KV cache (pools with
    # the "fork" capability); off: every sample prefills the prompt itself.
    share_prompt: bool = True
    # Keep requests' KV after they finish, as window checkpoints in a radix tree over token ids
    # (dsv4.cache.prefix): a new request resumes from the deepest checkpoint inside its longest cached
    # prefix and prefills only the rest. Checkpoints are taken where a request ends, at its prompt's
    # last token and every window_checkpoint_interval tokens, and evicted (least recently used
    # first) when the pool needs their pages. Needs a pool with the "share" capability and a scheduler
    # with "prefix_cache" (the built-ins have both).
    prefix_cache: bool = True
    window_checkpoint_interval: int = Field(default=256, ge=1)
    # Room in the pools of window and open-block rows for this many checkpoints besides what the
    # running sequences need (compressed entries are shared with the requests they came from).
    window_checkpoints: int = Field(default=64, ge=0)
    # Speculative decoding: "mtp" drafts num_speculative_tokens tokens per step with the checkpoint's
    # MTP block (applied recursively) and verifies them in the next step's forward, inside continuous
    # batching. Exact: greedy requests get the tokens plain decoding gives, sampled ones the same
    # distribution (rejection sampling). Steps with more than speculative_max_batch sequences sampling
    # a token decode plainly (verifying then costs more than it saves; see benchmarks/bench_spec.py).
    speculative: Literal["mtp"] | None = None
    num_speculative_tokens: int = Field(default=3, ge=1, le=16)
    speculative_max_batch: int = Field(default=4, ge=0)
    # Keep large CPU tensors in glibc's heap (process-wide; dsv4.core.runtime): ~1.5x faster long
    # prefills, but ~10 % slower small-tensor RL training, so off unless asked (dsv4 serve/batch do).
    tune_allocator: bool = False



def pool_pages(streams: list[StreamSpec], config: EngineConfig, max_model_len: int) -> dict[str, int]:
    """Pages of each stream for ``config``: its sequences, their context (``kv_cache_tokens``, default
    every sequence at ``max_model_len``), a step's chunk, and the prefix cache's checkpoints."""
    capacity = config.kv_cache_tokens or config.max_num_seqs * max_model_len
    chunk = min(config.max_num_batched_tokens, max_model_len)
    checkpoints = config.window_checkpoints if config.prefix_cache else 0
    return {s.name: _pages_needed(s, config.page_size, config.max_num_seqs, capacity, chunk, checkpoints)
            for s in streams}


def _pages_needed(s: StreamSpec, page: int, max_seqs: int, capacity_tokens: int, chunk: int, checkpoints: int) -> int:
    """Pages of stream ``s`` for ``max_seqs`` sequences holding ``capacity_tokens`` tokens in total, and
    ``checkpoints`` prefix-cache checkpoints (their own rows where the stream's rows expire)."""
    if s.keep is None:  # grows with the context: sized by total capacity, plus a partial page each
        return math.ceil(s.length(capacity_tokens) / page) + max_seqs + checkpoints
    # Bounded per sequence: what it keeps, the open block, and a step's chunk, plus partial pages.
    rows = math.ceil((s.keep + s.align + chunk) / s.ratio) + 1
    # A checkpoint holds what a sequence keeps at one point, on pages that may start mid-way.
    held = math.ceil((s.keep + s.align) / s.ratio / page) + 1
    return max_seqs * (math.ceil(rows / page) + 2) + checkpoints * held

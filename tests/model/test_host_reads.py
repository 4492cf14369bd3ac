"""No host read per layer: what a step reads back from its tensors (``item``, ``tolist``, ``int()``,
``float()``, ``bool()``) does not grow with the model's depth.

On a GPU every such read waits for the device, and one per layer empties the queue of kernels at every
layer; on the CPU they are plain calls, so they are counted here, on models of 4 and 8 layers. (Reads
inside torch's C++ are not seen: e.g. CUDA's ``bincount`` reads its input's maximum, which is why the
MoE layer counts routed tokens with ``index_add_`` off the CPU.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import dsv4
from dsv4.cache.paged import PagedKVPool
from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import KernelSet, RoutingTrace
from dsv4.model import Transformer

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


class _EveryExpert:
    """Every expert on every token, weighted by the routing (zero where a token is not routed): no shape
    depends on the routing. The built-in executors size their work by it, a read per layer (the price of
    their design; a GPU plugin's executor avoids it), so they are left out of the count."""

    name = "every-expert"

    def forward(self, experts: nn.ModuleList, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                limit: float, kernels: KernelSet) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            out = out + torch.where(idx == e, weights, 0).sum(dim=-1, keepdim=True) * expert(x, kernels)
        return out


def _model(layers: int) -> Transformer:
    model = dsv4.build_model(ModelConfig.tiny(num_hidden_layers=layers), seed=0)  # sliding, CSA, HCA, CSA, ...
    model.expert_executor = _EveryExpert()  # type: ignore[assignment]
    return model


@contextmanager
def _counting() -> Iterator[list[str]]:
    """Every tensor read of the block, by name."""
    seen: list[str] = []

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return original(self, *args, **kwargs)

        return read

    with pytest.MonkeyPatch.context() as mp:
        for name in READS:
            mp.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        yield seen


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _training(model: Transformer) -> None:
    """Whole sequences (one long enough for a dense block, 32 tokens or more) with MTP, the balance loss,
    a routing record and the backward."""
    seqs = [_ids(40, 1), _ids(5, 2), _ids(6, 3)]
    batch = ForwardBatch.from_requests(seqs, sample="all")
    nxt = torch.tensor([t for s in seqs for t in s[1:] + s[:1]])
    # (not indexer_loss: its objective averages over the rows that selected an entry, a read per layer)
    out = model.train().run(batch, mtp_ids=nxt, balance_loss=True, routing=RoutingTrace())
    (out.logits.sum() + out.mtp_logits[0].sum() + out.aux_losses["seq_balance"]).backward()


def _shared_prefix(model: Transformer) -> None:
    """A prompt computed once for two completions in the same forward (GRPO's layout)."""
    batch = ForwardBatch.from_requests([_ids(20, 4), _ids(5, 5), _ids(3, 6)], [0, 20, 20], sample="all",
                                       parents=[-1, 0, 0])
    with torch.no_grad():
        model.eval().run(batch)


def _paged(model: Transformer) -> None:
    """Inference through the KV pool: a prefill (dense and gathered) then a decode step of both requests."""
    pool = PagedKVPool.for_capacity(model.attn_backend.kv_streams(), 256, 4, page_size=4)
    steps = [([_ids(40, 7), _ids(7, 8)], [0, 0]), ([[5], [6]], [40, 7])]
    with torch.no_grad():
        for tokens, prefix in steps:
            for rid, (t, p) in enumerate(zip(tokens, prefix, strict=True)):
                pool.reserve(rid, p + len(t))
            model.eval().run(ForwardBatch.from_requests(tokens, prefix, rids=[0, 1]), pool)


@pytest.mark.parametrize("step", [_training, _shared_prefix, _paged], ids=["training", "shared-prefix", "paged"])
def test_host_reads_do_not_grow_with_depth(step: Callable[[Transformer], None]) -> None:
    counts = []
    for layers in (4, 8):
        model = _model(layers)
        with _counting() as seen:
            step(model)
        counts.append(sorted(seen))
    assert counts[1] == counts[0], f"4 layers read {counts[0]}, 8 layers {counts[1]}"

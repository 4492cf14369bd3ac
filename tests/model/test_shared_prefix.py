"""Prefixes shared inside one forward (``ForwardBatch.parents``): a prompt computed once for all its
completions gives every completion the logits and gradients of its own whole-sequence forward."""

from __future__ import annotations

import pytest
import torch

from dsv4.core.batch import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.model import Transformer
from dsv4.testing.models import random_model

# Prompt lengths around the compression blocks (ratio 4 and 8) and the window (8); completion lengths
# from 1 token to past the dense-attention threshold (32 new tokens).
CASES = [(1, [1, 4]), (7, [1, 2, 9]), (8, [8, 1]), (13, [3, 40, 6]), (33, [2, 11])]


def _ids(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, 128, (n,), generator=g).tolist()


def _both(model: Transformer, prompt: list[int], comps: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per completion: its rows' logits from the shared forward and from its own whole sequence."""
    seqs = [prompt + c for c in comps]
    whole = model.run(ForwardBatch.from_requests(seqs, sample="all")).logits
    shared_batch = ForwardBatch.from_requests([prompt, *comps], [0] + [len(prompt)] * len(comps), sample="all",
                                              parents=[-1] + [0] * len(comps))
    shared = model.run(shared_batch).logits
    p, got, want = len(prompt), [], []
    starts, offset = shared_batch.starts.tolist(), 0
    for i, c in enumerate(comps):
        got.append(torch.cat((shared[:p], shared[starts[i + 1] : starts[i + 1] + len(c)])))
        want.append(whole[offset : offset + p + len(c)])
        offset += p + len(c)
    return got, want


@pytest.mark.parametrize(("prompt_len", "comp_lens"), CASES)
def test_shared_prompt_logits_equal_whole_sequences(prompt_len: int, comp_lens: list[int]) -> None:
    g = torch.Generator().manual_seed(prompt_len)
    model = random_model(ModelConfig.tiny(num_nextn_predict_layers=0), seed=1)
    with torch.no_grad():
        got, want = _both(model, _ids(prompt_len, g), [_ids(n, g) for n in comp_lens])
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a - b).abs().max().item() < 2e-5, f"completion {i}"


def test_shared_prompt_is_bit_exact_in_batch_invariant_mode() -> None:
    g = torch.Generator().manual_seed(5)
    model = random_model(ModelConfig.tiny(num_nextn_predict_layers=0), seed=2)
    model.set_batch_invariant(True, max_context=64)
    with torch.no_grad():
        got, want = _both(model, _ids(13, g), [_ids(n, g) for n in (1, 4, 9, 30)])
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"completion {i}"


@pytest.mark.parametrize("invariant", [False, True])
def test_chains_of_prefixes(invariant: bool) -> None:
    """A system prompt shared by two prompts, each shared by its completions: three levels, one forward."""
    g = torch.Generator().manual_seed(11)
    model = random_model(ModelConfig.tiny(num_nextn_predict_layers=0), seed=5)
    if invariant:
        model.set_batch_invariant(True, max_context=96)
    system, q1, q2 = _ids(21, g), _ids(6, g), _ids(3, g)
    c = [_ids(n, g) for n in (2, 9, 1, 35)]
    tokens = [system, q1, q2, c[0], c[1], c[2], c[3]]
    prefix = [0, 21, 21, 27, 27, 24, 24]
    parents = [-1, 0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        batch = ForwardBatch.from_requests(tokens, prefix, sample="all", parents=parents)
        got = model.run(batch).logits
        starts = batch.starts.tolist()
        for leaf, (q, prompt) in zip(range(3, 7), [(1, q1), (1, q1), (2, q2), (2, q2)]):
            whole = model.run(ForwardBatch.from_requests([system + prompt + tokens[leaf]], sample="all")).logits
            mine = torch.cat((got[: len(system)], got[starts[q] : starts[q] + len(prompt)],
                              got[starts[leaf] : starts[leaf] + len(tokens[leaf])]))
            if invariant:
                assert torch.equal(mine, whole), leaf
            else:
                assert (mine - whole).abs().max().item() < 2e-5, leaf


def test_gradients_flow_into_the_shared_prompt() -> None:
    """The loss over every completion's rows has the gradients of the same loss over whole sequences
    (the prompt's rows collect the sum of what each completion sends back)."""
    g = torch.Generator().manual_seed(7)
    prompt, comps = _ids(11, g), [_ids(n, g) for n in (3, 1, 14)]
    weights = [torch.randn(len(prompt) + len(c), 128, generator=g) for c in comps]
    grads = []
    for shared in (True, False):
        model = random_model(ModelConfig.tiny(num_nextn_predict_layers=0), seed=3)
        got, want = _both(model, prompt, comps)
        rows = got if shared else want
        loss = sum((r * w).sum() for r, w in zip(rows, weights, strict=True))
        loss.backward()  # type: ignore[union-attr]
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        ref = grads[1][name]
        assert (grad - ref).abs().max().item() <= 1e-4 * (1 + ref.abs().max().item()), name


def test_parents_are_checked() -> None:
    with pytest.raises(ValueError, match="2 parents for 3 requests"):
        ForwardBatch.from_requests([[1], [2], [3]], [0, 1, 1], parents=[-1, 0])
    with pytest.raises(ValueError, match="parent 1 is not an earlier request"):
        ForwardBatch.from_requests([[1, 2], [3]], [0, 1], parents=[-1, 1])
    with pytest.raises(ValueError, match="parent 2 is not an earlier request"):
        ForwardBatch.from_requests([[1, 2], [3], [4]], [0, 1, 2], parents=[-1, 2, 0])
    with pytest.raises(ValueError, match="a prefix of 3 tokens from parent 0, which has 2"):
        ForwardBatch.from_requests([[1, 2], [3]], [0, 3], parents=[-1, 0])
    with pytest.raises(ValueError, match="a prefix of 4 tokens from parent 1, which has 3"):
        ForwardBatch.from_requests([[1, 2], [3], [4]], [0, 2, 4], parents=[-1, 0, 1])
    with pytest.raises(ValueError, match="paged batch"):
        ForwardBatch.from_requests([[1, 2], [3]], [0, 2], parents=[-1, 0], rids=[0, 1])
    assert ForwardBatch.from_requests([[1], [2]], parents=[-1, -1]).parents is None


def test_a_backend_without_the_capability_or_mtp_logits_refuse_parents() -> None:
    model = random_model(ModelConfig.tiny(), seed=0)
    batch = ForwardBatch.from_requests([[1, 2, 3], [4, 5]], [0, 3], sample="all", parents=[-1, 0])
    with pytest.raises(ValueError, match="MTP logits"):
        model.run(batch, mtp_ids=torch.zeros(5, dtype=torch.long))

    class NoSharing(type(model.attn_backend)):  # type: ignore[misc]
        capabilities = frozenset({"training"})

    model.attn_backend = NoSharing(model.config)
    with pytest.raises(ValueError, match="shared_prefix"):
        model.run(batch)

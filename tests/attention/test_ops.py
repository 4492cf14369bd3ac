"""dsv4.attention.ops: the indexer's top-k ranks by score with ties to the lower entry, and its streamed
form picks what the whole-row form picks."""

from __future__ import annotations

import pytest
import torch

from dsv4.attention import ops


def test_ranking_breaks_ties_by_the_lower_entry() -> None:
    inf = float("inf")
    index = torch.tensor([[5.0, 5.0, 5.0, 7.0, -inf, 5.0],  # torch.topk picks {3, 2} here
                          [-0.0, 0.0, 1.0, -0.0, -inf, -inf],  # -0.0 ties with 0.0
                          [-inf, -inf, 2.0, -inf, -inf, -inf]])  # one visible: then the lowest masked
    valid = index > -inf
    top, top_valid, scores = ops.select_topk(index, valid, 3)
    assert top.tolist() == [[3, 0, 1], [2, 0, 1], [2, 0, 1]]
    assert top_valid.tolist() == [[True] * 3, [True] * 3, [True, False, False]]
    assert torch.equal(scores, index.gather(1, top))


def test_rank_keys_round_trip() -> None:
    scores = torch.tensor([3.5, -2.0, 0.0, -0.0, float("-inf"), 1e-30, -1e30])
    ids = torch.arange(7) * 1000
    back, back_ids = ops.unrank(ops.rank_keys(scores, ids))
    assert torch.equal(back, scores + 0.0) and torch.equal(back_ids, ids)
    order = ops.rank_keys(scores, ids).argsort(descending=True)
    assert order.tolist() == [0, 5, 2, 3, 1, 6, 4]  # 0.0 and -0.0 tie: the lower id first


@pytest.mark.parametrize("blocks", [(4, 7), (256, 2048)])
@pytest.mark.parametrize("replayed", [False, True])
def test_streamed_topk_equals_the_whole_row(blocks: tuple[int, int], replayed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    t, nh, c, n, k = 19, 4, 16, 60, 6
    q, w = torch.randn(t, nh, c, generator=g), torch.randn(t, nh, generator=g) - 0.5
    keys = torch.randn(80, c, generator=g)
    keys[torch.rand(80, generator=g) < 0.3] = 0.0  # exact ties at score 0
    rows = torch.randperm(80, generator=g)[:n]
    limit = torch.randint(0, n + 1, (t,), generator=g)
    replay = None
    if replayed:
        replay = torch.full((t, k), -1, dtype=torch.long)
        replay[::3] = torch.tensor([5, 0, 59, -1, 2, 1])
    valid = torch.arange(n) < limit.unsqueeze(1)
    want = ops.indexer_topk(q, w, keys[rows].expand(t, -1, -1), valid, k, replay)
    got = ops.indexer_topk_shared(q, w, keys, rows, limit, k, replay, query_block=blocks[0], key_block=blocks[1])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    selected = torch.ones(t, dtype=torch.bool) if replay is None else replay[:, 0] < 0  # (the selection's scores)
    torch.testing.assert_close(got[2][selected], want[2][selected], rtol=1e-6, atol=1e-6)
    at = ops.indexer_scores_at(q, w, keys, rows, got[0], got[1])
    torch.testing.assert_close(at, want[2].masked_fill(~want[1], float("-inf")), rtol=1e-6, atol=1e-6)

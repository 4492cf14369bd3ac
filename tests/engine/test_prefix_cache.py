"""The engine's prefix cache: with it, every output is what the engine computes without it.

Random request streams share prefixes of random lengths, arrive together and one after another, run
in chunks that cut compression blocks and checkpoints, in pools so small that checkpoints are evicted
and sequences preempted; greedy tokens are equal and logprobs within 1e-5 (bit-identical, routing
records included, in batch-invariant numerics).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dsv4 import Engine, SamplingParams
from dsv4.engine.outputs import RequestOutput
from dsv4.rl.policy import sync_weights
from dsv4.testing.models import greedy_reference, random_model

VOCAB = 320  # the conftest checkpoint's


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, VOCAB) for _ in range(n)]


def _waves(seed: int, waves: int, per_wave: int) -> list[list[list[int]]]:
    """Prompts in waves (each wave's arrive together): starts of a few shared bases, or an earlier
    wave's whole prompt (a resent conversation), plus a tail of their own."""
    rng = random.Random(seed)
    bases = [_tokens(rng, rng.randint(10, 50)) for _ in range(3)]
    out: list[list[list[int]]] = []
    for _ in range(waves):
        wave = []
        for _ in range(per_wave):
            if out and rng.random() < 0.5:
                start = rng.choice(rng.choice(out))
            else:
                base = rng.choice(bases)
                start = base[: rng.randint(0, len(base))]
            wave.append(start + _tokens(rng, rng.randint(1, 8)))
        out.append(wave)
    return out


def _run(engine: Engine, waves: list[list[list[int]]], params: list[SamplingParams]) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    for wave in waves:
        outs += engine.generate(wave, params[len(outs) : len(outs) + len(wave)])
    return outs


def _assert_same(cached: list[RequestOutput], plain: list[RequestOutput], *, exact: bool) -> None:
    for a, b in zip(cached, plain, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            assert x.logprobs is not None and y.logprobs is not None
            for got, want, token in zip(x.logprobs, y.logprobs, x.token_ids, strict=True):
                if exact:
                    assert got == want
                else:
                    assert abs(got[token].logprob - want[token].logprob) <= 1e-5


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(seed=9049, chunk=3, page=1, interval=3, tight=False, seqs=1)  # a batch's common start resumed from the cache
@given(seed=st.integers(0, 2**16), chunk=st.sampled_from([3, 5, 7, 16, 64]), page=st.sampled_from([1, 2, 4]),
       interval=st.sampled_from([3, 6, 11, 256]), tight=st.booleans(), seqs=st.sampled_from([1, 2, 4]))
def test_cached_equals_uncached_on_random_streams(
    model_dir: Path, seed: int, chunk: int, page: int, interval: int, tight: bool, seqs: int
) -> None:
    waves = _waves(seed, waves=3, per_wave=3)
    rng = random.Random(seed)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=True, logprobs=0)
              for _ in range(sum(map(len, waves)))]
    # tight: room for about two sequences and a checkpoint or two, so checkpoints are evicted and
    # sequences preempted
    room: dict[str, Any] = dict(kv_cache_tokens=120, window_checkpoints=1) if tight else {}
    options = dict(max_num_batched_tokens=chunk, page_size=page, max_num_seqs=seqs, **room)
    engine = Engine(model_dir, window_checkpoint_interval=interval, **options)
    cached = _run(engine, waves, params)
    plain = _run(Engine(model_dir, prefix_cache=False, **options), waves, params)
    _assert_same(cached, plain, exact=False)
    stats = engine.kv_stats()["prefix_cache"]
    assert stats["hit_tokens"] == sum(o.metrics.cached_tokens for o in cached)
    assert engine.kv_stats()["total"]["bytes"] == 0  # requests hold nothing; the cache what it holds
    engine.flush_cache()
    assert all(engine.pool.pages_used(s) == 0 for s in engine.pool.streams)


@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=5, page_size=2, window_checkpoint_interval=4),
                                     dict(max_num_batched_tokens=9, max_num_seqs=2, page_size=2, kv_cache_tokens=110,
                                          window_checkpoints=1)],
                         ids=["roomy", "tiny-chunks", "tight"])
def test_batch_invariant_outputs_are_bit_identical(model_dir: Path, options: dict) -> None:
    """In batch-invariant numerics a resumed prefix changes nothing: tokens, logprobs, chosen-token
    logprobs and routing records (the prefix's taken from the checkpoint) are bit-identical."""
    waves = _waves(7, waves=3, per_wave=3)
    params = [SamplingParams(n=2, temperature=1.0, seed=i, max_tokens=5, ignore_eos=True, logprobs=2)
              for i in range(9)]
    opts = dict(batch_invariant=True, return_token_logprobs=True, record_routing=True, **options)
    engine = Engine(model_dir, **opts)
    cached = _run(engine, waves, params)
    plain = _run(Engine(model_dir, prefix_cache=False, **opts), waves, params)
    assert engine.kv_stats()["prefix_cache"]["hit_tokens"] > 0
    _assert_same(cached, plain, exact=True)
    for a, b in zip(cached, plain, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_logprobs == y.token_logprobs
            assert x.routing is not None and y.routing is not None
            for mine, theirs in ((x.routing.experts, y.routing.experts), (x.routing.indexer, y.routing.indexer)):
                assert mine.keys() == theirs.keys()
                assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_conversation_resends_its_history_and_computes_only_the_new_turn(model_dir: Path) -> None:
    engine = Engine(model_dir)
    rng = random.Random(3)
    history = _tokens(rng, 30)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for turn in range(4):
        history += _tokens(rng, 5)  # the user's message
        before = engine.stats["prompt_tokens"]
        out = engine.generate([history], params)[0]
        # the previous turn's request was checkpointed where it ended: all of it but its last token
        assert out.metrics.cached_tokens == (0 if turn == 0 else len(history) - 5 - 1)
        assert engine.stats["prompt_tokens"] - before == len(history) - out.metrics.cached_tokens
        history += out.outputs[0].token_ids
    stats = engine.kv_stats()["prefix_cache"]
    assert stats["checkpoints"] >= 4 and 0.5 < stats["hit_rate"] < 1


def test_a_resent_prompt_resumes_at_its_last_token(model_dir: Path, ref_model: Any) -> None:
    engine = Engine(model_dir)
    prompt = _tokens(random.Random(4), 40)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = engine.generate([prompt], params)[0]
    again = engine.generate([prompt], params)[0]
    assert again.metrics.cached_tokens == len(prompt) - 1  # the prompt's end was checkpointed
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == greedy_reference(ref_model, prompt, 4)


def test_new_weights_flush_the_cache(model_dir: Path) -> None:
    """KV computed by old weights is never served after a weight update (RL's in-place weight sync)."""
    engine = Engine(model_dir)
    prompts = [p[0] for p in _waves(5, waves=3, per_wave=1)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.generate(prompts, params)
    assert engine.prefix_cache is not None and engine.prefix_cache.num_checkpoints > 0
    other = random_model(engine.model.config, seed=77)
    sync_weights(other, engine.model)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.metrics.cached_tokens == 0
        assert out.outputs[0].token_ids == greedy_reference(other, prompt, 5)


def test_an_aborted_request_leaves_its_prefix_cached(model_dir: Path) -> None:
    engine = Engine(model_dir, max_num_batched_tokens=16)
    prompt = _tokens(random.Random(6), 45)
    engine.add_request(prompt, SamplingParams(max_tokens=4), request_id="gone")
    engine.step()
    engine.step()  # 32 of its 45 prompt tokens computed
    engine.abort("gone")
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0]
    assert out.metrics.cached_tokens == 32


def test_the_cache_can_be_turned_off(model_dir: Path) -> None:
    engine = Engine(model_dir, prefix_cache=False)
    prompt = _tokens(random.Random(8), 40)
    for _ in range(2):
        out = engine.generate([prompt], SamplingParams(max_tokens=2))[0]
        assert out.metrics.cached_tokens == 0
    assert engine.prefix_cache is None and engine.kv_stats()["prefix_cache"]["enabled"] == 0
    assert all(engine.pool.pages_used(s) == 0 for s in engine.pool.streams)
    assert engine.flush_cache() == 0


def test_eviction_never_takes_a_running_requests_pages(model_dir: Path) -> None:
    """A pool with room for one request and one checkpoint: every new request evicts the previous
    checkpoint, and the running request's cache stays intact (its output is unchanged)."""
    options = dict(max_num_seqs=1, kv_cache_tokens=70, window_checkpoints=1, page_size=2, max_num_batched_tokens=8)
    engine = Engine(model_dir, **options)
    plain = Engine(model_dir, prefix_cache=False, **options)
    rng = random.Random(9)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompts = [_tokens(rng, rng.randint(20, 50)) for _ in range(6)]
    _assert_same(engine.generate(prompts, params), plain.generate(prompts, params), exact=False)
    assert engine.kv_stats()["prefix_cache"]["evictions"] > 0


def test_a_batch_sent_again_computes_one_token_per_prompt(model_dir: Path) -> None:
    """generate() prefills a batch's common start once; sent again, every prompt resumes from its own
    checkpoint instead (one token each to compute), with the same outputs."""
    engine = Engine(model_dir)
    rng = random.Random(12)
    system = _tokens(rng, 24)
    prompts = [system + _tokens(rng, rng.randint(2, 9)) for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = engine.generate(prompts, params)
    before = engine.stats["prompt_tokens"]
    again = engine.generate(prompts, params)
    assert engine.stats["prompt_tokens"] - before == len(prompts)
    assert [o.metrics.cached_tokens for o in again] == [len(p) - 1 for p in prompts]
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]

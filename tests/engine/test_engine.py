"""The engine: batched, chunked, preempted generation equals single-request full recompute."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dsv4 import Engine, SamplingParams
from dsv4.model import Transformer
from dsv4.kernels import CpuKernels
from dsv4.kernels.packed import mkl_packing_available
from dsv4.rl.policy import sync_weights
from dsv4.testing.models import greedy_reference, random_model

VOCAB = 320  # the conftest checkpoint's


_REFERENCE: dict[tuple[int, ...], list[int]] = {}


def _assert_nothing_held(engine: Engine) -> None:
    """No request holds a page; flushing the prefix cache then frees every page (nothing leaked)."""
    assert engine.kv_stats()["total"]["bytes"] == 0
    engine.flush_cache()
    assert all(engine.pool.pages_used(s) == 0 for s in engine.pool.streams)


def _reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    key = (*prompt, -n)
    if key not in _REFERENCE:
        _REFERENCE[key] = greedy_reference(model, prompt, n)
    return _REFERENCE[key]


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 45))] for _ in range(n)]


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # roomy: everything in one step
        dict(max_num_batched_tokens=7, page_size=4),  # chunk boundaries everywhere, inside blocks too
        dict(max_num_batched_tokens=16, max_num_seqs=3, page_size=2),  # few running at once
        dict(max_num_batched_tokens=12, max_num_seqs=4, page_size=2, kv_cache_tokens=60,
             window_checkpoints=0),  # forced preemption
    ],
    ids=["roomy", "tiny-chunks", "few-seqs", "preemption"],
)
def test_greedy_batched_equals_full_recompute(model_dir: Path, ref_model: Transformer, options: dict) -> None:
    engine = Engine(model_dir, **options)
    prompts = _prompts(10, seed=0)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        expected = _reference(ref_model, prompt, 12)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"
    if "kv_cache_tokens" in options:
        assert engine.stats["preemptions"] > 0
    assert sum(out.metrics.num_preemptions for out in outs) == engine.stats["preemptions"]
    _assert_nothing_held(engine)


def test_logprobs_match_plain_forward(model_dir: Path, ref_model: Transformer) -> None:
    engine = Engine(model_dir, max_num_batched_tokens=9)
    prompts = _prompts(4, seed=5)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        seq = out.outputs[0]
        ids = prompt + seq.token_ids
        with torch.no_grad():
            lp = torch.log_softmax(ref_model(torch.tensor([ids]))[0], -1)
        assert seq.logprobs is not None and len(seq.logprobs) == 6
        for k, tok in enumerate(seq.token_ids):
            row = lp[len(prompt) + k - 1]
            chosen = seq.logprobs[k][tok]
            assert abs(chosen.logprob - row[tok].item()) <= 1e-4
            assert chosen.rank == 1  # greedy picks the most likely token
            top = torch.topk(row, 3).indices.tolist()
            assert set(top) <= set(seq.logprobs[k])
        assert seq.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(seq.logprobs, seq.token_ids)))


def test_seeded_sampling_ignores_batch_companions(model_dir: Path) -> None:
    target = [5, 17, 99, 200, 3, 8]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = Engine(model_dir).generate([target], params)[0].outputs[0].token_ids
    others = _prompts(6, seed=9)
    mixed = Engine(model_dir, max_num_batched_tokens=11).generate(
        others[:3] + [target] + others[3:],
        [SamplingParams(temperature=0.7, seed=i, max_tokens=7) for i in range(3)]
        + [params]
        + [SamplingParams(temperature=0, max_tokens=4) for _ in range(3)],
    )[3].outputs[0].token_ids
    assert alone == mixed
    other_seed = Engine(model_dir).generate([target], params.model_copy(update={"seed": 4321}))[0]
    assert other_seed.outputs[0].token_ids != alone


def test_n_samples_are_distinct_and_reproducible(model_dir: Path) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = Engine(model_dir).generate([[4, 5, 6]], params)[0]
    b = Engine(model_dir).generate([[4, 5, 6]], params)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_stop_token_ids_and_max_tokens(model_dir: Path, ref_model: Transformer) -> None:
    prompt = [10, 20, 30, 40]
    free = greedy_reference(ref_model, prompt, 10, eos=set())
    stop_at = free[3]
    first = free.index(stop_at)
    out = Engine(model_dir).generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))
    seq = out[0].outputs[0]
    assert seq.token_ids == free[: first + 1]
    assert seq.finish_reason == "stop" and seq.stop_reason == stop_at


def test_stop_strings_cut_the_text(model_dir: Path) -> None:
    engine = Engine(model_dir)
    base = engine.generate(["hello"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    text = base.text
    assert len(text) >= 6, "the checkpoint must produce enough text for this test to mean anything"
    stop = text[3:5]
    seq = Engine(model_dir).generate(["hello"], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert seq.text == text[: text.index(stop)]


def test_text_and_token_prompts_agree(model_dir: Path) -> None:
    engine = Engine(model_dir)
    ids = engine.tokenizer.encode("The quick brown fox")
    a, b = engine.generate(["The quick brown fox", ids], SamplingParams(temperature=0, max_tokens=5))
    assert a.prompt_token_ids == ids and a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].text == engine.tokenizer.decode(a.outputs[0].token_ids)


def test_clear_errors(model_dir: Path) -> None:
    engine = Engine(model_dir, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([list(range(2, 40))])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, VOCAB + 5]])
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    unchunked = Engine(model_dir, max_model_len=32, chunked_prefill=False, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="chunked_prefill off"):  # it could never be scheduled
        unchunked.generate([list(range(2, 12))])
    assert not unchunked.has_unfinished()
    # nothing was left behind by the refused requests
    assert not engine.has_unfinished()
    out = engine.generate([[3, 4]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 30  # capped by max_model_len


def test_abort_frees_pages(model_dir: Path) -> None:
    engine = Engine(model_dir, max_num_batched_tokens=8)
    engine.add_request([7] * 30, SamplingParams(max_tokens=50), request_id="a")
    engine.add_request([8] * 5, SamplingParams(max_tokens=3), request_id="b")
    for _ in range(3):
        engine.step()
    final = engine.abort("a")
    assert final is not None and final.outputs[0].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    _assert_nothing_held(engine)
    assert engine.abort("a") is None


def test_kv_stats_are_exact(model_dir: Path) -> None:
    """Bytes per token reported == bytes of the pages the running sequences hold / their cached tokens."""
    engine = Engine(model_dir, page_size=4)
    for n in (9, 30):
        engine.add_request([5] * n, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    stats = engine.kv_stats()
    pool = engine.pool
    context = sum(s.num_computed for r in engine.requests.values() for s in r.seqs)
    assert stats["total"]["context_tokens"] == context == 39
    held = cached = 0
    for name, spec in pool.streams.items():
        owners = pool.owners(name)  # type: ignore[attr-defined]
        requests = {p for rid, pages in owners.items() if rid >= 0 for p in pages}  # checkpoints are < 0
        checkpoints = {p for rid, pages in owners.items() if rid < 0 for p in pages} - requests
        row_bytes = pool.page_size * spec.width * 4 * len(spec.layers)  # type: ignore[attr-defined]
        assert stats[name]["bytes"] == len(requests) * row_bytes
        assert stats[name]["cached_bytes"] == len(checkpoints) * row_bytes
        held += len(requests) * row_bytes
        cached += len(checkpoints) * row_bytes
    assert checkpoints  # the 30-token prompt is checkpointed at its last token (a 9-token one is too short)
    assert stats["total"]["bytes_per_token"] == held / context
    assert stats["total"]["cached_bytes"] == stats["prefix_cache"]["bytes"] == cached


def test_packed_weights_option(model_dir: Path, ref_model: Transformer) -> None:
    def packs(engine: Engine) -> bool:
        engine.generate([[1, 2, 3, 4, 5]] * 4, SamplingParams(max_tokens=2))  # a 4-row decode: packing range
        return "mkl_packed" in engine.model.head.cache

    default = Engine(model_dir)
    assert isinstance(default.model.kernels.inference, CpuKernels)
    assert packs(default) == mkl_packing_available()
    assert not packs(Engine(model_dir, packed_weights=False))
    invariant = Engine(model_dir, batch_invariant=True, expert_executor="reference")
    assert not packs(invariant)  # exact arithmetic kept
    # packed or not, the same greedy tokens as the plain model
    prompts = _prompts(6, seed=9)
    outs = Engine(model_dir, packed_weights=False).generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _reference(ref_model, prompt, 8)


def test_engine_serves_synced_weights_not_stale_packed_copies(model_dir: Path) -> None:
    engine = Engine(model_dir)  # packed by default where MKL exists
    prompts = _prompts(6, seed=11)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    engine.generate(prompts, params)  # packs every weight it uses
    other = random_model(engine.model.config, seed=99)
    sync_weights(other, engine.model)  # in-place copies, as RL's weight sync does
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        seq = out.outputs[0]
        assert seq.token_ids == greedy_reference(other, prompt, 6)
        with torch.no_grad():
            lp = torch.log_softmax(other(torch.tensor([prompt + seq.token_ids]))[0], -1)
        for k, tok in enumerate(seq.token_ids):
            assert abs(seq.logprobs[k][tok].logprob - lp[len(prompt) + k - 1, tok].item()) <= 1e-4


# ---------------------------------------------------------------------------------------------- n > 1
def _samples(model_dir: Path, share: bool, prompts: list[list[int]], params: SamplingParams, **options: object):
    """``share=False``: every sample computes its prompt itself (no copies, no prefix cache)."""
    engine = Engine(model_dir, share_prompt=share, prefix_cache=share, **options)
    outs = engine.generate(prompts, params)
    _assert_nothing_held(engine)
    return engine, outs


def _assert_same_outputs(got: list, want: list) -> None:
    """Every sample's tokens, logprobs (raw and top-N) and routing records are equal."""
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids and x.token_logprobs == y.token_logprobs
            assert x.logprobs == y.logprobs
            assert x.routing is not None and y.routing is not None
            for mine, theirs in ((x.routing.experts, y.routing.experts), (x.routing.indexer, y.routing.indexer)):
                assert mine.keys() == theirs.keys()
                assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# Where copied caches meet the engine's edge cases: room for everything, chunks that end anywhere, a
# pool so small that sequences are preempted and recomputed.
SHARING_OPTIONS = pytest.mark.parametrize(
    "options",
    [dict(), dict(max_num_batched_tokens=7, page_size=2), dict(max_num_batched_tokens=12, max_num_seqs=5,
                                                               page_size=2, kv_cache_tokens=90,
                                                               window_checkpoints=0)],
    ids=["roomy", "tiny-chunks", "preemption"],
)


@SHARING_OPTIONS
def test_a_prompt_sampled_n_times_is_prefilled_once_with_the_same_results(model_dir: Path, options: dict) -> None:
    """share_prompt copies the prompt's KV (window past its recycling, compressed entries, open blocks)
    into the other samples: in batch-invariant numerics every token, logprob and routing record equals
    what each sample prefilling the prompt itself gives."""
    prompts = [_prompts(1, seed=3)[0] * 2, [9, 10, 11], [40]]  # 2-90 tokens: past the window of 8, many blocks
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=9, ignore_eos=True, logprobs=2)
    opts = dict(batch_invariant=True, return_token_logprobs=True, record_routing=True, **options)
    shared_engine, shared = _samples(model_dir, True, prompts, params, **opts)
    alone_engine, alone = _samples(model_dir, False, prompts, params, **opts)
    _assert_same_outputs(shared, alone)
    assert len({tuple(o.token_ids) for o in shared[0].outputs}) > 1
    if "kv_cache_tokens" not in options:  # (preemption recomputes prompts, so counts differ there)
        per_prompt = sum(len(p) for p in prompts)
        assert shared_engine.stats["prompt_tokens"] == per_prompt
        assert alone_engine.stats["prompt_tokens"] == 4 * per_prompt


def test_shared_prompts_greedy_equals_recompute_on_the_fast_paths(model_dir: Path, ref_model: Transformer) -> None:
    prompts = _prompts(4, seed=5)
    params = SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True)
    _, outs = _samples(model_dir, True, prompts, params, max_num_batched_tokens=16)
    for prompt, out in zip(prompts, outs, strict=True):
        want = _reference(ref_model, prompt, 10)
        assert [o.token_ids for o in out.outputs] == [want] * 3


def test_abort_before_the_shared_prompt_is_prefilled(model_dir: Path) -> None:
    engine = Engine(model_dir, max_num_batched_tokens=8)
    engine.add_request([7] * 30, SamplingParams(n=3, max_tokens=5), request_id="a")
    engine.add_request([8] * 5, SamplingParams(n=2, max_tokens=3, ignore_eos=True), request_id="b")
    engine.step()
    final = engine.abort("a")
    assert final is not None and [o.finish_reason for o in final.outputs] == ["abort"] * 3
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [len(o.token_ids) for o in outs[-1].outputs] == [3, 3]
    _assert_nothing_held(engine)


def test_samples_that_find_no_pages_prefill_themselves(model_dir: Path) -> None:
    """A pool too small to copy the prompt's cache at once: the samples queue and prefill later."""
    params = SamplingParams(n=4, temperature=0, max_tokens=4, ignore_eos=True)
    prompt = _prompts(1, seed=8)[0] * 2
    _, shared = _samples(model_dir, True, [prompt], params, max_num_seqs=2, page_size=2, kv_cache_tokens=110,
                        window_checkpoints=0)
    _, alone = _samples(model_dir, False, [prompt], params, max_num_seqs=2, page_size=2, kv_cache_tokens=110,
                        window_checkpoints=0)
    assert [o.token_ids for o in shared[0].outputs] == [o.token_ids for o in alone[0].outputs]


def test_a_checkpoint_path_with_a_config_object(model_dir: Path, tmp_path: Path) -> None:
    """``Engine(path, config=EngineConfig(...))`` serves that checkpoint with those options."""
    from dsv4.engine.engine import EngineConfig

    engine = Engine(model_dir, config=EngineConfig(max_num_seqs=3))
    assert engine.config.model == str(model_dir) and engine.config.max_num_seqs == 3
    assert engine.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids
    same = Engine(model_dir, config=EngineConfig(model=str(model_dir)))
    assert same.config.model == str(model_dir)
    with pytest.raises(ValueError, match="two checkpoints given"):
        Engine(model_dir, config=EngineConfig(model=str(tmp_path)))


# ------------------------------------------------------------------------------ prompts with a common start
def _with_common_start(n: int, seed: int, start: int = 27) -> list[list[int]]:
    common = [random.Random(seed).randrange(2, VOCAB) for _ in range(start)]
    return [common + p for p in _prompts(n, seed=seed + 1)]


@SHARING_OPTIONS
def test_generate_prefills_the_prompts_common_start_once(model_dir: Path, options: dict) -> None:
    """Prompts that start alike (a system prompt) share that start's KV: every token, logprob and routing
    record equals each prompt prefilling everything itself, in batch-invariant numerics."""
    prompts = _with_common_start(4, seed=21)
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=1)
    opts = dict(batch_invariant=True, return_token_logprobs=True, record_routing=True, **options)
    shared_engine, shared = _samples(model_dir, True, prompts, params, **opts)
    alone_engine, alone = _samples(model_dir, False, prompts, params, **opts)
    _assert_same_outputs(shared, alone)
    if "kv_cache_tokens" in options:
        assert shared_engine.stats["preemptions"] > 0
    else:  # the start once, each prompt's rest once
        assert shared_engine.stats["prompt_tokens"] == 27 + sum(len(p) - 27 for p in prompts)
        assert alone_engine.stats["prompt_tokens"] == 2 * sum(len(p) for p in prompts)


def test_common_start_greedy_equals_recompute_on_the_fast_paths(model_dir: Path, ref_model: Transformer) -> None:
    prompts = _with_common_start(3, seed=31, start=40)
    _, outs = _samples(model_dir, True, prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _reference(ref_model, prompt, 8)


def test_short_common_starts_and_aborted_waiters(model_dir: Path) -> None:
    engine = Engine(model_dir)
    short = [[5] * 10 + p for p in _prompts(3, seed=41)]  # under 16 tokens in common: nothing shared
    engine.generate(short, SamplingParams(max_tokens=2))
    assert engine.stats["prompt_tokens"] == sum(len(p) for p in short)
    # every request waiting for the common start is aborted before it is computed: the start goes too
    engine = Engine(model_dir, max_num_batched_tokens=8)
    step = engine.step

    def step_then_abort() -> list:
        outs = step()  # the start's first chunk
        for rid in list(engine.requests):
            engine.abort(rid)
        return outs

    engine.step = step_then_abort  # type: ignore[method-assign]
    assert list(engine.iter_generate(_with_common_start(2, seed=42), SamplingParams(max_tokens=3))) == []
    assert not engine.scheduler.has_work() and not engine.sharing.starts
    _assert_nothing_held(engine)


def test_generate_queues_nothing_when_one_prompt_is_bad(model_dir: Path) -> None:
    engine = Engine(model_dir)
    for bad in ([], [VOCAB + 5], ["x"]):
        with pytest.raises((ValueError, TypeError)):
            engine.generate([[5, 6, 7], bad], SamplingParams(max_tokens=2))  # type: ignore[list-item]
        assert not engine.has_unfinished() and not engine.scheduler.has_work()
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].finished


def test_the_same_checkpoint_by_a_relative_path(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv4.engine.engine import EngineConfig

    monkeypatch.chdir(model_dir.parent)
    engine = Engine(model_dir.name, config=EngineConfig(model=str(model_dir)))
    assert engine.config.model == str(model_dir)

"""MTP speculative decoding: exact outputs (greedy token for token, sampled in distribution), exact
rollback of every KV stream, and its interplay with the prefix cache, chunked prefill, preemption, n > 1,
seeds, logprobs, stop strings and max_tokens."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsv4
from dsv4 import Engine, SamplingParams
from dsv4.core.config import ModelConfig
from dsv4.engine.request import Sequence
from dsv4.engine.speculative import Drafter
from dsv4.model import Transformer
from dsv4.testing.models import random_model

VOCAB = 320


def _model(vocab: int = VOCAB, seed: int = 21) -> Transformer:
    # window 8, ratio-4 and ratio-8 layers, one MTP block: drafts cross many compression blocks
    return random_model(ModelConfig.tiny(vocab_size=vocab), seed=seed)


def _prompts(n: int, rng: random.Random, longest: int = 40) -> list[list[int]]:
    return [[rng.randrange(10, VOCAB) for _ in range(rng.randint(1, longest))] for _ in range(n)]


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model()


class _Oracle:
    """Drafts the tokens a plain greedy run produced, each replaced by a wrong one with probability
    ``noise``: acceptance is then known exactly, and every accept / reject pattern occurs."""

    def __init__(self, truth: dict[tuple[int, ...], list[int]], noise: float, seed: int = 0) -> None:
        self.truth, self.noise, self.rng = truth, noise, random.Random(seed)

    def __call__(self, drafter: Drafter, seqs: list[Sequence], logits: torch.Tensor, streams: torch.Tensor) -> None:
        Drafter.draft(drafter, seqs, logits, streams)  # the MTP rows past the last token are written as usual
        for seq in seqs:
            out = self.truth[tuple(seq.prompt_ids)]
            done = len(seq.output_ids)
            true = out[done : done + len(seq.draft_ids)]
            seq.draft_ids = [t if self.rng.random() >= self.noise else (t + 1) % VOCAB for t in true]


def _spec_engine(model: Transformer, oracle: _Oracle | None = None, **options: object) -> Engine:
    options.setdefault("speculative_max_batch", 64)  # speculating whatever the batch
    engine = Engine(model, speculative="mtp", **options)  # type: ignore[arg-type]
    if oracle is not None:
        assert engine.drafter is not None
        drafter = engine.drafter
        drafter.draft = lambda seqs, logits, streams: oracle(drafter, seqs, logits, streams)  # type: ignore[method-assign]
    return engine


def _tokens(outs: list[dsv4.RequestOutput]) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


# --------------------------------------------------------------------------------------------------
def test_greedy_equals_plain_mixed_batch(model: Transformer) -> None:
    """The MTP block's own drafts: greedy outputs equal plain decoding's, token for token, over a batch
    mixing lengths, with chunked prefill cutting prompts and the prefix cache on."""
    rng = random.Random(0)
    prompts = _prompts(10, rng)
    params = [SamplingParams(max_tokens=rng.randint(1, 30), temperature=0, ignore_eos=True) for _ in prompts]
    plain = Engine(model, max_num_batched_tokens=24).generate(prompts, params)
    engine = _spec_engine(model, max_num_batched_tokens=24)
    spec = engine.generate(prompts, params)
    assert _tokens(spec) == _tokens(plain)
    assert engine.stats["spec_steps"] > 0 and engine.stats["spec_draft_tokens"] > 0


@pytest.mark.parametrize("noise", [0.0, 0.3, 1.0])
def test_oracle_drafts_greedy_exact_and_accounted(model: Transformer, noise: float) -> None:
    """Drafts right, partly wrong, always wrong: the same tokens; accepted drafts are exactly the
    leading right ones, and the accept length in the outputs says so."""
    rng = random.Random(1)
    prompts = _prompts(6, rng)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = Engine(model).generate(prompts, params)
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, plain, strict=True)}
    engine = _spec_engine(model, _Oracle(truth, noise, seed=2), num_speculative_tokens=4)
    spec = engine.generate(prompts, params)
    assert _tokens(spec) == _tokens(plain)
    stats = engine.stats
    assert stats["spec_draft_tokens"] > 0
    if noise == 0.0:
        # every draft stands: 5 tokens per verifying step, except where max_tokens cuts the drafts
        assert stats["spec_accepted_tokens"] >= 0.7 * stats["spec_draft_tokens"]
        assert all(o.metrics is not None and (o.metrics.spec_accept_length or 0) > 3 for o in spec)
    elif noise == 1.0:
        assert stats["spec_accepted_tokens"] == 0
        assert all(o.metrics is not None and o.metrics.spec_accept_length == 1.0 for o in spec)
    else:
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    verified, accepted = engine.spec_position_verified, engine.spec_position_accepted
    assert all(a <= v for a, v in zip(accepted, verified, strict=True))
    assert accepted == sorted(accepted, reverse=True)  # a later draft stands only if the earlier ones did


def _readable_rows(engine: Engine, rid: int, num_tokens: int) -> dict[tuple[int, str], torch.Tensor]:
    """Every row a request of ``num_tokens`` tokens can read, per (main layer, stream)."""
    pool = engine.pool
    main = engine.model.config.num_hidden_layers
    out = {}
    for name, spec in pool.streams.items():
        first, stop = spec.keep_from(num_tokens), spec.length(num_tokens)
        logical = torch.arange(first, stop)
        slots = pool.slots(name, [rid], torch.zeros_like(logical), logical)
        for layer in spec.layers:
            if layer < main:  # the MTP block's rows are the drafter's own
                out[(layer, name)] = pool.buffer(layer, name)[slots].clone()
    return out


def test_rollback_leaves_no_trace() -> None:
    """After every step, every row a speculating sequence can read equals the row a run that never
    drafted holds: window rows, open-block compressor rows, compressed entries and indexer keys
    (batch-invariant numerics, so equal means bit for bit)."""
    model = _model()
    rng = random.Random(3)
    prompts = _prompts(4, rng, longest=20)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    truth = {tuple(p): o.outputs[0].token_ids
             for p, o in zip(prompts, Engine(model, batch_invariant=True).generate(prompts, params), strict=True)}
    engine = _spec_engine(model, _Oracle(truth, 0.4, seed=4), batch_invariant=True, num_speculative_tokens=3,
                          prefix_cache=False)
    replay = Engine(model, batch_invariant=True, prefix_cache=False)
    reqs = [engine.add_request(p, params) for p in prompts]
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for req in reqs:
            seq = req.seqs[0]
            if seq.finished or seq.num_computed == 0:
                continue
            n = seq.num_computed
            # the same tokens computed by a plain engine, without drafts
            probe = replay.add_request(seq.tokens(0, n), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
            while probe.seqs[0].num_computed < n:
                replay.step()
            expected = _readable_rows(replay, probe.seqs[0].seq_id, n)
            got = _readable_rows(engine, seq.seq_id, n)
            for key, rows in expected.items():
                if key[1].endswith(".ient"):
                    # indexer keys differ by 1 ulp between a block closed in a prefill and in a decode step,
                    # drafts or not (the pooling sum's vectorisation depends on the entries per step)
                    torch.testing.assert_close(got[key], rows, rtol=0, atol=1e-6)
                else:
                    assert torch.equal(got[key], rows), f"{key} differs after {n} tokens"
            replay.abort(probe.request_id)
            checked += 1
    assert checked > 10
    assert 0 < engine.stats["spec_accepted_tokens"] < engine.stats["spec_draft_tokens"]


def test_seeded_sampling_is_plain_decodings() -> None:
    """Same seed, same tokens as plain decoding, whatever else shares the batch and whether speculation
    runs or the policy pauses it (each token is drawn from the plain path's random numbers; batch-invariant
    numerics, so the logits of a verifying row are a decode step's exactly)."""
    model = _model()
    rng = random.Random(5)
    prompts = _prompts(6, rng)
    params = [SamplingParams(max_tokens=6 + 4 * i, temperature=0.8, top_p=0.9, seed=100 + i, ignore_eos=True)
              for i in range(6)]  # the batch thins as they end: a paused policy starts speculating mid-way
    want = Engine(model, batch_invariant=True).generate(prompts, params)
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, want, strict=True)}
    for options in (dict(), dict(speculative_max_batch=3)):  # always, and paused while more than 3 sample
        engine = _spec_engine(model, _Oracle(truth, 0.3, seed=6), batch_invariant=True, **options)
        got = engine.generate(prompts, params)
        assert _tokens(got) == _tokens(want)
        assert 0 < engine.stats["spec_accepted_tokens"] < engine.stats["spec_draft_tokens"]
    alone = _spec_engine(model).generate([prompts[2]], params[2])[0].outputs[0].token_ids
    crowd = _spec_engine(model).generate(prompts, params)[2].outputs[0].token_ids
    assert alone == crowd


def _first_tokens(engine: Engine, prompt: list[int], count: int, length: int, seed0: int) -> Iterator[tuple[int, ...]]:
    params = [SamplingParams(max_tokens=length, temperature=1.0, seed=seed0 + i, ignore_eos=True) for i in range(count)]
    for out in engine.generate([prompt] * count, params):
        yield tuple(out.outputs[0].token_ids)


def _chi_square_p(a: Counter[int], b: Counter[int]) -> float:
    """p-value of the two-sample chi-square test that ``a`` and ``b`` come from one distribution."""
    keys = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    stat, dof = 0.0, -1
    for k in keys:
        tot = a[k] + b[k]
        if tot < 5:
            continue
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (a[k] - ea) ** 2 / ea + (b[k] - eb) ** 2 / eb
        dof += 1
    # Wilson–Hilferty: chi-square(dof) tail through the normal
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_distribution_is_the_targets() -> None:
    """Temperature 1 on a 16-token vocabulary, the MTP block's own drafts, seeds that differ between the
    arms: the tokens at positions 1-3 (after drafts were judged) follow the distribution of plain sampling
    (chi-square), with drafts standing and falling."""
    model = _model(vocab=16, seed=8)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    n = 1500
    plain = list(_first_tokens(Engine(model, prefix_cache=False, max_num_seqs=256), prompt, n, 4, 0))
    engine = Engine(model, speculative="mtp", prefix_cache=False, max_num_seqs=256, speculative_max_batch=256,
                    num_speculative_tokens=2)
    spec = list(_first_tokens(engine, prompt, n, 4, 10**6))
    assert 0 < engine.stats["spec_accepted_tokens"] < engine.stats["spec_draft_tokens"]
    for pos in (1, 2, 3):
        p = _chi_square_p(Counter(t[pos] for t in plain), Counter(t[pos] for t in spec))
        assert p > 1e-3, f"position {pos}: p = {p:.2e}"
    joint = _chi_square_p(Counter(t[1] * 16 + t[2] for t in plain), Counter(t[1] * 16 + t[2] for t in spec))
    assert joint > 1e-3


def test_logprobs_stop_strings_max_tokens_and_n(model: Transformer) -> None:
    """Logprobs of every token, stop tokens inside an accepted run of drafts, max_tokens cutting drafts,
    n > 1 sharing its prompt: all as plain decoding gives them."""
    rng = random.Random(6)
    prompts = _prompts(4, rng)
    plain_engine = Engine(model)
    base = plain_engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, base, strict=True)}
    stop_tok = base[0].outputs[0].token_ids[7]
    params = [SamplingParams(max_tokens=30, temperature=0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_tok], ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, n=3, ignore_eos=True)]
    want = Engine(model).generate(prompts, params)
    got = _spec_engine(model, _Oracle(truth, 0.0)).generate(prompts, params)
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got, want, strict=True):
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert gc.finish_reason == wc.finish_reason and gc.stop_reason == wc.stop_reason
            if wc.logprobs is not None:
                assert gc.logprobs is not None and len(gc.logprobs) == len(wc.logprobs)
                for a, b in zip(gc.logprobs, wc.logprobs, strict=True):
                    assert a.keys() == b.keys()
                    for t in a:
                        assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) and a[t].rank == b[t].rank


def test_preemption_and_prefix_cache(model: Transformer) -> None:
    """A pool too small for every sequence preempts speculating ones (their drafts go); a conversation
    resumes from the prefix cache and speculates from there: the same tokens as plain decoding."""
    rng = random.Random(7)
    prompts = _prompts(8, rng)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    small = dict(max_num_batched_tokens=16, max_num_seqs=4, page_size=2, kv_cache_tokens=80, window_checkpoints=0)
    want = Engine(model, **small).generate(prompts, params)  # type: ignore[arg-type]
    engine = _spec_engine(model, **small)
    got = engine.generate(prompts, params)
    assert _tokens(got) == _tokens(want)
    assert engine.stats["preemptions"] > 0
    # a second turn: prompt + answer + more, resumed from the cache
    turn2 = [p + o.outputs[0].token_ids + [11, 12, 13] for p, o in zip(prompts[:3], got[:3], strict=True)]
    want2 = Engine(model).generate(turn2, params)
    engine2 = _spec_engine(model)
    engine2.generate([p + o.outputs[0].token_ids for p, o in zip(prompts[:3], got[:3], strict=True)],
                     SamplingParams(max_tokens=1, temperature=0))
    got2 = engine2.generate(turn2, params)
    assert _tokens(got2) == _tokens(want2)
    assert all(o.metrics is not None and o.metrics.cached_tokens > 0 for o in got2)


def test_policy_turns_speculation_off_for_large_batches(model: Transformer) -> None:
    """More sequences sampling than speculative_max_batch: no drafts, the same tokens."""
    rng = random.Random(9)
    prompts = _prompts(6, rng, longest=10)
    # as sequences end, fewer than speculative_max_batch remain and speculation starts mid-sequence
    params = [SamplingParams(max_tokens=6 + 5 * i, temperature=0, ignore_eos=True) for i in range(6)]
    engine = _spec_engine(model, speculative_max_batch=2)
    got = engine.generate(prompts, params)
    assert _tokens(got) == _tokens(Engine(model).generate(prompts, params))
    assert 0 < engine.stats["spec_steps"] < engine.stats["generated_tokens"]
    assert got[0].metrics is not None and got[0].metrics.spec_steps == 0  # ended before the batch thinned


def test_needs_an_mtp_block() -> None:
    model = random_model(ModelConfig.tiny(vocab_size=64, num_nextn_predict_layers=0), seed=1)
    with pytest.raises(ValueError, match="MTP block"):
        Engine(model, speculative="mtp")


def _mtp_window(engine: Engine, rid: int, lo: int, hi: int) -> torch.Tensor:
    pool, layer = engine.pool, engine.model.config.num_hidden_layers
    logical = torch.arange(lo, hi)
    return pool.buffer(layer, "win")[pool.slots("win", [rid], torch.zeros_like(logical), logical)].clone()


def test_mtp_rows_after_resume_fork_and_verify() -> None:
    """The MTP block's window rows a speculating sequence holds equal those a fresh prefill of its tokens
    writes, after drafts were verified, after resuming from the prefix cache (its row at the last cached
    token rewritten with its own next token) and for samples given their prompt's cache (n > 1)."""
    model = _model()
    rng = random.Random(11)
    first = _prompts(2, rng, longest=30)
    options = dict(batch_invariant=True, window_checkpoint_interval=16)
    engine = Engine(model, speculative="mtp", **options)  # type: ignore[arg-type]
    done = engine.generate(first, SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    follow = [p + o.outputs[0].token_ids + [7, 8] for p, o in zip(first, done, strict=True)]
    reqs = [engine.add_request(follow[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)),
            engine.add_request(follow[1], SamplingParams(max_tokens=30, n=3, temperature=1.0, seed=3, ignore_eos=True))]
    probe_engine = Engine(model, speculative="mtp", prefix_cache=False, **options)  # type: ignore[arg-type]
    window = model.config.sliding_window
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for seq in (s for r in reqs for s in r.seqs):
            if seq.finished or seq.num_computed == 0:
                continue
            n = seq.num_computed
            assert seq.mtp_computed == n
            probe = probe_engine.add_request(seq.tokens(0, n + 1), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
            while probe.seqs[0].num_computed < n + 1:
                probe_engine.step()
            lo = max(0, n - window + 2)  # what the probe, a token further on, still holds
            want = _mtp_window(probe_engine, probe.seqs[0].seq_id, lo, n)
            got = _mtp_window(engine, seq.seq_id, lo, n)
            bad = [lo + j for j in range(n - lo) if not torch.allclose(got[j], want[j], rtol=0, atol=1e-6)]
            assert not bad, f"{(probe.seqs[0].num_computed, probe.seqs[0].mtp_computed, probe.seqs[0].num_tokens, probe_engine.stats)} {(seq.seq_id, seq.index, n, lo, len(seq.prompt_ids), bad)} {got[[b - lo for b in bad]].abs().sum(-1).tolist()} {want[[b - lo for b in bad]].abs().sum(-1).tolist()} {engine.stats}"
            probe_engine.abort(probe.request_id)
            checked += 1
    assert checked > 20
    assert all(o.metrics is not None and o.metrics.cached_tokens > 0 for o in (r.output() for r in reqs))


def test_grammar_constrained_sequences_do_not_speculate(model: Transformer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A structured-output request beside speculating ones: it decodes plainly (drafts are not
    constrained) and matches its regex; the others are unchanged."""
    import re

    from dsv4.testing.tokenizers import write_byte_tokenizer

    write_byte_tokenizer(tmp_path, vocab_size=VOCAB)
    regex = r"[a-z]{2,6}@(foo|bar)\.(com|org)"
    prompts = ["hello there", "the rain in spain", "stays mainly"]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, seed=5, structured_outputs={"regex": regex}),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)]
    engine = Engine(model, tokenizer=tmp_path, speculative="mtp")
    got = engine.generate(prompts, params)
    want = Engine(model, tokenizer=tmp_path).generate(prompts, params)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert got[2].outputs[0].token_ids == want[2].outputs[0].token_ids
    constrained = got[1]
    assert constrained.metrics is not None and constrained.metrics.spec_steps == 0
    assert got[0].metrics is not None and got[0].metrics.spec_steps > 0
    if constrained.outputs[0].finish_reason == "stop":
        assert re.fullmatch(regex, constrained.outputs[0].text)


def test_stop_strings_inside_accepted_drafts(model: Transformer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A stop string that ends inside a run of accepted drafts: the text, tokens and finish reason of
    plain decoding (the tokens after the stop are not kept)."""
    from dsv4.testing.tokenizers import write_byte_tokenizer

    write_byte_tokenizer(tmp_path, vocab_size=VOCAB)
    prompts = ["once upon a time", "the quick brown fox"]
    plain = Engine(model, tokenizer=tmp_path)
    free = plain.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    truth = {tuple(o.prompt_token_ids): o.outputs[0].token_ids for o in free}
    stops = [o.outputs[0].text[5:8] for o in free]  # text the greedy continuation is known to reach
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[s]) for s in stops]
    want = plain.generate(prompts, params)
    engine = _spec_engine(model, _Oracle(truth, 0.0), tokenizer=tmp_path)
    got = engine.generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        assert (g.outputs[0].text, g.outputs[0].token_ids, g.outputs[0].finish_reason, g.outputs[0].stop_reason) == (
            w.outputs[0].text, w.outputs[0].token_ids, w.outputs[0].finish_reason, w.outputs[0].stop_reason)
        assert w.outputs[0].finish_reason == "stop"
    assert engine.stats["spec_accepted_tokens"] > 0


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), chunk=st.sampled_from([4, 9, 64]), page=st.sampled_from([2, 4, 16]),
       tight=st.booleans(), noise=st.sampled_from([0.0, 0.3, 1.0]), k=st.sampled_from([1, 3]))
def test_speculation_changes_nothing_on_random_streams(model: Transformer, seed: int, chunk: int, page: int,
                                                       tight: bool, noise: float, k: int) -> None:
    """RL rollouts with speculation: random requests (greedy and seeded sampling, n = 1 or 2), chunked
    prefill, pools tight enough to preempt; in batch-invariant numerics the tokens, logprobs, chosen-token
    logprobs and routing records are bit-identical to decoding without drafts."""
    rng = random.Random(seed)
    prompts = _prompts(5, rng, longest=24)
    params = [SamplingParams(n=rng.choice([1, 2]), temperature=rng.choice([0.0, 0.9]), seed=i,
                             max_tokens=rng.randint(1, 16), ignore_eos=True, logprobs=1) for i in range(5)]
    room = dict(kv_cache_tokens=100, window_checkpoints=1, max_num_seqs=3) if tight else {}
    options = dict(batch_invariant=True, return_token_logprobs=True, record_routing=True,
                   max_num_batched_tokens=chunk, page_size=page, **room)
    plain = Engine(model, **options).generate(prompts, params)  # type: ignore[arg-type]
    truth = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, plain, strict=True)}
    engine = _spec_engine(model, _Oracle(truth, noise, seed=seed), num_speculative_tokens=k, **options)
    spec = engine.generate(prompts, params)
    assert engine.stats["spec_draft_tokens"] > 0
    for a, b in zip(spec, plain, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (x.token_ids, x.finish_reason, x.logprobs, x.token_logprobs) == (
                y.token_ids, y.finish_reason, y.logprobs, y.token_logprobs)
            assert x.routing is not None and y.routing is not None
            for mine, theirs in ((x.routing.experts, y.routing.experts), (x.routing.indexer, y.routing.indexer)):
                assert mine.keys() == theirs.keys()
                assert all(torch.equal(mine[key], theirs[key]) for key in mine)

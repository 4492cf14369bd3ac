"""SamplingParams validation, and the Sampler's filters, penalties, seeds and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.engine.sampling import Sampler, SamplingParams, SequenceSampling, _top_p_rows, sequence_seed

# ------------------------------------------------------------------------------------------------
# SamplingParams


def test_defaults_equal_vllm() -> None:
    assert SamplingParams().model_dump() == {
        "n": 1, "max_tokens": 16, "min_tokens": 0, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
        "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "seed": None, "stop": [], "stop_token_ids": [], "ignore_eos": False, "logprobs": None,
        "include_stop_str_in_output": False, "skip_special_tokens": True, "structured_outputs": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n", 0, "n must be between 1 and 64, got 0"),
        ("n", 65, "n must be between 1 and 64, got 65"),
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("min_tokens", -1, "min_tokens must be >= 0, got -1"),
        ("temperature", -1, "temperature must be in [0, 1e4], got -1"),
        ("top_p", 0, "top_p must be in (0, 1], got 0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_k", -2, "top_k must be -1 or 0 (off) or >= 1, got -2"),
        ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"),
        ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
        ("repetition_penalty", 0, "repetition_penalty must be in [1e-4, 1e4], got 0"),
        ("frequency_penalty", 2.5, "frequency_penalty must be in [-2, 2], got 2.5"),
        ("presence_penalty", -3, "presence_penalty must be in [-2, 2], got -3"),
        ("logprobs", 21, "logprobs must be None or between 0 and 20, got 21"),
        ("logprobs", -1, "logprobs must be None or between 0 and 20, got -1"),
        ("stop", "", "stop strings must be non-empty"),
        ("stop", ["a", ""], "stop strings must be non-empty"),
        ("stop_token_ids", [3, -1], "stop_token_ids must be >= 0, got [3, -1]"),
        ("temperature", "hot", "temperature: Input should be a valid number"),
        ("temperature", math.inf, "temperature: Input should be a finite number"),
        ("best_of", 2, "best_of: Extra inputs are not permitted"),
    ],
)
def test_invalid_values_name_field_and_range(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert type(info.value) is ValueError  # pydantic's error is wrapped, not leaked
    assert message in str(info.value)


def test_min_tokens_cannot_exceed_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_accepted_values() -> None:
    p = SamplingParams(stop="###", temperature=0, top_k=0, n=64, logprobs=0, seed=-5)
    assert p.stop == ["###"]
    assert p.greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(top_k=2, temperature=0.5).greedy
    with pytest.raises(ValueError):  # frozen
        p.n = 2  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------
# helpers


def _seqs(params: SamplingParams, count: int, first_seed: int = 0) -> list[SequenceSampling]:
    """``count`` sequences with the same params and seeds first_seed, first_seed + 1, ..."""
    return [SequenceSampling(params.model_copy(update={"seed": first_seed + i})) for i in range(count)]


def _observed(logits: torch.Tensor, params: SamplingParams, draws: int = 400) -> set[int]:
    """The tokens drawn from one row of logits by ``draws`` differently seeded sequences (one batch)."""
    out = Sampler().sample(logits.expand(draws, -1), _seqs(params, draws))
    return set(out.tokens)


def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


# ------------------------------------------------------------------------------------------------
# Filters


def test_greedy_is_argmax_and_consumes_no_randomness() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(temperature=0, seed=1), SamplingParams(top_k=1, temperature=0.7, seed=1)):
        seqs = [SequenceSampling(params) for _ in range(8)]
        states = [s.generator.get_state().clone() for s in seqs]
        out = Sampler().sample(logits, seqs)
        assert out.tokens == logits.argmax(-1).tolist()
        assert all(torch.equal(s.generator.get_state(), st) for s, st in zip(seqs, states, strict=True))


def test_low_temperature_tends_to_greedy() -> None:
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    assert _observed(logits[0], SamplingParams(temperature=1e-3)) == {int(logits.argmax())}


def test_top_k_keeps_exactly_the_k_most_likely() -> None:
    logits = torch.randn(40, generator=torch.Generator().manual_seed(2))
    top3 = set(logits.topk(3).indices.tolist())
    assert _observed(logits, SamplingParams(top_k=3, temperature=3.0)) == top3


@pytest.mark.parametrize(("top_p", "kept"), [(0.35, {0}), (0.65, {0, 1}), (0.75, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    # cumulative mass before each token: 0, .4, .7, .9
    assert _observed(_logits_of([0.4, 0.3, 0.2, 0.1]), SamplingParams(top_p=top_p)) == kept


@pytest.mark.parametrize(("min_p", "kept"), [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1})])
def test_min_p_drops_tokens_below_fraction_of_top(min_p: float, kept: set[int]) -> None:
    # thresholds: .025, .1, .25 against probabilities .5, .3, .15, .05
    assert _observed(_logits_of([0.5, 0.3, 0.15, 0.05]), SamplingParams(min_p=min_p)) == kept


def test_top_k_then_top_p_renormalises() -> None:
    # after top-k=3: .4/.9, .3/.9, .2/.9 = .44, .33, .22 -> mass before: 0, .44, .78
    logits = _logits_of([0.4, 0.3, 0.2, 0.1])
    assert _observed(logits, SamplingParams(top_k=3, top_p=0.7)) == {0, 1}
    assert _observed(logits, SamplingParams(top_k=3, top_p=0.8)) == {0, 1, 2}


@pytest.mark.parametrize("kept", [300, 3000, 18000])
def test_top_p_over_a_large_vocabulary(kept: int) -> None:
    # Slowly decaying, shuffled logits over 20k tokens; p halfway between two cumulative masses so the
    # kept set is exactly the `kept` most likely tokens. 300 stays inside the first candidates, 3000
    # needs the second stage, 18000 the full sort (see _TOP_P_CANDIDATES).
    v = 20_000
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(7))
    logits = torch.empty(v)
    logits[perm] = -torch.arange(v, dtype=torch.float32) * 2e-4  # perm[i] is the i-th most likely
    probs = torch.softmax(logits.double()[perm], -1)
    before = probs.cumsum(-1) - probs
    top_p = float(before[kept - 1] + before[kept]) / 2
    filtered = _top_p_rows(logits.expand(3, -1), [top_p] * 3)
    assert set(torch.isfinite(filtered[0]).nonzero()[:, 0].tolist()) == set(perm[:kept].tolist())
    assert torch.equal(filtered[0][perm[:kept]], logits[perm[:kept]])
    tokens = Sampler().sample(logits.expand(50, -1), _seqs(SamplingParams(top_p=top_p), 50)).tokens
    assert set(tokens) <= set(perm[:kept].tolist())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    draws = 4000
    out = Sampler().sample(logits.expand(draws, -1), _seqs(SamplingParams(temperature=temperature), draws))
    counts = torch.bincount(torch.tensor(out.tokens), minlength=6).double()
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 5 degrees of freedom, p = 0.001


# ------------------------------------------------------------------------------------------------
# Penalties and min_tokens


def test_penalties_follow_vllm_formulas_on_a_hand_example() -> None:
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    seq = SequenceSampling(params, prompt_token_ids=[0])
    for t in (1, 1, 2):
        seq.append(t)
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0]])
    # 0: prompt, positive -> 2/2; 1: seen, negative -> -1*2, then -2*.5 (count 2) -.25 (present);
    # 2: 3/2 - .5 - .25; 3 and 4 unseen
    expected = torch.tensor([[1.0, -3.25, 0.75, 0.5, -2.0]])
    assert torch.equal(Sampler().penalized_logits(logits, [seq]), expected)
    seq.append(3)  # incremental bookkeeping: token 3 now seen once
    assert torch.equal(Sampler().penalized_logits(logits, [seq]), torch.tensor([[1.0, -3.25, 0.75, -0.5, -2.0]]))


def _reference_penalties(logits: torch.Tensor, seq: SequenceSampling) -> torch.Tensor:
    """vLLM's apply_penalties, written from scratch for one row."""
    p, out = seq.params, logits.clone()
    counts = torch.bincount(torch.tensor(seq.output_token_ids, dtype=torch.long), minlength=out.numel()).float()
    seen = counts > 0
    seen[torch.tensor(seq.prompt_token_ids, dtype=torch.long)] = True
    rep = torch.where(seen, torch.tensor(p.repetition_penalty), torch.tensor(1.0))
    out = torch.where(out > 0, out / rep, out * rep)
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def test_penalties_match_reference_in_a_mixed_batch() -> None:
    g = torch.Generator().manual_seed(3)
    v = 64
    variants = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=-0.7, presence_penalty=1.1),
        SamplingParams(temperature=0),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=0.2, presence_penalty=-0.4),
    ]
    seqs = [SequenceSampling(p, torch.randint(v, (7,), generator=g).tolist()) for p in variants]
    logits = torch.randn(len(seqs), v, generator=g)
    for _ in range(3):
        for s in seqs:
            for t in torch.randint(v, (5,), generator=g).tolist():
                s.append(t)
        got = Sampler().penalized_logits(logits, seqs)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(got[i], _reference_penalties(logits[i], s), rtol=0, atol=1e-6)
        assert torch.equal(got[0], logits[0]) and torch.equal(got[3], logits[3])  # untouched rows


@pytest.mark.parametrize("which", ["all", "some"])
def test_sampling_never_writes_to_the_callers_logits(which: str) -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(8))
    before = logits.clone()
    special = SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, min_tokens=2, top_k=5, top_p=0.8,
                             min_p=0.1, seed=1, logprobs=2)  # fmt: skip
    params = [special] * 4 if which == "all" else [special, SamplingParams(seed=2), SamplingParams(temperature=0)] * 2
    Sampler(eos_token_ids=[0]).sample(logits, [SequenceSampling(p, [1, 2]) for p in params[:4]])
    assert torch.equal(logits, before)


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[9.0, 8.0, 7.0, 0.0, -1.0]])  # eos (0) and stop id (1) most likely
    sampler = Sampler(eos_token_ids=[0])
    for params in (
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]),
        SamplingParams(temperature=1.0, top_k=3, min_tokens=2, stop_token_ids=[1], seed=0),
    ):
        seq = SequenceSampling(params)
        got = []
        for _ in range(3):
            tok = sampler.sample(logits, [seq]).tokens[0]
            seq.append(tok)
            got.append(tok)
        assert got[:2] == [2, 2]  # eos and the stop id are masked, so top-k=3 keeps 2, 3, 4
        assert got[2] in ({0} if params.greedy else {0, 1, 2})
    # ignore_eos: EOS is an ordinary token (vLLM), only stop_token_ids are masked
    seq = SequenceSampling(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1], ignore_eos=True))
    assert sampler.sample(logits, [seq]).tokens == [0]


# ------------------------------------------------------------------------------------------------
# Seeds


def _run(batch_params: list[SamplingParams], target: int, steps: int, v: int = 3000) -> list[int]:
    """Tokens of row ``target`` over ``steps`` steps; row ``target`` always sees the same logits."""
    g = torch.Generator().manual_seed(4)
    seqs = [SequenceSampling(p, [1, 2, 3]) for p in batch_params]
    sampler = Sampler(eos_token_ids=[0])
    got = []
    for step in range(steps):
        logits = torch.randn(len(seqs), v, generator=g)
        logits[target] = torch.randn(v, generator=torch.Generator().manual_seed(100 + step))
        out = sampler.sample(logits, seqs)
        for s, t in zip(seqs, out.tokens, strict=True):
            s.append(t)
        got.append(out.tokens[target])
    return got


@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(seed=1234, temperature=0.9),
        SamplingParams(seed=1234, temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.2),
        SamplingParams(seed=99, top_p=0.8, presence_penalty=0.5),
    ],
)
def test_same_seed_same_tokens_whatever_the_batch(target: SamplingParams) -> None:
    neighbours = [
        SamplingParams(temperature=0),
        SamplingParams(seed=7, temperature=1.3, top_k=20),
        SamplingParams(),  # unseeded
        SamplingParams(seed=9, top_p=0.5, frequency_penalty=0.3, presence_penalty=0.2, min_tokens=3),
        SamplingParams(seed=11, top_k=50, top_p=0.95, min_p=0.05),
    ]
    steps = 8
    alone = _run([target], 0, steps)
    assert _run([target, *neighbours], 0, steps) == alone
    assert _run([*neighbours, target], len(neighbours), steps) == alone
    assert _run([*neighbours[:2], target, *neighbours[2:]], 2, steps) == alone
    assert _run([target], 0, steps) == alone  # across calls
    assert _run([target.model_copy(update={"seed": 1235})], 0, steps) != alone


def test_sequences_of_a_request_get_distinct_derived_seeds() -> None:
    params = SamplingParams(n=4, seed=42)
    seqs = SequenceSampling.for_request(params, [1, 2])
    assert [s.seed for s in seqs] == [sequence_seed(42, j) for j in range(4)]
    assert seqs[0].seed == 42 and len({s.seed for s in seqs}) == 4
    out = Sampler().sample(torch.zeros(4, 1000), seqs)  # uniform: 4 equal tokens would be a seed bug
    assert len(set(out.tokens)) > 1
    unseeded = SequenceSampling.for_request(SamplingParams(n=2), [1])
    assert unseeded[0].seed != unseeded[1].seed


# ------------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_are_raw_with_ranks() -> None:
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(5))
    raw = torch.log_softmax(logits[0], -1)
    order = raw.argsort(descending=True).tolist()
    for temperature in (0.3, 1.0, 2.5):  # temperature must not change the reported logprobs
        seq = SequenceSampling(SamplingParams(logprobs=5, temperature=temperature, seed=3))
        out = Sampler().sample(logits, [seq])
        tok, lp = out.tokens[0], out.logprobs[0]
        assert lp is not None
        assert list(lp)[0] == tok  # the chosen token comes first
        assert set(lp) == {tok, *order[:5]}
        for t, entry in lp.items():
            assert entry.rank == order.index(t) + 1
            assert entry.logprob == pytest.approx(float(raw[t]), abs=1e-5)
        assert out.chosen_logprob[0] == pytest.approx(float(raw[tok]), abs=1e-5)


def test_logprobs_of_a_token_outside_the_top_n() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    # repetition penalty on the prompt's tokens 0-2 makes greedy pick token 3 (raw rank 4)
    seq = SequenceSampling(SamplingParams(temperature=0, repetition_penalty=100.0, logprobs=2), [0, 1, 2])
    out = Sampler().sample(logits, [seq])
    raw = torch.log_softmax(logits[0], -1)
    assert out.tokens == [3]
    lp = out.logprobs[0]
    assert lp is not None
    assert {t: e.rank for t, e in lp.items()} == {3: 4, 0: 1, 1: 2}
    assert lp[3].logprob == pytest.approx(float(raw[3]))  # raw: before the penalty


def test_chosen_logprob_filled_when_asked_for_logprobs_only_when_asked() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    seqs = [
        SequenceSampling(SamplingParams(temperature=0)),
        SequenceSampling(SamplingParams(seed=1, logprobs=0)),
        SequenceSampling(SamplingParams(seed=2)),
    ]
    out = Sampler(token_logprobs=True).sample(logits, seqs)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[0] is None and out.logprobs[2] is None
    assert out.logprobs[1] is not None and list(out.logprobs[1]) == [out.tokens[1]]
    for i, t in enumerate(out.tokens):
        assert out.chosen_logprob[i] == pytest.approx(float(raw[i, t]), abs=1e-5)
    # Without token_logprobs the vocabulary pass is skipped when no row asks for logprobs.
    greedy_only = Sampler().sample(logits, [SequenceSampling(SamplingParams(temperature=0))] * 3)
    assert all(math.isnan(x) for x in greedy_only.chosen_logprob)


def test_empty_batch_and_shape_check() -> None:
    assert Sampler().sample(torch.zeros(0, 10), []).tokens == []
    with pytest.raises(ValueError, match="logits must be"):
        Sampler().sample(torch.zeros(2, 10), [SequenceSampling(SamplingParams())])

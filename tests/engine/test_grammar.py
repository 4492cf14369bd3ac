"""Structured output: specs, their grammars, xgrammar's view of the tokenizer, and constrained generation (every
output of a random tiny model must match its constraint)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xgrammar as xgr

from dsv4.engine.engine import Engine
from dsv4.engine.grammar import StructuredOutputs, build_grammar, tokenizer_info
from dsv4.engine.sampling import SamplingParams
from dsv4.testing.tokenizers import write_byte_tokenizer, write_char_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
}
REGEX = r"[a-z]{2,6}@(foo|bar)\.(com|org)"
CHOICES = ["yes", "no", 'a "quoted" answer', "ünïcode"]
EBNF = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
EBNF_CHECK = re.compile(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(model_dir, max_model_len=1024)


def _params(seed: int, **kw: Any) -> SamplingParams:
    kw.setdefault("max_tokens", 400)
    return SamplingParams(seed=seed, **kw)


# ---------------------------------------------------------------------------------------------- specs
def test_spec_needs_exactly_one_field() -> None:
    with pytest.raises(ValueError, match="exactly one of json, json_object, regex, grammar, choice, structural_tag; "
                                         "got regex, choice"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
    with pytest.raises(ValueError, match="got none"):
        SamplingParams(structured_outputs={})
    with pytest.raises(ValueError, match="at least one string"):
        SamplingParams(structured_outputs={"choice": []})
    with pytest.raises(ValueError, match="min_tokens cannot be combined"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})
    assert SamplingParams(structured_outputs={"json": '{"type": "integer"}'}).structured_outputs == StructuredOutputs(
        json='{"type": "integer"}')


def test_key_keeps_the_schemas_key_order() -> None:
    # property order is the output's order, so two orders are two grammars
    a = StructuredOutputs(json={"properties": {"x": {}, "y": {}}})
    b = StructuredOutputs(json={"properties": {"y": {}, "x": {}}})
    assert a.key != b.key and a.key[0] == "json"


@pytest.mark.parametrize(("spec", "message"), [
    ({"regex": "a("}, r"^structured_outputs.regex: Regex parsing error .*parenthesis"),
    ({"grammar": "root ::= foo"}, r'^structured_outputs.grammar: .*Rule "foo" is not defined'),
    ({"json": {"type": "foo"}}, r'^structured_outputs.json: Unsupported type "foo"'),
    ({"json": "{not json"}, r"^structured_outputs.json: Expecting property name"),
    ({"json": {"properties": {"a": {"not": {"type": "string"}}}}},
     r"^structured_outputs.json.properties.a: the JSON-schema keyword 'not' is not supported"),
    ({"json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, r"keyword 'uniqueItems'"),
    ({"json": {"anyOf": [{"type": "string", "format": "ipv9"}]}},
     r"^structured_outputs.json.anyOf.0: string format 'ipv9' is not supported"),
    ({"json": {"allOf": [{"type": "integer"}, {"minimum": 3}]}}, r"'allOf' with more than one schema"),
    ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}}, r"^structured_outputs.structural_tag"),
])
def test_bad_specs_are_refused_at_add_request(engine: Engine, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request("Hi", SamplingParams(structured_outputs=spec))
    assert not engine.requests


def test_build_grammar_names_the_callers_place() -> None:
    with pytest.raises(ValueError, match=r"^response_format.json_schema.schema.properties.a: .*'if'"):
        build_grammar(StructuredOutputs(json={"properties": {"a": {"if": {}}}}), "response_format.json_schema.schema")


def test_length_limited_json_strings_exclude_control_characters() -> None:
    # xgrammar 0.2.9 lets raw control characters into strings with maxLength; JSON forbids them
    text = str(build_grammar(StructuredOutputs(json={"type": "string", "maxLength": 4})))
    assert r"[^\0-\x1f\"\\]" in text and r"[^\"\\\r\n]" not in text


def test_an_engine_without_tokenizer_refuses_constraints(ref_model: Any) -> None:
    engine = Engine(ref_model)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.add_request([5, 6, 7], SamplingParams(structured_outputs={"regex": "a"}))


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_info_byte_level(tmp_path: Path) -> None:
    tok = write_byte_tokenizer(tmp_path, vocab_size=320)
    info = tokenizer_info(tok, 336, [1])  # a model vocabulary padded past the tokenizer's
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL and info.vocab_size == 336
    assert info.stop_token_ids == [1]
    # BOS, <｜User｜>, <｜Assistant｜> (special: decoding skips them) and the padding are never allowed
    user, assistant = tok.token_to_id("<｜User｜>"), tok.token_to_id("<｜Assistant｜>")
    assert set(info.special_token_ids) == {0, user, assistant, *range(320, 336)}
    assert info.decoded_vocab[tok.token_to_id("Ġ")] == b" "  # type: ignore[index]


def test_tokenizer_info_raw(tmp_path: Path) -> None:
    tok = write_char_tokenizer(tmp_path, "ab ")
    info = tokenizer_info(tok, tok.vocab_size, [1])
    assert info.vocab_type == xgr.VocabType.RAW
    assert info.decoded_vocab[2:5] == [b"a", b"b", b" "]


# ---------------------------------------------------------------------------------------------- generation
def test_compiled_once_per_spec(engine: Engine) -> None:
    before = dict(engine.grammars.stats)
    spec = {"json": {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}}
    outs = engine.generate(["One", "Two"], [_params(s, n=2, structured_outputs=spec) for s in (1, 2)])
    assert engine.grammars.stats["compiled"] - before["compiled"] == 1
    assert engine.grammars.stats["cache_hits"] - before["cache_hits"] == 1
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop" and isinstance(json.loads(c.text)["k"], int)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.3])
def test_json_schema_outputs_validate(engine: Engine, temperature: float) -> None:
    params = [_params(seed, n=2, temperature=temperature, structured_outputs={"json": SCHEMA}) for seed in range(6)]
    outs = engine.generate([f"Person {i}:" for i in range(6)], params)
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            assert c.token_ids[-1] == 1  # EOS ends a complete grammar
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_outputs_are_objects(engine: Engine) -> None:
    # any object: a random model may write one string forever, so some run out of tokens; those that end parse
    outs = engine.generate([f"Object {i}" for i in range(8)],
                           [_params(s, max_tokens=300, structured_outputs={"json_object": True}) for s in range(8)])
    done = [c for out in outs for c in out.outputs if c.finish_reason == "stop"]
    assert len(done) >= 2
    for c in done:
        assert isinstance(json.loads(c.text), dict), c.text


@pytest.mark.parametrize(("spec", "check"), [
    ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) is not None),
    ({"choice": CHOICES}, lambda t: t in CHOICES),
    ({"grammar": EBNF}, lambda t: EBNF_CHECK.fullmatch(t) is not None),
])
def test_regex_choice_and_grammar_outputs_match(engine: Engine, spec: dict[str, Any], check: Any) -> None:
    params = [_params(seed, n=3, temperature=0.0 if seed == 0 else 1.0, structured_outputs=spec) for seed in range(5)]
    for out in engine.generate([f"Say {i}" for i in range(5)], params):
        for c in out.outputs:
            assert c.finish_reason == "stop" and check(c.text), c.text


def test_unconstrained_rows_are_untouched(engine: Engine) -> None:
    free = [_params(7, max_tokens=12, temperature=0.0), _params(8, max_tokens=12)]
    alone = engine.generate(["Free one", "Free two"], free)
    mixed = engine.generate(["Free one", "Bound", "Free two"],
                            [free[0], _params(3, structured_outputs={"regex": REGEX}), free[1]])
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    assert re.fullmatch(REGEX, mixed[1].outputs[0].text)


def test_a_grammar_that_cannot_finish_ends_with_length(engine: Engine) -> None:
    [out] = engine.generate(["Count"], _params(0, max_tokens=5, structured_outputs={"regex": "[0-9]{20}"}))
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and c.text.isdigit()


def test_a_complete_grammar_stops_even_under_ignore_eos(engine: Engine) -> None:
    [out] = engine.generate(["Pick"], _params(0, ignore_eos=True, structured_outputs={"choice": ["yes", "no"]}))
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.text in ("yes", "no") and c.token_ids[-1] == 1


def test_logprobs_stay_raw(engine: Engine) -> None:
    # the chosen token's logprob and the alternatives are the model's own distribution, not the masked one
    [out] = engine.generate(["Pick"], _params(0, temperature=0.0, logprobs=5, structured_outputs={"choice": ["zq"]}))
    c = out.outputs[0]
    assert c.text == "zq"
    first = c.logprobs[0]  # type: ignore[index]
    assert first[c.token_ids[0]].logprob < 0
    assert sum(math.exp(lp.logprob) for t, lp in first.items() if t != c.token_ids[0]) > 0
    assert len(first) == 6  # five alternatives besides the forced token, which they do not include

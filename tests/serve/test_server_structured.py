"""Structured output over HTTP with the official ``openai`` client: ``response_format``, ``structured_outputs`` /
``guided_*``, ``tool_choice`` "required" and named, on the real engine (a random tiny model: whatever it writes,
the constraint must hold), and the 400s for what cannot be enforced."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import jsonschema
import pytest
import xgrammar as xgr
from openai import OpenAI

from dsv4.chat.output import parse_chat_output
from dsv4.serve.chat import ChatMode, chat_constraint
from dsv4.serve.protocol import ChatCompletionRequest

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer"}},
          "required": ["answer", "score"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def srv(launch_server: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    with launch_server(max_model_len=4096) as running:  # prompts with tool schemas are long in byte tokens
        yield running


@pytest.fixture(scope="module")
def client(srv: Any) -> OpenAI:
    return OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _streamed(chunks: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """Content, tool calls by index (name, arguments joined) and the finish reason of a streamed choice 0."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for call in c.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = c.finish_reason or finish
    return content, calls, finish


# ---------------------------------------------------------------------------------------------- response_format
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response(client: OpenAI, stream: bool) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        kw: dict[str, Any] = {"model": "tiny-dsv4", "messages": USER, "response_format": fmt, "seed": seed,
                              "max_tokens": 300, "n": 2}
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            texts = ["".join(c.delta.content or "" for ch in chunks for c in ch.choices if c.index == j)
                     for j in range(2)]
            finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
        else:
            r = client.chat.completions.create(**kw)
            texts = [c.message.content or "" for c in r.choices]
            finishes = [c.finish_reason for c in r.choices]
        assert finishes == ["stop", "stop"]
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_response(client: OpenAI, stream: bool) -> None:
    kw: dict[str, Any] = {"model": "tiny-dsv4", "messages": USER, "response_format": {"type": "json_object"},
                          "max_tokens": 300}
    done = 0
    for seed in range(4):
        if stream:
            content, _, finish = _streamed(client.chat.completions.create(stream=True, seed=seed, **kw))
        else:
            r = client.chat.completions.create(seed=seed, **kw)
            content, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
        if finish == "stop":  # a random model may write one string until max_tokens
            done += 1
            assert isinstance(json.loads(content), dict)
        else:
            assert finish == "length" and content.lstrip().startswith("{")
    assert done


def test_vllm_and_guided_fields(client: OpenAI, srv: Any) -> None:
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER,  # type: ignore[call-overload]
                                       extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r.choices[0].message.content)
    r = client.completions.create(model="tiny-dsv4", prompt="Colour:", n=3,  # type: ignore[call-overload]
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert all(c.text in ("red", "green", "blue") and c.finish_reason == "stop" for c in r.choices)
    body = {"text": "Sum:", "sampling_params": {"ebnf": 'root ::= [1-9] "+" [1-9]', "max_new_tokens": 10}}
    out = httpx.post(f"{srv.url}/generate", json=body, timeout=60).json()
    assert re.fullmatch(r"[1-9]\+[1-9]", out["text"]) and out["meta_info"]["finish_reason"] == "stop"
    body = {"text": "Num:", "sampling_params": {"structured_outputs": {"json": {"type": "integer"}},
                                                "max_new_tokens": 40}}
    out = httpx.post(f"{srv.url}/generate", json=body, timeout=60).json()
    assert out["meta_info"]["finish_reason"] != "stop" or isinstance(json.loads(out["text"]), int)


# ---------------------------------------------------------------------------------------------- tool_choice
def _check_calls(calls: list[tuple[str, str]], names: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize(("stream", "parallel"), [(False, False), (True, False), (False, True), (True, True)])
def test_tool_choice_required(client: OpenAI, stream: bool, parallel: bool) -> None:
    finishes = []
    for seed in range(3):
        kw: dict[str, Any] = {"model": "tiny-dsv4", "messages": USER, "tools": TOOLS, "tool_choice": "required",
                              "seed": seed, "max_tokens": 400, "parallel_tool_calls": parallel}
        if stream:
            content, by_index, finish = _streamed(client.chat.completions.create(stream=True, **kw))
            calls = [(c["name"], c["arguments"]) for _, c in sorted(by_index.items())]
        else:
            r = client.chat.completions.create(**kw)
            msg, finish = r.choices[0].message, r.choices[0].finish_reason
            content = msg.content or ""
            calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]  # type: ignore[union-attr]
        _check_calls(calls, set(SCHEMAS))
        finishes.append(finish)
        if parallel:  # a random model may go on calling until max_tokens: its last call is then unfinished content
            assert finish == "length" or content == ""
        else:
            assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert "tool_calls" in finishes


@pytest.mark.parametrize("parallel", [None, False])
def test_named_tool_choice(client: OpenAI, parallel: bool | None) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny-dsv4", messages=USER, tools=TOOLS,  # type: ignore[call-overload]
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           seed=seed, max_tokens=400, **extra)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        _check_calls([(c.function.name, c.function.arguments) for c in calls], {"get_weather"})


def test_thinking_mode_constraints_start_after_the_reasoning() -> None:
    # the random model never closes its reasoning, so the grammar is checked on texts here
    tok = "thinking about it</think>"
    req = ChatCompletionRequest(messages=USER, tools=TOOLS, tool_choice="required")  # type: ignore[arg-type]
    spec = chat_constraint(req, ChatMode(reasoning=True, tools=True))
    call = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_time">\n<｜DSML｜parameter name="zone" string="true">'
            "UTC</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    assert spec is not None and _matches(spec, tok + call)
    assert not _matches(spec, call)  # no reasoning: the call would be reasoning text, and it never ends
    parsed = parse_chat_output(tok + call, reasoning=True, tools=True)
    assert parsed.reasoning == "thinking about it" and parsed.tool_calls[0].arguments == '{"zone": "UTC"}'
    fmt = ChatCompletionRequest(messages=USER, response_format={  # type: ignore[arg-type]
        "type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}})
    spec = chat_constraint(fmt, ChatMode(reasoning=True, tools=False))
    assert spec is not None and _matches(spec, tok + '{"answer": "no", "score": 3}')
    assert not _matches(spec, tok + '{"answer": "maybe", "score": 3}')


def _matches(spec: Any, text: str) -> bool:
    from dsv4.engine.grammar import build_grammar

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(build_grammar(spec))
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


# ---------------------------------------------------------------------------------------------- refused
@pytest.mark.parametrize(("body", "param", "phrase"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not among the tools ('get_weather', 'get_time')"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "xs": {"type": "array", "uniqueItems": True}}}}}], "tool_choice": "required"}, "tools",
     "tools.0.function.parameters.properties.xs: the JSON-schema keyword 'uniqueItems' is not supported"),
    ({"tools": TOOLS, "tool_choice": "none", "guided_regex": "a", "response_format": {"type": "json_object"}},
     "guided_regex", "cannot be combined with response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "response_format.json_schema.schema: the JSON-schema keyword 'not' is not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", 'Unsupported type "strin"'),
    ({"guided_regex": "a(", "max_tokens": 4}, "guided_regex", "guided_regex: Regex parsing error"),
    ({"guided_json": {"type": "integer"}, "structured_outputs": {"regex": "a"}}, "guided_json", "at most one of"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs", "structured_outputs: "),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", "structured_outputs.jsn"),
    ({"guided_choice": ["a"], "min_tokens": 2}, None, "min_tokens cannot be combined"),
])
def test_what_cannot_be_enforced_is_a_400(srv: Any, body: dict[str, Any], param: str | None, phrase: str) -> None:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": USER, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert phrase in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"


def test_generate_refuses_a_bad_constraint(srv: Any) -> None:
    body = {"text": "x", "sampling_params": {"regex": "(", "max_new_tokens": 4}}
    r = httpx.post(f"{srv.url}/generate", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params"
    assert "sampling_params.structured_outputs: Regex parsing error" in r.json()["error"]["message"]

"""The server under hostile or unlucky clients: fuzzed and malformed input, auth, a full queue, clients
that leave mid-request, and SIGTERM with a request in flight. It must answer 4xx (never 5xx) with an
OpenAI-style error body, free every KV page of an abandoned request, and stay healthy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

Launch = Callable[..., AbstractContextManager[Any]]
FUZZ_MAX_LEN = 32  # absurd max_tokens end after a few dozen tokens
FUZZ_EXAMPLES = int(os.environ.get("DSV4_FUZZ_EXAMPLES", "25"))  # per operation; raise it for a deeper hunt
LONG = {"prompt": "The robot", "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-style error of a response with ``status``."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    assert err["message"]
    return err


def _aborted(client: httpx.Client, metric_value: Callable[[str, str], float]) -> float:
    return metric_value(client.get("/metrics").text, "dsv4_requests_aborted_total")


def _healthy(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


# ---------------------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def fuzz_srv(launch_server: Launch) -> Iterator[Any]:
    with launch_server(max_model_len=FUZZ_MAX_LEN, max_num_seqs=8) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fuzz_srv: Any) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_srv.url}/openapi.json", timeout=10)


OPERATIONS = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("POST", "/generate"), ("POST", "/tokenize"),
              ("POST", "/detokenize"), ("POST", "/flush_cache")]


def test_schema_lists_every_route(api_schema: Any) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)  # a new route joins OPERATIONS, so it gets fuzzed too


# One hypothesis run per operation, by hand: schemathesis.pytest.from_fixture(...).parametrize() fails under
# pytest 9 ("'Function' object has no attribute '_nodeid'", schemathesis 4.32).
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzzed_requests_never_get_a_server_error(api_schema: Any, fuzz_srv: Any, method: str, path: str) -> None:
    op = api_schema[path][method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if method == "POST" else [])
    strategy = st.one_of(*(op.as_strategy(generation_mode=m) for m in modes))

    @settings(max_examples=FUZZ_EXAMPLES, phases=[Phase.generate], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: Any) -> None:
        case.call_and_validate(base_url=fuzz_srv.url, checks=[not_a_server_error], timeout=30)

    check()


def test_healthy_after_fuzzing(fuzz_srv: Any) -> None:
    with httpx.Client(base_url=fuzz_srv.url, timeout=30) as client:
        _healthy(client)
    assert not any(fuzz_srv.wait_idle().values())


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def srv(launch_server: Launch) -> Iterator[Any]:
    with launch_server(max_body_bytes=1 << 16) as running:
        yield running


@pytest.fixture(scope="module")
def client(srv: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


JSON = {"content-type": "application/json"}
BAD: list[tuple[str, str, dict[str, Any], int, str, str | None]] = [
    # (id, route, httpx request kwargs, status, a phrase the message contains, param)
    ("malformed-json", "/v1/completions", {"content": b'{"prompt": "x",', "headers": JSON}, 400,
     "not valid JSON", "body"),
    ("not-an-object", "/v1/chat/completions", {"json": ["hello"]}, 400, "valid dictionary", "body"),
    ("prompt-wrong-type", "/v1/completions", {"json": {"prompt": 5}}, 400, "prompt", "prompt.str"),
    ("max-tokens-string", "/v1/completions", {"json": {"prompt": "x", "max_tokens": "many"}}, 400,
     "valid integer", "max_tokens"),
    ("temperature-string", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}}, 400, "temperature",
     "temperature"),
    ("unknown-field", "/v1/completions", {"json": {"prompt": "x", "frobnicate": True}}, 400,
     "Unrecognized request argument supplied: frobnicate", "frobnicate"),
    ("negative-max-tokens", "/v1/completions", {"json": {"prompt": "x", "max_tokens": -5}}, 400,
     "greater than or equal to 1", "max_tokens"),
    ("zero-max-tokens", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}}, 400, "greater than", "max_tokens"),
    ("absurd-max-tokens", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 10**15}}, 400,
     "less than or equal", "max_tokens"),
    ("absurd-n", "/v1/completions", {"json": {"prompt": "x", "n": 10**6}}, 400, "less than or equal", "n"),
    ("prompt-over-context", "/v1/completions", {"json": {"prompt": "word " * 300}}, 400,
     "maximum context length", "prompt"),
    ("prompt-over-context-stream", "/v1/completions", {"json": {"prompt": "word " * 300, "stream": True}}, 400,
     "maximum context length", "prompt"),
    ("chat-over-context-stream", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "word " * 300}], "stream": True}}, 400,
     "maximum context length", "messages"),
    ("max-tokens-over-context", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 100_000}}, 400,
     "maximum context length", "max_tokens"),
    ("token-out-of-vocab", "/v1/completions", {"json": {"prompt": [5, 10**6]}}, 400, "outside the vocabulary", "prompt"),
    ("negative-token", "/v1/completions", {"json": {"prompt": [[5], [-7]], "echo": True}}, 400, "-7", "prompt"),
    ("unknown-model", "/v1/completions", {"json": {"prompt": "x", "model": "gpt-17"}}, 404, "gpt-17", "model"),
    ("unknown-model-chat", "/v1/chat/completions",
     {"json": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}, 404, "does not exist", "model"),
    ("logit-bias", "/v1/completions", {"json": {"prompt": "x", "logit_bias": {"42": 5.0}}}, 400, "logit_bias",
     "logit_bias"),
    ("empty-messages", "/v1/chat/completions", {"json": {"messages": []}}, 400, "at least 1", "messages"),
    ("bad-role", "/v1/chat/completions", {"json": {"messages": [{"role": "wizard", "content": "x"}]}}, 400,
     "role", "messages.0.role"),
    ("empty-prompt", "/v1/completions", {"json": {"prompt": []}}, 400, "empty", "prompt"),
    ("oversized-body", "/v1/completions", {"json": {"prompt": "x" * (1 << 17)}}, 413, "larger than", None),
    ("generate-bad-sampling", "/generate", {"json": {"input_ids": [5], "sampling_params": {"bogus": 1}}}, 400,
     "bogus", "sampling_params"),
    ("generate-ids-and-text", "/generate", {"json": {"input_ids": [5], "text": "x"}}, 400, "exactly one",
     "input_ids"),
    ("detokenize-bad-id", "/detokenize", {"json": {"tokens": [-1]}}, 400, "outside the vocabulary", "tokens"),
    # text that is not valid Unicode: JSON's "\ud800" escape decodes to a lone surrogate
    ("surrogate-prompt", "/v1/completions", {"content": b'{"prompt": "ab\\ud800"}', "headers": JSON}, 400,
     "not valid Unicode", "prompt"),
    ("surrogate-prompt-list", "/v1/completions", {"content": b'{"prompt": ["ok", "\\udfff"]}', "headers": JSON},
     400, "lone surrogate", "prompt.1"),
    ("surrogate-message", "/v1/chat/completions",
     {"content": b'{"messages": [{"role": "user", "content": "hi \\ud83d"}], "stream": true}', "headers": JSON},
     400, "not valid Unicode", "messages.0.content"),
    ("surrogate-text-part", "/v1/chat/completions",
     {"content": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
      "headers": JSON}, 400, "not valid Unicode", "messages.0.content.0.text"),
    ("surrogate-key", "/v1/chat/completions",
     {"content": b'{"messages": [{"role": "user", "content": "x", "\\ud800": 1}]}', "headers": JSON}, 400,
     "a key holds a lone surrogate", "messages.0"),
    ("surrogate-stop", "/v1/completions", {"content": b'{"prompt": "x", "stop": ["\\ud800"]}', "headers": JSON},
     400, "not valid Unicode", "stop.0"),
    ("surrogate-tool", "/v1/chat/completions",
     {"content": b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": '
                 b'{"name": "f", "description": "\\ud800"}}]}', "headers": JSON},
     400, "not valid Unicode", "tools.0.function.description"),
    ("surrogate-generate", "/generate", {"content": b'{"text": "\\ud800"}', "headers": JSON}, 400,
     "not valid Unicode", "text"),
    ("surrogate-tokenize", "/tokenize", {"content": b'{"prompt": "\\ud800"}', "headers": JSON}, 400,
     "not valid Unicode", "prompt"),
    ("not-utf8-body", "/v1/completions", {"content": b'{"prompt": "\xff\xfe"}', "headers": JSON}, 400,
     "not valid JSON", "body"),
    ("deeply-nested", "/v1/chat/completions", {"content": b"[" * 30_000 + b"]" * 30_000, "headers": JSON}, 400,
     "not valid JSON", "body"),
    ("deeply-nested-field", "/v1/completions",
     {"content": b'{"prompt": "x", "user": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "headers": JSON}, 400,
     "not valid JSON", "body"),
    # images, audio, files: this model reads text
    ("image-part", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                          {"type": "image_url", "image_url": {"url": "x"}}]}]}},
     400, "this model takes text only", "messages.0.content"),
    ("audio-part", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}},
     400, "this model takes text only", "messages.0.content"),
    ("untyped-part", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [{"text": "x"}]}]}},
     400, "this model takes text only", "messages.0.content"),
    # booleans are booleans
    ("stream-yes", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}},
     400, "valid boolean", "stream"),
    ("stream-one", "/v1/completions", {"json": {"prompt": "x", "stream": 1}}, 400, "valid boolean", "stream"),
    ("echo-string", "/v1/completions", {"json": {"prompt": "x", "echo": "true"}}, 400, "valid boolean", "echo"),
    ("logprobs-int", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}}, 400, "valid boolean", "logprobs"),
    ("include-usage-string", "/v1/completions",
     {"json": {"prompt": "x", "stream": True, "stream_options": {"include_usage": "on"}}}, 400, "valid boolean",
     "stream_options.include_usage"),
    ("ignore-eos-string", "/v1/completions", {"json": {"prompt": "x", "ignore_eos": "false"}}, 400, "valid boolean",
     "ignore_eos"),
    ("generate-stream-yes", "/generate", {"json": {"input_ids": [5], "stream": "yes"}}, 400, "valid boolean",
     "stream"),
    ("generate-sampling-bool", "/generate", {"json": {"input_ids": [5], "sampling_params": {"ignore_eos": "yes"}}},
     400, "ignore_eos must be true or false", "sampling_params"),
    ("tokenize-bool", "/tokenize", {"json": {"prompt": "x", "add_special_tokens": 0}}, 400, "valid boolean",
     "add_special_tokens"),
    ("thinking-yes", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"thinking": "yes"}}}, 400,
     "thinking must be true or false", "chat_template_kwargs"),
    # chat requests the format cannot take
    ("template-kwarg-collides", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}],
               "chat_template_kwargs": {"add_generation_prompt": False}}},
     400, "add_generation_prompt is a request field", "chat_template_kwargs"),
    ("bad-reasoning-effort", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}}, 400, "reasoning_effort",
     "reasoning_effort"),
    ("tool-name-with-quote", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}],
               "tools": [{"type": "function", "function": {"name": 'a"b'}}]}}, 400, "should match pattern",
     "tools.0.function.name"),
    ("tool-not-a-function", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]}}, 400,
     "tools.0.type", "tools.0.type"),
    ("reasoning-not-text", "/v1/chat/completions",
     {"json": {"messages": [{"role": "assistant", "content": "x", "reasoning_content": 5},
                            {"role": "user", "content": "y"}]}}, 400, "valid string",
     "messages.0.reasoning_content"),
    ("tool-call-without-function", "/v1/chat/completions",
     {"json": {"messages": [{"role": "assistant", "tool_calls": [{"id": "a"}]}, {"role": "user", "content": "y"}]}},
     400, "Field required", "messages.0.tool_calls.0.function"),
    ("user-without-content", "/v1/chat/completions", {"json": {"messages": [{"role": "user"}]}}, 400,
     "has no 'content'", "messages"),
]


@pytest.mark.parametrize(("route", "request_kwargs", "status", "phrase", "param"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_problem(
    client: httpx.Client, route: str, request_kwargs: dict[str, Any], status: int, phrase: str, param: str | None
) -> None:
    err = _error(client.post(route, **request_kwargs), status)
    assert phrase in err["message"], err
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_oversized_streamed_body_without_length_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    err = _error(client.post("/v1/completions", content=chunks(), headers=JSON), 413)
    assert "larger than" in err["message"]


def test_unknown_route_and_method_are_openai_errors(client: httpx.Client) -> None:
    assert "Not Found" in _error(client.post("/v1/embeddings", json={}), 404)["message"]
    _error(client.get("/v1/completions"), 405)


# A sweep of our own besides schemathesis': every field of a valid request of each route, and a few nested ones,
# replaced in turn by each of these values (and each value added under a field the route does not have).
SWEEP_VALUES: list[Any] = [None, True, False, "yes", "\ud800", "", -1, 0, 2**70, 1.5, 1e308, [], {}, [None], [[1]],
                           {"type": "text", "text": 1}, "x" * 3000, [[[[[[[[[[[]]]]]]]]]]]]
SWEEP_BASES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2, "stream": False, "stop": ["."], "n": 1, "temperature": 0,
                        "logprobs": 1, "echo": False, "seed": 1, "top_k": 5, "user": "u", "suffix": None,
                        "stream_options": {"include_usage": True}},
    "/v1/chat/completions": {
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
                         {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "ok"}]}],
        "max_tokens": 2, "stream": False, "n": 1, "logprobs": False, "top_logprobs": None,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto", "parallel_tool_calls": True, "response_format": {"type": "text"},
        "reasoning_effort": "high", "chat_template_kwargs": {"thinking": True}},
    "/generate": {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2, "temperature": 0}, "stream": False,
                  "return_logprob": True, "top_logprobs_num": 1, "rid": None},
    "/tokenize": {"messages": [{"role": "user", "content": "Hi"}], "add_special_tokens": True,
                  "add_generation_prompt": True},
    "/detokenize": {"tokens": [5, 6]},
}
SWEEP_NESTED = {
    "/v1/chat/completions": [("messages", 1, "role"), ("messages", 1, "content"), ("messages", 1),
                             ("messages", 2, "tool_calls"), ("messages", 2, "tool_calls", 0, "function"),
                             ("messages", 2, "tool_calls", 0, "function", "arguments"), ("messages", 3, "content", 0),
                             ("tools", 0), ("tools", 0, "function", "name"), ("tools", 0, "function", "parameters"),
                             ("chat_template_kwargs", "drop_thinking"), ("chat_template_kwargs", "reasoning_effort")],
    "/generate": [("sampling_params", "max_new_tokens"), ("sampling_params", "stop"), ("sampling_params", "n")],
    "/v1/completions": [("stream_options", "include_usage"), ("stop", 0)],
    "/tokenize": [("messages", 0, "content"), ("messages", 0)],
    "/detokenize": [("tokens", 0)],
}


def _sweep_cases() -> list[tuple[str, tuple[Any, ...], Any]]:
    cases = []
    for route, base in SWEEP_BASES.items():
        for path in [*((k,) for k in base), ("unknown_field",), *SWEEP_NESTED.get(route, [])]:
            cases += [(route, path, value) for value in SWEEP_VALUES]
    return cases


def _replaced(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def test_sweep_never_answers_a_server_error(client: httpx.Client) -> None:
    """Every mutated request gets a 2xx or an OpenAI-style 4xx; a stream ends with [DONE]."""
    answered = {200: 0, 400: 0}
    for route, path, value in _sweep_cases():
        body = _replaced(SWEEP_BASES[route], path, value)
        # ensure_ascii: the lone surrogate travels as the JSON escape "\ud800", as a client would send it
        r = client.post(route, content=json.dumps(body).encode(), headers=JSON)
        where = f"{route} {'.'.join(map(str, path))}={value!r:.40}"
        assert r.status_code < 500, (where, r.text)
        if r.status_code >= 400:
            _error(r, r.status_code)
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), (where, r.text[-300:])
            assert '"error"' not in r.text, (where, r.text[-300:])
        answered[200 if r.status_code < 300 else 400] += 1
    assert answered[200] > 50 and answered[400] > 300, answered  # both kinds happen: the sweep tests something


def test_healthy_after_bad_input(client: httpx.Client, srv: Any) -> None:
    _healthy(client)
    assert not any(srv.wait_idle().values())


# ------------------------------------------------------------------------------------------ auth
def test_api_key(launch_server: Launch) -> None:
    with launch_server(api_key="sekret") as s, httpx.Client(base_url=s.url, timeout=30) as c:
        calls = [("GET", "/v1/models", None),
                 ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
                 ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
                 ("POST", "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}),
                 ("POST", "/tokenize", {"prompt": "x"}),
                 ("POST", "/detokenize", {"tokens": [5]})]
        for method, route, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                            {"Authorization": "Basic sekret"}):
                err = _error(c.request(method, route, json=body, headers=headers), 401)
                assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            r = c.request(method, route, json=body, headers={"Authorization": "Bearer sekret"})
            assert r.status_code == 200, (route, r.text)
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200


# ------------------------------------------------------------------------------------ queue full
def test_queue_full_is_429(launch_server: Launch) -> None:
    # The held request must outlast the checks on a loaded machine: thousands of tokens (it is aborted
    # when its stream closes), not LONG's 200, which a fast engine finished before the second request came.
    held = {**LONG, "max_tokens": 8000, "stream": True}
    with launch_server(max_pending=1, max_model_len=8192) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        with httpx.Client(base_url=s.url, timeout=30) as first, first.stream("POST", "/v1/completions", json=held) as r:
            assert r.status_code == 200
            # keep the line iterator: dropped, it closes the response, and the server rightly aborts the
            # request when its client goes away (which made this test flaky)
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            err = _error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 429)
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
            assert _error(c.post("/v1/chat/completions", json=chat), 429)["code"] == "queue_full"
            assert c.get("/health").status_code == 200
        assert not any(s.wait_idle().values())
        _healthy(c)  # the slot is free again


# ------------------------------------------------------------------------------------ disconnect
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_client_leaving_a_stream_aborts_it(
    srv: Any, client: httpx.Client, metric_value: Callable[[str, str], float], route: str
) -> None:
    body: dict[str, Any] = {
        "/v1/completions": {**LONG, "stream": True},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200,
                                 "ignore_eos": True, "stream": True},
        "/generate": {"text": "Hi", "stream": True, "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}},
    }[route]
    before = _aborted(client, metric_value)
    with httpx.Client(base_url=srv.url, timeout=30) as gone:
        with gone.stream("POST", route, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert any(srv.pages_used().values())  # the request holds KV now
    # closed after the first chunk: the request is aborted (not run to its 200th token), its pages freed
    assert not any(srv.wait_idle(timeout=5).values())
    assert _aborted(client, metric_value) == before + 1
    page_gauges = client.get("/metrics").text
    assert metric_value(page_gauges, "dsv4_kv_pages_used") == 0


def test_client_leaving_a_non_streaming_request_aborts_it(
    srv: Any, client: httpx.Client, metric_value: Callable[[str, str], float]
) -> None:
    before = _aborted(client, metric_value)
    with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(30, read=0.4)) as gone:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            gone.post("/v1/completions", json=LONG)
    assert not any(srv.wait_idle(timeout=5).values())
    assert _aborted(client, metric_value) == before + 1
    _healthy(client)


# ---------------------------------------------------------------------------------- SIGTERM drain
def test_sigterm_drains_in_flight_stream_then_exits(serve_model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "dsv4"), "serve", "--model", str(serve_model_dir), "--port", "0",
           "engine.max_model_len=256", "shutdown_timeout=20", "log_level=info"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        port = _wait_for_port(proc, log, timeout=60)
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "The robot", "max_tokens": 60, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            refused = threading.Event()
            watcher = threading.Thread(target=_watch_refusal, args=(url, refused), daemon=True)
            watcher.start()
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        events = [json.loads(ln[6:]) for ln in [first, *rest[:-1]]]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(e["choices"][0]["text"] for e in events)
        assert proc.wait(timeout=30) == 0
        watcher.join(timeout=10)
        assert refused.is_set(), "new connections were still accepted during the drain"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
        assert text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for_port(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"dsv4 serve exited early:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    raise AssertionError(f"dsv4 serve did not start:\n{log.read_text(errors='replace')}")


def _watch_refusal(url: str, refused: threading.Event) -> None:
    """Set ``refused`` once a new connection to the draining server fails (bounded: 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.TransportError:
            refused.set()
            return
        time.sleep(0.02)

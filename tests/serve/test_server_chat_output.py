"""Reasoning and tool calls through the official ``openai`` client, streamed and not.

The tiny test model writes random tokens, so the engine here answers from a script (the real engine's tokenizer
and limits, the generation replaced by given text cut into small deltas): what is tested is the wiring — the
prompt the server renders, and the reading of the output into ``reasoning_content``, ``content`` and
``tool_calls`` — while tests/chat/ tests the reading itself on every split of the text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from openai import OpenAI

from dsv4.engine.async_engine import AsyncEngine
from dsv4.engine.outputs import CompletionOutput, RequestOutput
from dsv4.engine.sampling import SamplingParams

D = "｜DSML｜"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALLS = (f"\n\n<{D}tool_calls>\n<{D}invoke name=\"get_weather\">\n"
         f"<{D}parameter name=\"city\" string=\"true\">find /tmp</{D}parameter>\n"
         f"<{D}parameter name=\"days\" string=\"false\">3</{D}parameter>\n</{D}invoke>\n"
         f"<{D}invoke name=\"get_weather\">\n<{D}parameter name=\"city\" string=\"true\">Rome</{D}parameter>\n"
         f"</{D}invoke>\n</{D}tool_calls>")
USER = [{"role": "user", "content": "Weather in Paris and Rome?"}]


class ScriptedEngine(AsyncEngine):
    """Answers every request with ``script`` (one text per choice, or one for all), ``chunk`` characters per
    step, ending with ``finish``; remembers the prompts it got."""

    script: list[str] = ["Hello"]
    finish: str = "stop"
    chunk: int = 3
    prompts: list[list[int]] = []

    async def generate(
        self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        params = params or SamplingParams()
        self.prompts.append(list(prompt))
        texts = [self.script[j % len(self.script)] for j in range(params.n)]
        steps = max(1, *((len(t) + self.chunk - 1) // self.chunk for t in texts))
        for s in range(1, steps + 1):  # each choice finishes when its text is out; the others go on
            outputs = [CompletionOutput(index=j, text=t[: s * self.chunk],
                                        token_ids=list(range(min(s * self.chunk, len(t)))),
                                        finish_reason=self.finish if s * self.chunk >= len(t) else None)
                       for j, t in enumerate(texts)]
            yield RequestOutput(request_id or "r", None, list(prompt), outputs, finished=s == steps)
            await asyncio.sleep(0)


@pytest.fixture(scope="module")
def srv(launch_server: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    # prompts with tool schemas run to a few thousand byte tokens
    with launch_server(aengine_class=ScriptedEngine, max_model_len=8192) as running:
        yield running


@pytest.fixture(scope="module")
def client(srv: Any) -> OpenAI:
    return OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def script(srv: Any) -> Iterator[Callable[..., None]]:
    engine: ScriptedEngine = srv.aengine

    def set_script(*texts: str, finish: str = "stop", chunk: int = 3) -> None:
        engine.script, engine.finish, engine.chunk = list(texts), finish, chunk
        engine.prompts = []

    yield set_script
    set_script("Hello")


def _prompt(srv: Any) -> str:
    tok = srv.aengine.engine.tokenizer
    text: str = tok.decode(srv.aengine.prompts[-1], skip_special_tokens=False)
    return text


def _stream(client: OpenAI, **kwargs: Any) -> tuple[dict[int, dict[str, Any]], list[Any]]:
    """Each choice's deltas joined: reasoning, content, tool calls by index (arguments concatenated)."""
    choices: dict[int, dict[str, Any]] = {}
    chunks = list(client.chat.completions.create(model="tiny-dsv4", stream=True, **kwargs))
    for chunk in chunks:
        for c in chunk.choices:
            acc = choices.setdefault(c.index, {"reasoning": None, "content": "", "calls": {}, "finish": None})
            extra = c.delta.model_extra or {}
            if extra.get("reasoning_content") is not None:
                acc["reasoning"] = (acc["reasoning"] or "") + extra["reasoning_content"]
            acc["content"] += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                call = acc["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += (tc.function.name or "") if tc.function else ""
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            if c.finish_reason:
                acc["finish"] = c.finish_reason
    return choices, chunks


# ---------------------------------------------------------------------------------------------- reasoning
@pytest.mark.parametrize("chunk", [1, 4])
def test_reasoning_in_thinking_mode(client: OpenAI, srv: Any, script: Callable[..., None], chunk: int) -> None:
    script("Two plus two is four.</think>It is 4.", chunk=chunk)
    thinking = {"chat_template_kwargs": {"thinking": True}}
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER, extra_body=thinking)  # type: ignore[arg-type]
    assert _prompt(srv).endswith("<｜Assistant｜><think>")
    msg = r.choices[0].message
    assert (msg.content, (msg.model_extra or {}).get("reasoning_content")) == ("It is 4.", "Two plus two is four.")
    assert r.choices[0].finish_reason == "stop"
    streamed, _ = _stream(client, messages=USER, extra_body=thinking)
    assert streamed[0] == {"reasoning": "Two plus two is four.", "content": "It is 4.", "calls": {}, "finish": "stop"}


def test_reasoning_cut_by_max_tokens_stays_reasoning(client: OpenAI, script: Callable[..., None]) -> None:
    script("Still thinking about </th", finish="length")
    thinking = {"chat_template_kwargs": {"thinking": True}}
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER, extra_body=thinking)  # type: ignore[arg-type]
    assert (r.choices[0].message.model_extra or {}).get("reasoning_content") == "Still thinking about </th"
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    streamed, _ = _stream(client, messages=USER, extra_body=thinking)
    assert streamed[0]["reasoning"] == "Still thinking about </th" and streamed[0]["content"] == ""


def test_chat_mode_is_all_content(client: OpenAI, srv: Any, script: Callable[..., None]) -> None:
    script("<think>x</think>Hi")
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER)  # type: ignore[arg-type]
    assert _prompt(srv).endswith("<｜Assistant｜></think>")
    assert r.choices[0].message.content == "<think>x</think>Hi"
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    streamed, _ = _stream(client, messages=USER)
    assert streamed[0]["content"] == "<think>x</think>Hi" and streamed[0]["reasoning"] is None


def test_reasoning_effort_max_reaches_the_prompt(client: OpenAI, srv: Any, script: Callable[..., None]) -> None:
    script("</think>ok")
    client.chat.completions.create(model="tiny-dsv4", messages=USER, reasoning_effort="high",  # type: ignore
                                   extra_body={"chat_template_kwargs": {"thinking": True}})
    assert "Reasoning Effort" not in _prompt(srv)
    client.chat.completions.create(model="tiny-dsv4", messages=USER,  # type: ignore[arg-type]
                                   extra_body={"reasoning_effort": "max", "chat_template_kwargs": {"thinking": True}})
    assert _prompt(srv).startswith("<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum")


# ---------------------------------------------------------------------------------------------- tool calls
def test_tool_calls(client: OpenAI, srv: Any, script: Callable[..., None]) -> None:
    script("I'll check." + CALLS, chunk=2)
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
    tok = srv.aengine.engine.tokenizer
    assert _prompt(srv) == tok.apply_chat_template(USER, tools=TOOLS)  # the schema is in the prompt
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I'll check."
    calls = choice.message.tool_calls or []
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("function", "get_weather", {"city": "find /tmp", "days": 3}),
        ("function", "get_weather", {"city": "Rome"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)

    streamed, chunks = _stream(client, messages=USER, tools=TOOLS)
    got = streamed[0]
    assert got["content"] == "I'll check." and got["finish"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"].values()] == [
        ("get_weather", {"city": "find /tmp", "days": 3}), ("get_weather", {"city": "Rome"})]
    assert all(D not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_tool_call_only_reply_has_null_content(client: OpenAI, script: Callable[..., None]) -> None:
    script(CALLS)
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
    assert r.choices[0].message.content is None and len(r.choices[0].message.tool_calls or []) == 2


def test_thinking_then_tool_call_streamed(client: OpenAI, script: Callable[..., None]) -> None:
    script("Need data.</think>" + CALLS, chunk=5)
    streamed, _ = _stream(client, messages=USER, tools=TOOLS, extra_body={"chat_template_kwargs": {"thinking": True}})
    assert (streamed[0]["reasoning"], streamed[0]["content"], len(streamed[0]["calls"])) == ("Need data.", "", 2)


def test_truncated_markup_comes_back_as_content(client: OpenAI, script: Callable[..., None]) -> None:
    cut = "Checking." + CALLS[:60]
    script(cut, finish="length")
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
    assert r.choices[0].message.content == cut and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "length"
    streamed, _ = _stream(client, messages=USER, tools=TOOLS)
    assert streamed[0]["content"] == cut and streamed[0]["calls"] == {}


def test_tool_choice_none_leaves_tools_out(client: OpenAI, srv: Any, script: Callable[..., None]) -> None:
    script("x" + CALLS)
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER, tools=TOOLS,  # type: ignore[arg-type]
                                       tool_choice="none")
    assert "## Tools" not in _prompt(srv)
    assert r.choices[0].message.content == "x" + CALLS and r.choices[0].finish_reason == "stop"


def test_several_choices_are_read_apart(client: OpenAI, script: Callable[..., None]) -> None:
    script("plain answer", "x" + CALLS)
    r = client.chat.completions.create(model="tiny-dsv4", messages=USER, tools=TOOLS, n=2)  # type: ignore[arg-type]
    by_index = {c.index: c for c in r.choices}
    assert by_index[0].message.content == "plain answer" and by_index[0].finish_reason == "stop"
    assert len(by_index[1].message.tool_calls or []) == 2 and by_index[1].finish_reason == "tool_calls"
    streamed, chunks = _stream(client, messages=USER, tools=TOOLS, n=2)
    assert streamed[0]["content"] == "plain answer" and len(streamed[1]["calls"]) == 2
    # choice 0 ends long before choice 1: its finish is sent once
    finishes = [(c.index, c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert sorted(finishes) == [(0, "stop"), (1, "tool_calls")]


def test_tool_results_round_trip(client: OpenAI, srv: Any, script: Callable[..., None]) -> None:
    script("Sunny in Paris.")
    first = client.chat.completions.create(model="tiny-dsv4", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
    assert first.choices[0].message.content  # (the script answered without calls; build a history with calls)
    history: list[dict[str, Any]] = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"},
    ]
    r = client.chat.completions.create(model="tiny-dsv4", messages=history, tools=TOOLS)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "Sunny in Paris."
    prompt = _prompt(srv)
    assert prompt == srv.aengine.engine.tokenizer.apply_chat_template(history, tools=TOOLS)
    assert prompt.endswith("<｜User｜><tool_result>sun</tool_result>\n\n<tool_result>rain</tool_result>"
                           "<｜Assistant｜></think>")


def test_completion_choices_finish_once(client: OpenAI, script: Callable[..., None]) -> None:
    # with n > 1 the engine's later outputs repeat a finished choice: its finish goes out once (it was repeated)
    script("short", "a much longer answer")
    chunks = list(client.completions.create(model="tiny-dsv4", prompt="x", n=2, stream=True, max_tokens=50))
    finishes = [(c.index, c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")]
    texts = {i: "".join(c.text for chunk in chunks for c in chunk.choices if c.index == i) for i in (0, 1)}
    assert texts == {0: "short", 1: "a much longer answer"}

"""Reading DeepSeek-V4's output back: reasoning, content and DSML tool calls, whole and fed in any pieces."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.chat.output import ChatOutput, ChatOutputParser, ToolCall, parse_chat_output

D = "｜DSML｜"


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def block(*invokes: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def invoke(name: str, *params: tuple[str, Any, bool]) -> str:
    lines = [f'<{D}parameter name="{k}" string="{"true" if s else "false"}">{v}</{D}parameter>'
             for k, v, s in params]
    return f'<{D}invoke name="{name}">\n' + "\n".join(lines) + f"\n</{D}invoke>"


def parse(text: str, *, reasoning: bool = False, tools: bool = True) -> ChatOutput:
    return parse_chat_output(text, reasoning=reasoning, tools=tools, call_id=ids())


def fed(pieces: list[str], *, reasoning: bool, tools: bool) -> tuple[ChatOutput, ChatOutput]:
    """The parser's result after feeding ``pieces``, and the concatenation of what each call returned."""
    parser = ChatOutputParser(reasoning=reasoning, tools=tools, call_id=ids())
    joined = ChatOutput(reasoning="" if reasoning else None)
    for part in [*(parser.feed(p) for p in pieces), parser.finish()]:
        if part.reasoning is not None:
            joined.reasoning = (joined.reasoning or "") + part.reasoning
        joined.content += part.content
        joined.tool_calls += part.tool_calls
    return parser.result, joined


WEATHER = invoke("get_weather", ("city", "find /tmp", True), ("days", 3, False))


# ---------------------------------------------------------------------------------------------- reasoning
def test_thinking_mode_splits_reasoning_from_content() -> None:
    assert parse("Two and two.</think>It is 4.", reasoning=True) == ChatOutput("Two and two.", "It is 4.")


def test_thinking_mode_without_closing_tag_is_all_reasoning() -> None:
    # the prompt opened <think>: the model never left its reasoning (e.g. cut by max_tokens)
    assert parse("still thinking </thi", reasoning=True) == ChatOutput("still thinking </thi", "")


def test_chat_mode_has_no_reasoning_even_with_tags() -> None:
    # peers sent the whole answer to reasoning_content when </think> never came; here chat mode is all content
    assert parse("<think>hmm</think>answer", reasoning=False) == ChatOutput(None, "<think>hmm</think>answer")
    assert parse("no tags at all", reasoning=False) == ChatOutput(None, "no tags at all")


def test_empty_reasoning() -> None:
    assert parse("</think>hi", reasoning=True) == ChatOutput("", "hi")


# ---------------------------------------------------------------------------------------------- tool calls
def test_tool_calls_typed_by_string_attribute() -> None:
    out = parse("Let me check." + block(WEATHER, invoke("add", ("a", 1.5, False), ("b", '[1, {"x": null}]', False),
                                                          ("flag", "true", False), ("note", "true", True))))
    assert out.content == "Let me check."
    assert out.tool_calls == [
        ToolCall("call_0", "get_weather", '{"city": "find /tmp", "days": 3}'),
        ToolCall("call_1", "add", '{"a": 1.5, "b": [1, {"x": null}], "flag": true, "note": "true"}'),
    ]
    assert json.loads(out.tool_calls[1].arguments) == {"a": 1.5, "b": [1, {"x": None}], "flag": True, "note": "true"}


def test_values_are_kept_exactly() -> None:
    # no stripping: the SGLang bug cut "find /tmp" to "find /"; quotes, newlines, markup-like text survive
    value = '  find /tmp -name "*.py"\n\t<b>x</b> </think> ünï 🎉 \\ '
    out = parse(block(invoke("sh", ("cmd", value, True))))
    assert json.loads(out.tool_calls[0].arguments) == {"cmd": value}


def test_reasoning_then_tool_call_without_content() -> None:
    out = parse("I need the weather.</think>" + block(WEATHER), reasoning=True)
    assert (out.reasoning, out.content) == ("I need the weather.", "")
    assert [c.name for c in out.tool_calls] == ["get_weather"]


def test_no_arguments_and_lenient_whitespace() -> None:
    text = f'<{D}tool_calls><{D}invoke name="now">\n\n</{D}invoke>  <{D}invoke  name="f" >' \
           f'<{D}parameter name="x" string="false"> 7 </{D}parameter></{D}invoke></{D}tool_calls>'
    assert parse(text).tool_calls == [ToolCall("call_0", "now", "{}"), ToolCall("call_1", "f", '{"x": 7}')]


def test_text_after_the_block_is_content() -> None:
    assert parse("A" + block(WEATHER) + " B").content == "A B"


def test_without_tools_markup_is_content() -> None:
    text = "A" + block(WEATHER)
    assert parse(text, tools=False) == ChatOutput(None, text)


def test_json_value_that_is_not_json_becomes_a_string() -> None:
    out = parse(block(invoke("f", ("n", "3 apples", False), ("x", "NaN", False))))
    assert json.loads(out.tool_calls[0].arguments) == {"n": "3 apples", "x": "NaN"}


@pytest.mark.parametrize("text", [
    "A" + block(WEATHER)[:-30],  # truncated inside the closing tags
    "A\n\n<" + D + "tool_calls>\n<" + D + "invoke name=\"f\">\n<" + D + 'parameter name="x" string="true">va',
    "A\n\n<" + D + "tool_calls>",
])
def test_truncated_markup_comes_back_as_content(text: str) -> None:
    assert parse(text) == ChatOutput(None, text)


@pytest.mark.parametrize("bad", [
    f"<{D}tool_calls>\nhello there",  # prose inside the block
    f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="x">1</{D}parameter>\n</{D}invoke>',  # no string=
    f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="x" string="true">1</{D}parameter>\n'
    f'<{D}parameter name="x" string="true">2</{D}parameter>\n</{D}invoke>',  # a key twice
    f'<{D}tool_calls>\n<{D}invoke name="">\n</{D}invoke>',  # no name
    f'<{D}tool_calls>\n<{D}invoke name="f">\nstray\n</{D}invoke>',
])
def test_malformed_markup_comes_back_as_content(bad: str) -> None:
    out = parse("Hi" + bad + " and more")
    assert out.tool_calls == []
    assert out.content == "Hi" + bad + " and more"


def test_a_malformed_call_after_a_good_one_keeps_the_good_one() -> None:
    out = parse("x" + block(WEATHER, f'<{D}invoke name="f">oops</{D}invoke>'))
    assert [c.name for c in out.tool_calls] == ["get_weather"]
    assert out.content.startswith("x\n<" + D + 'invoke name="f">oops')


def test_finish_is_final() -> None:
    parser = ChatOutputParser(reasoning=False, tools=True)
    parser.feed("a")
    parser.finish()
    assert parser.finish() == ChatOutput()
    with pytest.raises(RuntimeError):
        parser.feed("b")


# ---------------------------------------------------------------------------------------------- streaming
def test_partial_markers_are_held_back_only_while_they_could_start_a_marker() -> None:
    parser = ChatOutputParser(reasoning=True, tools=True, call_id=ids())
    assert parser.feed("abc</th") == ChatOutput("abc", "")
    assert parser.feed("ink>Hi\n") == ChatOutput("", "Hi")
    assert parser.feed("\n<｜DS") == ChatOutput("", "")  # "\n\n<｜DS" may start a tool_calls block
    assert parser.feed("x") == ChatOutput("", "\n\n<｜DSx")  # it did not
    assert parser.feed("2 <") == ChatOutput("", "2 ")
    assert parser.finish() == ChatOutput("", "<")  # held text is never lost (vLLM's "2 <")


def test_split_at_every_point_and_per_character() -> None:
    text = "Think: a </thin k> b.</think>Answer: a < b.\n" + block(WEATHER, invoke("noop")) + "\nbye"
    whole = parse(text, reasoning=True)
    assert whole.content == "Answer: a < b.\n\nbye" and len(whole.tool_calls) == 2
    for cut in range(len(text) + 1):
        result, joined = fed([text[:cut], text[cut:]], reasoning=True, tools=True)
        assert result == whole == joined, cut
    result, joined = fed(list(text), reasoning=True, tools=True)
    assert result == whole == joined


# Generations built from parts, so that the expected reading is known.
_TEXT = st.lists(st.sampled_from(list("ab <>/\n\"'|｜DSMLthinkvoe=") + ["</think>", "<think>", "\n\n"]),
                 max_size=12).map("".join)
_VALUE = st.one_of(
    st.tuples(st.text(max_size=10).filter(lambda s: f"</{D}parameter>" not in s), st.just(True)),
    st.tuples(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=2)).map(json.dumps),
              st.just(False)),
)
_NAME = st.text(alphabet="abcxyz_", min_size=1, max_size=6)


@st.composite
def generations(draw: st.DrawFn) -> tuple[str, bool, ChatOutput]:
    reasoning = draw(st.booleans())
    think = draw(_TEXT.filter(lambda s: "</think>" not in s)) if reasoning else None
    content = draw(_TEXT.filter(lambda s: "<｜DSML｜tool_calls>" not in s))
    calls = []
    for _ in range(draw(st.integers(0, 3))):
        params = draw(st.dictionaries(_NAME, _VALUE, max_size=3))
        calls.append((draw(_NAME), params))
    text = (think + "</think>" if think is not None else "") + content
    expected = ChatOutput(think, content)
    if calls:
        text += block(*(invoke(n, *((k, v, s) for k, (v, s) in p.items())) for n, p in calls))
        for i, (name, params) in enumerate(calls):
            args = {k: (v if s else json.loads(v)) for k, (v, s) in params.items()}
            expected.tool_calls.append(ToolCall(f"call_{i}", name, json.dumps(args, ensure_ascii=False)))
    return text, reasoning, expected


def _cuts(draw: st.DrawFn, text: str) -> list[str]:
    points = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), gen=generations())
def test_any_split_reads_the_same(data: st.DataObject, gen: tuple[str, bool, ChatOutput]) -> None:
    text, reasoning, expected = gen
    whole = parse(text, reasoning=reasoning)
    # well-formed: content without markup, arguments that are the JSON of the parameters
    assert (whole.reasoning, whole.content) == (expected.reasoning, expected.content)
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == \
        [(c.name, json.loads(c.arguments)) for c in expected.tool_calls]
    assert D not in whole.content
    result, joined = fed(_cuts(data.draw, text), reasoning=reasoning, tools=True)
    assert result == whole == joined


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), text=st.lists(st.sampled_from(
    ["a", " ", "\n", "<", ">", "/", '"', "=", "｜", "</think>", f"<{D}tool_calls>", f"</{D}tool_calls>",
     f'<{D}invoke name="f">', f"</{D}invoke>", f'<{D}parameter name="p" string="true">',
     f'<{D}parameter name="q" string="false">', f"</{D}parameter>", "1", "\n\n"]), max_size=30).map("".join),
    reasoning=st.booleans(), tools=st.booleans())
def test_arbitrary_output_never_raises_loses_or_reorders_text(
    data: st.DataObject, text: str, reasoning: bool, tools: bool
) -> None:
    whole = parse(text, reasoning=reasoning, tools=tools)
    result, joined = fed(_cuts(data.draw, text), reasoning=reasoning, tools=tools)
    assert result == whole == joined
    for call in whole.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    if not tools:  # no markup read: every character is still there, in order
        assert (whole.reasoning or "") + ("</think>" if reasoning and "</think>" in text else "") + whole.content \
            == text

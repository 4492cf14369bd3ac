"""Chat completions on the OpenAI wire: the prompt rendered from a request, the constraint on its output (a forced
tool call, ``response_format``), and each choice's generated text read back as ``reasoning_content``, ``content``
and ``tool_calls`` (whole, or as stream deltas)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsv4.chat.output import THINK_END, THINK_START, ChatOutput, ChatOutputParser, ToolCall, new_call_id
from dsv4.engine.grammar import MAX_WHITESPACE, StructuredOutputs, as_format, check_json_schema
from dsv4.engine.outputs import CompletionOutput
from dsv4.engine.tokenizer import Tokenizer
from dsv4.serve.protocol import ChatCompletionRequest, OpenAIError, structured_spec

__all__ = ["ChatMode", "ChoiceReader", "chat_constraint", "render_chat_prompt"]


@dataclass(frozen=True)
class ChatMode:
    """How a request's output is read: reasoning open at the start (the prompt ends with ``<think>``), and
    DSML tool calls parsed (tools offered and ``tool_choice`` not "none")."""

    reasoning: bool
    tools: bool


def render_chat_prompt(tok: Tokenizer, req: ChatCompletionRequest) -> tuple[str, ChatMode]:
    """The prompt text of a chat request and how its output is to be read; 400 for what is not supported."""
    choice = req.tool_choice
    # tool_choice "none": the tools stay out of the prompt, and DSML in the output stays content.
    tools = req.tools if req.tools and choice != "none" else None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **req.template_kwargs())
    except ValueError as e:
        raise OpenAIError(str(e), param="messages") from None
    return text, ChatMode(reasoning=text.rstrip().endswith(THINK_START), tools=tools is not None)


def chat_constraint(req: ChatCompletionRequest, mode: ChatMode) -> StructuredOutputs | None:
    """What the reply must match, or None: with ``tool_choice`` "required" or a named function, one DSML
    ``tool_calls`` block (of that function) whose arguments follow the tools' schemas; with a JSON
    ``response_format``, JSON content (or, tools offered under "auto", that or a tool-call block); else
    ``structured_outputs`` / ``guided_*`` as given. In thinking mode the reasoning before ``</think>`` is free.
    A forced tool call takes precedence over ``response_format`` (the reply is the call, as OpenAI does)."""
    given = req.structured()
    fmt = req.response_format.spec() if req.response_format is not None else None
    forced = mode.tools and (req.tool_choice == "required" or not isinstance(req.tool_choice, str | None))
    if given is not None and (forced or fmt is not None):
        other = "tool_choice" if forced else "response_format"
        raise OpenAIError(f"{given[1]} cannot be combined with {other}", param=given[1])
    if not mode.tools and (req.tool_choice == "required" or not isinstance(req.tool_choice, str | None)):
        raise OpenAIError("this tool_choice needs tools", param="tool_choice")
    if forced:
        return _tag(mode, _tool_calls_format(req, "tool_choice"), "tool_choice")
    if fmt is not None:
        content = as_format(fmt)
        if mode.tools:
            content = {"type": "or", "elements": [content, _tool_calls_format(req, "tools")]}
        return _tag(mode, content, "response_format") if mode.reasoning or mode.tools else fmt
    if given is None:
        return None
    spec, param = given
    return _tag(mode, as_format(spec), param) if mode.reasoning and spec.kind != "structural_tag" else spec


def _tool_calls_format(req: ChatCompletionRequest, param: str) -> dict[str, Any]:
    """The structural-tag format of one DSML tool_calls block, calling the function ``tool_choice`` names or (else)
    any of ``tools``, with arguments following its schema (xgrammar's ``deepseek_v4`` tag)."""
    import xgrammar as xgr

    tools: list[Any] = list(req.tools or [])
    for i, tool in enumerate(tools):  # what xgrammar would not enforce is refused, as for response_format
        try:
            check_json_schema(tool["function"].get("parameters") or {}, f"tools.{i}.function.parameters")
        except ValueError as e:
            raise OpenAIError(str(e), param="tools") from None
    choice: Any = req.tool_choice if req.tool_choice not in (None, "auto") else "required"
    if not isinstance(choice, str):
        assert choice is not None
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            raise OpenAIError(f"tool_choice names the function {choice.function.name!r}, which is not among the "
                              f"tools ({', '.join(map(repr, names))})", param="tool_choice")
        choice = choice.model_dump()
    try:
        tag = xgr.get_model_structural_tag("deepseek_v4", tools=tools, tool_choice=choice, reasoning="disabled",
                                           parallel_tool_calls=req.parallel_tool_calls is not False,
                                           max_whitespace_cnt=MAX_WHITESPACE)
    except (ValueError, TypeError) as e:
        raise OpenAIError(f"tools cannot be enforced: {e}", param=param) from None
    return tag.format.model_dump(mode="json")


def _tag(mode: ChatMode, content: dict[str, Any], param: str) -> StructuredOutputs:
    """``content`` (a structural-tag format) as the reply's constraint, after free reasoning in thinking mode."""
    if mode.reasoning:
        reasoning = {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": THINK_END}
        content = {"type": "sequence", "elements": [reasoning, content]}
    return structured_spec({"structural_tag": {"type": "structural_tag", "format": content}}, param)


class ChoiceReader:
    """One choice's generated text read back: :meth:`delta` per streamed step, :meth:`message` when whole."""

    def __init__(self, mode: ChatMode, call_id: Callable[[], str] = new_call_id) -> None:
        self.mode = mode
        self.parser = ChatOutputParser(reasoning=mode.reasoning, tools=mode.tools, call_id=call_id)

    def delta(self, c: CompletionOutput, start: int) -> dict[str, Any]:
        """The ``delta`` of a stream chunk for ``c.text[start:]`` (empty while text is held back)."""
        part = self.parser.feed(c.text[start:])
        if c.finish_reason is not None:
            last = self.parser.finish()
            part = ChatOutput(_join(part.reasoning, last.reasoning), part.content + last.content,
                              part.tool_calls + last.tool_calls)
        delta: dict[str, Any] = {}
        if part.reasoning:
            delta["reasoning_content"] = part.reasoning
        if part.content:
            delta["content"] = part.content
        if part.tool_calls:
            first = len(self.parser.result.tool_calls) - len(part.tool_calls)
            delta["tool_calls"] = [_tool_call(call, first + i) for i, call in enumerate(part.tool_calls)]
        return delta

    def message(self, c: CompletionOutput) -> dict[str, Any]:
        """The whole ``message`` of a finished choice."""
        self.parser.feed(c.text)
        self.parser.finish()
        out = self.parser.result
        message: dict[str, Any] = {"role": "assistant", "content": out.content}
        if out.reasoning is not None:
            message["reasoning_content"] = out.reasoning
        if out.tool_calls:
            message["content"] = out.content or None  # OpenAI's shape for a reply that only calls tools
            message["tool_calls"] = [_tool_call(call, None) for call in out.tool_calls]
        return message

    def finish_reason(self, c: CompletionOutput) -> str | None:
        """``tool_calls`` when a generation that ended by itself made calls, else the engine's reason."""
        if c.finish_reason == "stop" and self.parser.result.tool_calls:
            return "tool_calls"
        return c.finish_reason


def _tool_call(call: ToolCall, index: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments}}
    return body if index is None else {"index": index, **body}


def _join(a: str | None, b: str | None) -> str | None:
    return None if a is None and b is None else (a or "") + (b or "")

"""Chat completions on the OpenAI wire: the prompt rendered from a request, and each choice's generated text read
back as ``reasoning_content``, ``content`` and ``tool_calls`` (whole, or as stream deltas)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsv4.chat.output import THINK_START, ChatOutput, ChatOutputParser, ToolCall, new_call_id
from dsv4.engine.outputs import CompletionOutput
from dsv4.engine.tokenizer import Tokenizer
from dsv4.serve.protocol import ChatCompletionRequest, OpenAIError

__all__ = ["ChatMode", "ChoiceReader", "render_chat_prompt"]


@dataclass(frozen=True)
class ChatMode:
    """How a request's output is read: reasoning open at the start (the prompt ends with ``<think>``), and
    DSML tool calls parsed (tools offered and ``tool_choice`` not "none")."""

    reasoning: bool
    tools: bool


def render_chat_prompt(tok: Tokenizer, req: ChatCompletionRequest) -> tuple[str, ChatMode]:
    """The prompt text of a chat request and how its output is to be read; 400 for what is not supported."""
    if req.response_format is not None and req.response_format.type != "text":
        raise OpenAIError(f"response_format type {req.response_format.type!r} is not supported yet (only 'text': "
                          "structured output needs constrained decoding)", param="response_format")
    choice = req.tool_choice
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        shown = "'required'" if choice == "required" else "a named function"
        raise OpenAIError(f"tool_choice {shown} is not supported yet (it needs constrained decoding); use 'auto' "
                          "or 'none'", param="tool_choice")
    # tool_choice "none": the tools stay out of the prompt, and DSML in the output stays content.
    tools = req.tools if req.tools and choice != "none" else None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **req.template_kwargs())
    except ValueError as e:
        raise OpenAIError(str(e), param="messages") from None
    return text, ChatMode(reasoning=text.rstrip().endswith(THINK_START), tools=tools is not None)


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

"""DeepSeek-V4's chat output read back: reasoning, content and DSML tool calls, from text fed in pieces.

A generation in DeepSeek-V4's format is ``{reasoning}</think>{content}\\n\\n<｜DSML｜tool_calls>…</｜DSML｜tool_calls>``
(the reasoning only when the prompt opened ``<think>``). :class:`ChatOutputParser` is a state machine fed the text
as it is decoded, in deltas cut anywhere, even inside a marker; it holds back only the end of the text that could
still start a marker, so no text is lost or delayed longer than that, and the result does not depend on where the
text was cut. A tool call is reported once its ``</｜DSML｜invoke>`` has arrived and it parsed, whole: its
arguments are then one valid JSON object. Markup that turns out malformed, or that the generation leaves
unfinished, comes back as content, as it was written (and is logged); the parser never raises on model output.

The markup, as DeepSeek's reference encoder writes it (``encoding_dsv4.py``)::

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

``string="true"``: the value is the raw text; ``string="false"``: the value is JSON. Whitespace between the
elements is not significant here (the reference writes single newlines); parameter values are kept exactly.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from loguru import logger

__all__ = [
    "DSML",
    "THINK_END",
    "THINK_START",
    "TOOL_CALLS_END",
    "TOOL_CALLS_START",
    "ChatOutput",
    "ChatOutputParser",
    "ToolCall",
    "parse_chat_output",
]

THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_START = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_END = f"</{DSML}parameter>"
# The reference encoder writes the block two newlines after the content; they belong to the markup.
SEPARATOR = "\n\n"

_INVOKE_HEAD = re.compile(rf'<{DSML}invoke\s+name="([^"<>\n]+)"\s*>')
_PARAMETER_HEAD = re.compile(rf'\s*<{DSML}parameter\s+name="([^"<>\n]+)"\s+string="(true|false)"\s*>')


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: an id, the function's name and its arguments as a JSON object's text."""

    id: str
    name: str
    arguments: str


@dataclass
class ChatOutput:
    """What a generation (or a piece of one) holds: reasoning (None when no reasoning was open), content and the
    tool calls, in order."""

    reasoning: str | None = None
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class _State(Enum):
    REASONING = "reasoning"  # inside <think>, until </think>
    CONTENT = "content"  # the answer; a tool_calls block may start (when tools are on)
    TOOL_CALLS = "tool_calls"  # inside a <｜DSML｜tool_calls> block
    PLAIN = "plain"  # after malformed markup: the rest is content as written


def new_call_id() -> str:
    """A fresh OpenAI-style tool-call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatOutputParser:
    """Incremental reader of one generation: :meth:`feed` each text delta, then :meth:`finish` once.

    ``reasoning``: the prompt opened ``<think>`` (thinking mode), so the text is reasoning until ``</think>``; if
    that never comes, all of it stays reasoning. Without it there is no reasoning: all text is content.
    ``tools``: DSML tool-call blocks are parsed (else they are content). Each call returns what became known
    with that delta; the attributes accumulate the whole result.
    """

    def __init__(self, *, reasoning: bool, tools: bool, call_id: Callable[[], str] = new_call_id) -> None:
        self.tools = tools
        self.call_id = call_id
        self.result = ChatOutput(reasoning="" if reasoning else None)
        self._state = _State.REASONING if reasoning else _State.CONTENT
        self._buf = ""  # text fed but not yet given out
        self._raw = ""  # markup consumed inside a tool_calls block but not yet part of a reported call
        self._finished = False

    # ------------------------------------------------------------------------------------------ feeding
    def feed(self, text: str) -> ChatOutput:
        """Take the next piece of the generation; return what it completed."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        out = ChatOutput(reasoning="" if self.result.reasoning is not None else None)
        progressed = True
        while progressed and self._buf:
            progressed = self._step(out)
        return self._record(out)

    def finish(self) -> ChatOutput:
        """The generation has ended: give out what was held back (unfinished markup as content)."""
        out = ChatOutput(reasoning="" if self.result.reasoning is not None else None)
        if not self._finished:
            self._finished = True
            if self._state is _State.REASONING:
                out.reasoning = (out.reasoning or "") + self._buf
            else:
                if self._state is _State.TOOL_CALLS:
                    logger.warning("tool-call markup left unfinished at the end of the generation; returned as "
                                   "content: {!r}", (self._raw + self._buf)[:200])
                out.content += self._raw + self._buf
            self._buf = self._raw = ""
        return self._record(out)

    # ------------------------------------------------------------------------------------------ states
    def _step(self, out: ChatOutput) -> bool:
        """Consume what the current state can from the buffer; whether anything changed."""
        if self._state is _State.REASONING:
            at = self._buf.find(THINK_END)
            if at < 0:
                keep = _partial_suffix(self._buf, THINK_END)
                out.reasoning = (out.reasoning or "") + self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return False
            out.reasoning = (out.reasoning or "") + self._buf[:at]
            self._buf = self._buf[at + len(THINK_END):]
            self._state = _State.CONTENT
            return True
        if self._state is _State.CONTENT:
            if not self.tools:
                out.content += self._buf
                self._buf = ""
                return False
            at = self._buf.find(TOOL_CALLS_START)
            if at < 0:
                keep = _partial_suffix(self._buf, SEPARATOR + TOOL_CALLS_START, TOOL_CALLS_START)
                out.content += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return False
            before = self._buf[:at]
            separator = SEPARATOR if before.endswith(SEPARATOR) else ""
            out.content += before[: len(before) - len(separator)]
            self._raw = separator + TOOL_CALLS_START
            self._buf = self._buf[at + len(TOOL_CALLS_START):]
            self._state = _State.TOOL_CALLS
            return True
        if self._state is _State.TOOL_CALLS:
            return self._step_tool_calls(out)
        out.content += self._buf  # PLAIN
        self._buf = ""
        return False

    def _step_tool_calls(self, out: ChatOutput) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(TOOL_CALLS_END):
            self._buf = rest[len(TOOL_CALLS_END):]
            self._raw = ""
            self._state = _State.CONTENT
            return True
        if rest.startswith(INVOKE_START):
            end = rest.find(INVOKE_END)
            if end < 0:
                return False  # wait for the rest of the call
            segment = rest[: end + len(INVOKE_END)]
            call = _parse_invoke(segment, self.call_id)
            if call is None:
                return self._malformed(out, f"a malformed invoke: {segment[:200]!r}")
            out.tool_calls.append(call)
            self._buf = rest[len(segment):]
            self._raw = ""
            return True
        if not rest or INVOKE_START.startswith(rest) or TOOL_CALLS_END.startswith(rest):
            return False  # whitespace, or the start of the next element
        return self._malformed(out, f"unexpected text in a tool_calls block: {rest[:200]!r}")

    def _malformed(self, out: ChatOutput, why: str) -> bool:
        logger.warning("tool-call markup is malformed ({}); it and the rest of the generation are content", why)
        out.content += self._raw + self._buf
        self._raw = self._buf = ""
        self._state = _State.PLAIN
        return False

    def _record(self, out: ChatOutput) -> ChatOutput:
        if out.reasoning:
            self.result.reasoning = (self.result.reasoning or "") + out.reasoning
        self.result.content += out.content
        self.result.tool_calls += out.tool_calls
        return out


def parse_chat_output(text: str, *, reasoning: bool, tools: bool,
                      call_id: Callable[[], str] = new_call_id) -> ChatOutput:
    """A whole generation read at once (the same result as feeding it in any pieces)."""
    parser = ChatOutputParser(reasoning=reasoning, tools=tools, call_id=call_id)
    parser.feed(text)
    parser.finish()
    return parser.result


# ---------------------------------------------------------------------------------------------- helpers
def _partial_suffix(text: str, *markers: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of one of ``markers`` (held back)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def _parse_invoke(segment: str, call_id: Callable[[], str]) -> ToolCall | None:
    """``<｜DSML｜invoke name="…">…</｜DSML｜invoke>`` as a call, or None when it is not well formed."""
    head = _INVOKE_HEAD.match(segment)
    if head is None:
        return None
    pos, args = head.end(), {}
    body_end = len(segment) - len(INVOKE_END)
    while True:
        param = _PARAMETER_HEAD.match(segment, pos)
        if param is None:
            break
        end = segment.find(PARAMETER_END, param.end(), body_end)
        if end < 0:
            return None
        name, is_string, value = param.group(1), param.group(2) == "true", segment[param.end():end]
        if name in args:
            return None  # JSON objects with a key twice are not what a client expects
        args[name] = json.dumps(value, ensure_ascii=False) if is_string else _json_value(name, value)
        pos = end + len(PARAMETER_END)
    if segment[pos:body_end].strip():
        return None
    # the reference decoder's spelling: {"key": value, ...}
    arguments = "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in args.items()) + "}"
    return ToolCall(id=call_id(), name=head.group(1), arguments=arguments)


def _json_value(name: str, text: str) -> str:
    """A ``string="false"`` value: its JSON text; text that is not JSON is kept as a string (and logged)."""
    try:
        json.loads(text, parse_constant=_no_constant)
    except ValueError:
        logger.warning("tool-call parameter {!r} is marked JSON but is not; passed as a string: {!r}", name,
                       text[:200])
        return json.dumps(text, ensure_ascii=False)
    return text.strip()


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")

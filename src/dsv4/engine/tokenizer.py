"""A checkpoint's tokenizer: its fast-tokenizer ``tokenizer.json`` plus what ``tokenizer_config.json`` says.

Chat templates render exactly as transformers renders them (same sandbox, globals and filters), so a checkpoint
that ships a template gets the prompt its authors tested. A checkpoint without one gets DeepSeek-V4's own chat
format, :data:`DEEPSEEK_V4_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["DEEPSEEK_V4_CHAT_TEMPLATE", "Tokenizer"]

# DeepSeek-V4's chat format, as jinja: DeepSeek's reference encoder `encoding/encoding_dsv4.py` (published with
# the DeepSeek-V4-Flash and -Pro weights, which ship no chat template) re-expressed step for step, and checked
# byte for byte against it: `merge_tool_messages` (tool results join the following user turn as
# `<tool_result>…</tool_result>` blocks, consecutive user turns merge, joined by a blank line),
# `sort_tool_results_by_call_order`, `_drop_thinking_messages` and `render_message`. In short:
#
#   <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{reply}<｜end▁of▁sentence｜><｜User｜>…
#
# Chat mode opens every reply with `</think>`. `thinking=True` (or `enable_thinking=True`, vLLM's spelling) opens
# the reply to the last user turn with `<think>` and renders `{reasoning_content}</think>` before the content of
# replies after it; earlier replies lose their reasoning unless `drop_thinking=False` or tools are present, as in
# the reference. `reasoning_effort="max"` puts the reference's preamble first in thinking mode ("high" and None
# add nothing). `tools` (OpenAI's request-level list) go on the first system message, an empty one being added
# when the conversation has none, as SGLang's adapter does; a system or developer message's own `tools` and
# `response_format` keys, the `latest_reminder` role, the `task` and `wo_eos` keys render as in the reference.
# Two departures, both for input the reference cannot take: `add_generation_prompt=False` leaves the final
# `<｜Assistant｜>` opener out (the reference always writes it), and tool-call arguments given as an object rather
# than a JSON string render as their keys (the reference nests them under a key "arguments").
# `fromjson` is a filter of dsv4's environment (transformers has none).
_DSV4_TOOLS_PROMPT = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    "\"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
_DSV4_RESPONSE_FORMAT_PROMPT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
_DSV4_REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
_DSV4_TASK_TOKENS = ("action", "query", "authority", "domain", "title", "read_url")

_DSV4_TEMPLATE_SOURCE = r"""
{%- set think = true if (thinking is defined and thinking) or (enable_thinking is defined and enable_thinking)
    else false -%}
{%- set effort = reasoning_effort if reasoning_effort is defined else none -%}
{%- if effort is not none and effort not in ['high', 'max'] -%}
    {{- raise_exception('reasoning_effort must be "high", "max" or none, got ' ~ effort | tojson) -}}
{%- endif -%}
{%- set bos = bos_token if bos_token is defined and bos_token else '<｜begin▁of▁sentence｜>' -%}
{%- set eos = eos_token if eos_token is defined and eos_token else '<｜end▁of▁sentence｜>' -%}
{%- set dsml = '｜DSML｜' -%}
{%- set task_tokens = @TASK_TOKENS@ -%}
{%- set request_tools = tools if tools is defined and tools else none -%}
{%- set needs_system = request_tools and (not messages or messages[0].role != 'system') -%}
{%- set head = [{'role': 'system', 'content': ''}] if needs_system else [] -%}
{#- merge_tool_messages: tool results and user text become the blocks of user turns. -#}
{%- set ns = namespace(msgs=[], any_tools=request_tools is not none) -%}
{%- for m in head + messages -%}
    {%- if m.tools is defined and m.tools -%}{%- set ns.any_tools = true -%}{%- endif -%}
    {%- set prev = ns.msgs[-1] if ns.msgs else none -%}
    {%- set into_prev = prev is not none and prev.role == 'user' and prev.blocks is defined -%}
    {%- if m.role == 'tool' -%}
        {%- set block = {'type': 'tool_result', 'id': m.tool_call_id if m.tool_call_id is defined and
            m.tool_call_id else '', 'text': m.content} -%}
    {%- elif m.role == 'user' -%}
        {%- set block = {'type': 'text', 'text': m.content} -%}
        {%- set into_prev = into_prev and prev.task is none -%}
    {%- endif -%}
    {%- if m.role in ['tool', 'user'] and into_prev -%}
        {%- set ns.msgs = ns.msgs[:-1] + [{'role': 'user', 'blocks': prev.blocks + [block], 'task': prev.task,
            'wo_eos': prev.wo_eos}] -%}
    {%- elif m.role == 'tool' -%}
        {%- set ns.msgs = ns.msgs + [{'role': 'user', 'blocks': [block], 'task': none, 'wo_eos': none}] -%}
    {%- elif m.role == 'user' -%}
        {%- set ns.msgs = ns.msgs + [{'role': 'user', 'blocks': [block],
            'task': m.task if m.task is defined else none, 'wo_eos': m.wo_eos if m.wo_eos is defined else none}] -%}
    {%- else -%}
        {%- set ns.msgs = ns.msgs + [m] -%}
    {%- endif -%}
{%- endfor -%}
{#- sort_tool_results_by_call_order: a user turn's results follow the order of the latest calls (stable). -#}
{%- set sorted = namespace(msgs=[], ids=[]) -%}
{%- for m in ns.msgs -%}
    {%- if m.role == 'assistant' and m.tool_calls is defined and m.tool_calls -%}
        {%- set sorted.ids = [] -%}
        {%- for tc in m.tool_calls -%}
            {%- set sorted.ids = sorted.ids + [tc.id if tc.id is defined and tc.id else ''] -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if m.role == 'user' and m.blocks is defined -%}
        {%- set results = namespace(items=[]) -%}
        {%- for b in m.blocks if b.type == 'tool_result' -%}
            {%- set found = namespace(at=0) -%}
            {%- for cid in sorted.ids -%}
                {%- if b.id and cid == b.id -%}{%- set found.at = loop.index0 -%}{%- endif -%}
            {%- endfor -%}
            {%- set results.items = results.items + [{'order': found.at, 'text': b.text}] -%}
        {%- endfor -%}
        {%- set results.items = results.items | sort(attribute='order') | list -%}
        {%- set parts = namespace(texts=[], k=0) -%}
        {%- for b in m.blocks -%}
            {%- if b.type == 'text' -%}
                {%- set parts.texts = parts.texts + [b.text] -%}
            {%- else -%}
                {%- set parts.texts = parts.texts
                    + ['<tool_result>' ~ results.items[parts.k].text ~ '</tool_result>'] -%}
                {%- set parts.k = parts.k + 1 -%}
            {%- endif -%}
        {%- endfor -%}
        {%- set sorted.msgs = sorted.msgs + [{'role': 'user', 'text': parts.texts | join('\n\n'), 'task': m.task,
            'wo_eos': m.wo_eos}] -%}
    {%- else -%}
        {%- set sorted.msgs = sorted.msgs + [m] -%}
    {%- endif -%}
{%- endfor -%}
{%- set drop = false if (drop_thinking is defined and not drop_thinking) or ns.any_tools else true -%}
{#- _drop_thinking_messages: in thinking mode, turns before the last user turn lose their developer messages
    (and their reasoning, which render below leaves out). -#}
{%- set ns.msgs = sorted.msgs -%}
{%- set ns.last = -1 -%}
{%- for m in ns.msgs -%}
    {%- if m.role in ['user', 'developer'] -%}{%- set ns.last = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- if think and drop -%}
    {%- set kept = namespace(msgs=[]) -%}
    {%- for m in ns.msgs -%}
        {%- if m.role in ['user', 'system', 'tool', 'latest_reminder', 'direct_search_results', 'assistant']
            or loop.index0 >= ns.last -%}
            {%- set kept.msgs = kept.msgs + [m] -%}
        {%- endif -%}
    {%- endfor -%}
    {%- set ns.msgs = kept.msgs -%}
    {%- set ns.last = -1 -%}
    {%- for m in ns.msgs -%}
        {%- if m.role in ['user', 'developer'] -%}{%- set ns.last = loop.index0 -%}{%- endif -%}
    {%- endfor -%}
{%- endif -%}
{#- render_message -#}
{{- bos -}}
{%- for m in ns.msgs -%}
    {%- set i = loop.index0 -%}
    {%- if i == 0 and think and effort == 'max' -%}{{- @EFFORT_MAX@ -}}{%- endif -%}
    {%- set own_tools = request_tools if i == 0 and request_tools and m.role == 'system'
        else (m.tools if m.tools is defined and m.tools else none) -%}
    {%- set extra = namespace(text='') -%}
    {%- if own_tools and m.role in ['system', 'developer'] -%}
        {%- set schemas = namespace(lines=[]) -%}
        {%- for t in own_tools -%}
            {%- set schemas.lines = schemas.lines + [(t.function if t.function is defined else t) | tojson] -%}
        {%- endfor -%}
        {%- set extra.text = '\n\n' ~ @TOOLS_HEAD@ ~ schemas.lines | join('\n') ~ @TOOLS_TAIL@ -%}
    {%- endif -%}
    {%- if m.role in ['system', 'developer'] and m.response_format is defined and m.response_format -%}
        {%- set extra.text = extra.text ~ '\n\n' ~ @RESPONSE_FORMAT@ ~ m.response_format | tojson -%}
    {%- endif -%}
    {%- if m.role == 'system' -%}
        {{- (m.content if m.content is defined and m.content is not none else '') ~ extra.text -}}
    {%- elif m.role == 'developer' -%}
        {{- '<｜User｜>' ~ m.content ~ extra.text -}}
    {%- elif m.role == 'user' -%}
        {{- '<｜User｜>' ~ m.text -}}
    {%- elif m.role == 'latest_reminder' -%}
        {{- '<｜latest_reminder｜>' ~ m.content -}}
    {%- elif m.role == 'assistant' -%}
        {%- set prev_task = i > 0 and ns.msgs[i - 1].task is defined and ns.msgs[i - 1].task is not none -%}
        {%- if think and not prev_task and (not drop or i > ns.last) -%}
            {{- (m.reasoning_content if m.reasoning_content is defined and m.reasoning_content is not none
                else '') ~ '</think>' -}}
        {%- endif -%}
        {{- m.content if m.content is defined and m.content is not none else '' -}}
        {%- if m.tool_calls is defined and m.tool_calls -%}
            {%- set calls = namespace(texts=[]) -%}
            {%- for tc in m.tool_calls -%}
                {%- set fn = tc.function if tc.function is defined else tc -%}
                {%- set raw = fn.arguments if fn.arguments is defined else {} -%}
                {%- set args = (raw | fromjson) if raw is string else raw -%}
                {%- set args = args if args is mapping else {'arguments': raw} -%}
                {%- set params = namespace(lines=[]) -%}
                {%- for key, value in args.items() -%}
                    {%- set params.lines = params.lines + ['<' ~ dsml ~ 'parameter name="' ~ key ~ '" string="'
                        ~ ('true">' ~ value if value is string else 'false">' ~ value | tojson)
                        ~ '</' ~ dsml ~ 'parameter>'] -%}
                {%- endfor -%}
                {%- set calls.texts = calls.texts + ['<' ~ dsml ~ 'invoke name="' ~ fn.name ~ '">\n'
                    ~ params.lines | join('\n') ~ '\n</' ~ dsml ~ 'invoke>'] -%}
            {%- endfor -%}
            {{- '\n\n<' ~ dsml ~ 'tool_calls>\n' ~ calls.texts | join('\n') ~ '\n</' ~ dsml ~ 'tool_calls>' -}}
        {%- endif -%}
        {%- if not (m.wo_eos is defined and m.wo_eos) -%}{{- eos -}}{%- endif -%}
    {%- else -%}
        {{- raise_exception('DeepSeek-V4 chat format has no role ' ~ m.role | tojson
            ~ ' (roles: system, user, assistant, tool, developer, latest_reminder)') -}}
    {%- endif -%}
    {#- What follows a turn: nothing before another user turn; the reply's opener (or a task token) else. -#}
    {%- set last = i + 1 == ns.msgs | length -%}
    {%- set opens = add_generation_prompt if last else ns.msgs[i + 1].role in ['assistant', 'latest_reminder'] -%}
    {%- set task = m.task if m.task is defined and m.task is not none else none -%}
    {%- if opens and task is not none -%}
        {%- if task not in task_tokens -%}
            {{- raise_exception('unknown task ' ~ task | tojson ~ ' (tasks: ' ~ task_tokens | join(', ') ~ ')') -}}
        {%- elif task != 'action' -%}
            {{- '<｜' ~ task ~ '｜>' -}}
        {%- else -%}
            {{- '<｜Assistant｜>' ~ ('<think>' if think else '</think>') ~ '<｜action｜>' -}}
        {%- endif -%}
    {%- elif opens and m.role in ['user', 'developer'] -%}
        {{- '<｜Assistant｜>' ~ ('<think>' if think and (not drop or i >= ns.last) else '</think>') -}}
    {%- endif -%}
{%- endfor -%}
"""


def _jinja_literal(text: str) -> str:
    # JSON's escapes are Jinja's (its lexer decodes string literals as unicode-escape).
    return json.dumps(text)


_TOOLS_HEAD, _TOOLS_TAIL = _DSV4_TOOLS_PROMPT.split("{tool_schemas}")
DEEPSEEK_V4_CHAT_TEMPLATE = (
    _DSV4_TEMPLATE_SOURCE.replace("@TASK_TOKENS@", json.dumps(list(_DSV4_TASK_TOKENS)))
    .replace("@EFFORT_MAX@", _jinja_literal(_DSV4_REASONING_EFFORT_MAX))
    .replace("@TOOLS_HEAD@", _jinja_literal(_TOOLS_HEAD))
    .replace("@TOOLS_TAIL@", _jinja_literal(_TOOLS_TAIL))
    .replace("@RESPONSE_FORMAT@", _jinja_literal(_DSV4_RESPONSE_FORMAT_PROMPT))
)

_CONFIG_FILE = "tokenizer_config.json"
_TOKENIZER_FILE = "tokenizer.json"
# Template files beside tokenizer_config.json, later ones winning: processors save chat_template.json, newer
# transformers saves chat_template.jinja (and prefers it to the config's entry).
_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")
# Names transformers accepts for a message's reasoning; templates read `reasoning_content`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A checkpoint's tokenizer: ids ↔ text, its special tokens, and its chat template.

    ``backend`` is the raw :class:`tokenizers.Tokenizer`. Build one with :meth:`from_pretrained`, or directly
    from a backend and the settings a ``tokenizer_config.json`` would give (named special tokens missing from
    the backend are added to it as special tokens, as transformers does).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        model_max_length: int | None = None,
        name: str = "<tokenizer>",
    ) -> None:
        self.backend = backend
        self.name = name  # where it came from, for error messages
        self.model_max_length = model_max_length
        named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        # Like transformers, a named special token that is not yet an added token becomes a special added token,
        # so that text containing it encodes to its id and decoding can skip it.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        for token in dict.fromkeys(t for t in named.values() if t is not None):
            if token not in added:
                backend.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
        self._named = {k: v for k, v in named.items() if v is not None}

        bos_id = self.token_to_id(bos_token) if bos_token is not None else bos_token_id
        self.bos_token_id: int | None = bos_id
        ids = ([self.token_to_id(eos_token)] if eos_token is not None else []) + list(eos_token_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.pad_token_id: int | None = self.token_to_id(pad_token) if pad_token is not None else None
        # Without token strings in tokenizer_config, the ids of config.json still name them (templates use both).
        if eos_token is None and self.eos_token_ids and (text := self.id_to_token(self.eos_token_ids[0])):
            self._named["eos_token"] = text
        if bos_token is None and bos_id is not None and (text := self.id_to_token(bos_id)):
            self._named["bos_token"] = text
        self._prefix, self._suffix = self._post_processor_specials()
        # The config's add_bos_token / add_eos_token (what DeepSeek's configs say) on top of the post-processor.
        if add_bos_token and self.bos_token_id is not None and self.bos_token_id not in self._prefix:
            self._prefix = [self.bos_token_id, *self._prefix]
        if add_eos_token and self.eos_token_ids and self.eos_token_ids[0] not in self._suffix:
            self._suffix = [*self._suffix, self.eos_token_ids[0]]

        if chat_template is None:
            self._templates: dict[str, str] = {}
        elif isinstance(chat_template, str):
            self._templates = {"default": chat_template}
        else:
            self._templates = dict(chat_template)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``<path>/tokenizer.json`` with ``tokenizer_config.json``, the chat-template files and the eos ids
        of ``generation_config.json`` / ``config.json`` when present. ``path`` may also be the tokenizer.json."""
        root = Path(path)
        file = root if root.is_file() else root / _TOKENIZER_FILE
        root = file.parent
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (the fast tokenizer of the checkpoint is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{file}: not a valid tokenizer.json: {exc}") from exc

        config = _read_json(root / _CONFIG_FILE)
        tokens = {k: _token_content(config.get(k), root / _CONFIG_FILE, k)
                  for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template: str | dict[str, str] | None = _config_template(config.get("chat_template"), root / _CONFIG_FILE)
        for name in _TEMPLATE_FILES:
            if (root / name).is_file():
                template = _file_template(root / name)

        eos_ids: list[int] = []
        bos_id: int | None = None
        for name in ("generation_config.json", "config.json"):
            other = _read_json(root / name)
            eos_ids += _ids(other.get("eos_token_id"), root / name, "eos_token_id")
            if bos_id is None and (bos := _ids(other.get("bos_token_id"), root / name, "bos_token_id")):
                bos_id = bos[0]

        max_len = config.get("model_max_length")
        return cls(
            backend,
            **tokens,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=template,
            eos_token_ids=eos_ids,
            bos_token_id=bos_id,
            # transformers writes a huge sentinel when the length is unknown
            model_max_length=int(max_len) if isinstance(max_len, int | float) and max_len < 1e12 else None,
            name=str(root),
        )

    # ------------------------------------------------------------------------------------------ ids ↔ text
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, the BOS (and any other special tokens the
        tokenizer adds), unless ``text`` already starts (ends) with them, e.g. a rendered chat prompt."""
        try:
            ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError as exc:  # the Rust side takes only valid Unicode: a lone surrogate ("\ud800") is not
            at = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
            if at is None or not isinstance(text, str):
                raise
            raise ValueError(f"text is not valid Unicode: a lone surrogate {ascii(text[at])} at index {at}") from exc
        if not add_special_tokens:
            return ids
        prefix = [] if ids[: len(self._prefix)] == self._prefix else self._prefix
        suffix = [] if self._suffix and ids[-len(self._suffix):] == self._suffix else self._suffix
        return [*prefix, *ids, *suffix]

    # skip_special_tokens may be positional: detok's TokenDecoder protocol (and tokenizers.Tokenizer) take it so.
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are left out unless ``skip_special_tokens=False``."""
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of ``token_id`` (None when out of range)."""
        token: str | None = self.backend.id_to_token(token_id)
        return token

    def token_to_id(self, token: str) -> int | None:
        """The id of the token string ``token`` (None when it is not in the vocabulary)."""
        token_id: int | None = self.backend.token_to_id(token)
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        size: int = self.backend.get_vocab_size(with_added_tokens=True)
        return size

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids})")

    @property
    def bos_token(self) -> str | None:
        """The BOS token string."""
        return self._named.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The main EOS token string (its id is ``eos_token_ids[0]``)."""
        return self._named.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The main EOS id; generation stops at any of :attr:`eos_token_ids`."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of every special token (the ones ``decode`` skips), sorted."""
        ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        ids.update(i for i in (self.bos_token_id, self.pad_token_id, *self.eos_token_ids) if i is not None)
        return tuple(sorted(ids))

    # ------------------------------------------------------------------------------------------ chat
    @property
    def chat_template(self) -> str:
        """The default chat template: the checkpoint's, or :data:`DEEPSEEK_V4_CHAT_TEMPLATE` when it has none."""
        return self._templates.get("default", DEEPSEEK_V4_CHAT_TEMPLATE)

    @property
    def has_own_chat_template(self) -> bool:
        """Whether the checkpoint ships a chat template (otherwise DeepSeek-V4's format is used)."""
        return bool(self._templates)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` (OpenAI-style dicts) to the prompt text, as transformers'
        ``apply_chat_template(..., tokenize=False)`` would. ``kwargs`` reach the template (DeepSeek-V4's format
        reads ``thinking`` and ``drop_thinking``). Encode the result with :meth:`encode`: the template already
        wrote the BOS, so none is added twice."""
        plain = _validate_messages(messages)
        if tools is not None:
            if isinstance(tools, str | bytes) or not all(isinstance(t, Mapping) for t in tools):
                raise ValueError("tools must be a list of JSON-schema dicts")
            tools = _plain(list(tools))
        template, source = self._pick_template(tools)
        compiled = _compile(template, source)
        variables = {**self._named, **_plain(kwargs)}  # like transformers, kwargs override the special tokens
        try:
            text: str = compiled.render(
                messages=plain, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template of {source}: {exc.message or exc}") from exc
        except (TypeError, LookupError, AttributeError, ArithmeticError) as exc:
            # a template meeting input it was not written for (a number where it adds strings, ...)
            raise ValueError(f"chat template of {source} cannot render these messages: "
                             f"{type(exc).__name__}: {exc}") from exc
        return text

    # ------------------------------------------------------------------------------------------ internals
    def _pick_template(self, tools: object) -> tuple[str, str]:
        # transformers' choice among named templates: "tool_use" when tools are given, else "default".
        if not self._templates:
            return DEEPSEEK_V4_CHAT_TEMPLATE, "DeepSeek-V4's built-in format"
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"], f"{self.name} (tool_use)"
        if "default" in self._templates:
            return self._templates["default"], self.name
        raise ValueError(f"{self.name}: several chat templates {sorted(self._templates)} and none named 'default'")

    def _post_processor_specials(self) -> tuple[list[int], list[int]]:
        # The ids the tokenizer.json post-processor puts around a single sequence: encode a probe both ways and
        # find the plain ids inside the processed ones. The probe must encode to something, so besides a few
        # common strings try the text of the first ordinary tokens (a digits-only vocabulary has no "a").
        added = self.backend.get_added_tokens_decoder()
        ordinary = [i for i in range(min(self.vocab_size, 64)) if i not in added]
        for probe in ["a", " ", "0", *(self.backend.decode([i]) for i in ordinary)]:
            plain = self.backend.encode(probe, add_special_tokens=False).ids
            if not plain:
                continue
            full = self.backend.encode(probe, add_special_tokens=True).ids
            for start in range(len(full) - len(plain) + 1):
                if full[start:start + len(plain)] == plain:
                    return full[:start], full[start + len(plain):]
        return [], []


# ---------------------------------------------------------------------------------------------- config files
def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: object, file: Path, key: str) -> str | None:
    # A special token is written either as its string or as an AddedToken dict {"content": ..., ...}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        content: str = value["content"]
        return content
    raise ValueError(f"{file}: {key} must be a string or an AddedToken dict with 'content', got {value!r}")


def _config_template(value: object, file: Path) -> str | dict[str, str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{file}: chat_template must be a string or a list of {{'name', 'template'}} dicts")


def _file_template(file: Path) -> str | dict[str, str] | None:
    if file.suffix == ".jinja":
        return file.read_text(encoding="utf-8")
    # chat_template.json, as processors save it: {"chat_template": <string or named list>}
    return _config_template(_read_json(file).get("chat_template"), file)


def _ids(value: object, file: Path, key: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"{file}: {key} must be an int or a list of ints, got {value!r}")


# ---------------------------------------------------------------------------------------------- messages
def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the messages and give the template plain copies: text parts flattened, None values dropped and
    reasoning aliased the way transformers does."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} needs a 'role' string, got {role!r}")
        content = message.get("content")
        if content is None:
            # OpenAI lets an assistant message that only calls tools have no content.
            if role != "assistant":
                raise ValueError(f"message {i} ({role}) has no 'content'")
        elif isinstance(content, list):
            # DeepSeek-V4's encoder joins a tool result's text blocks by a blank line; vLLM joins other text
            # parts by a newline for templates that take string content.
            content = _flatten_parts(content, i, "\n\n" if role == "tool" else "\n")
        elif not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        plain = _plain({**message, "content": content})
        plain = {k: v for k, v in plain.items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def _flatten_parts(parts: list[Any], index: int, separator: str) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            shown = kind if isinstance(kind, str) else type(part).__name__
            raise ValueError(f"message {index}: content part of type {shown!r} is not supported (only 'text')")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"message {index}: a text part needs a 'text' string")
        texts.append(text)
    return separator.join(texts)


def _plain(value: Any) -> Any:
    # Everything a template sees is rebuilt from plain JSON types, as transformers does: the sandbox does not know
    # which methods of arbitrary objects are dangerous.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic models, e.g. the OpenAI SDK's messages
        return _plain(dump())
    return f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------------------------- jinja
class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` marks assistant text for transformers' masks; it renders as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    # `dict(...)` in a template, without exposing the dict type itself (transformers does the same).
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces refuse underscore names, which could reach CPython internals (as in transformers).
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick, see Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' tojson: unlike jinja's own, it does not HTML-escape and keeps non-ASCII text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _fromjson(text: str) -> Any:
    # For DeepSeek-V4's format: tool-call arguments arrive as JSON strings. None when the text is not JSON.
    try:
        return _plain(json.loads(text))
    except ValueError:
        return None


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # The environment transformers renders chat templates in (same options, globals and filters).
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters["fromjson"] = _fromjson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=32)
def _compile(template: str, source: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template of {source} is not valid jinja (line {exc.lineno}): {exc.message}") from exc

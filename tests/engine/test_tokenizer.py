"""Tokenizer: ids ↔ text, special tokens, config files, chat templates (transformers is the oracle)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dsv4.engine.tokenizer import DEEPSEEK_V4_CHAT_TEMPLATE, Tokenizer
from dsv4.testing.tokenizers import (
    ASSISTANT,
    BOS,
    DEFAULT_VOCAB_SIZE,
    EOS,
    USER,
    write_byte_tokenizer,
    write_char_tokenizer,
)

TEXTS = [
    "Hello world, the robot counts boats.",
    "héllo wörld — ça va?",
    "世界你好，こんにちは",
    "emoji 🎉🤖 and a family 👩‍👩‍👧 and a flag 🇫🇷",
    "  leading spaces\ttabs\n\nand newlines\r\n",
    "",
    "code: def f(x):\n    return x ** 2  # </think> stays text",
]

# A Llama-2 style template, as many checkpoints ship it.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
)

# Exercises what transformers' environment adds: trim/lstrip blocks, namespace, loop controls, dict(), tojson with
# options, the generation tag, tools, and extra keyword variables.
RICH_TEMPLATE = """
{% set ns = namespace(sys='', n=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
{% endfor %}
{{ bos_token }}[{{ ns.n }} turns]{{ ns.sys }}
{% if tools %}
  {% for t in tools %}
TOOL {{ t | tojson }} / {{ t | tojson(indent=2, sort_keys=true) }}
  {% endfor %}
{% endif %}
{% for m in messages if m.role != 'system' %}
  {% if m.role == 'assistant' %}
<A>{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}
  {% else %}
<{{ m.role }}>{{ m.content }} {{ dict(role=m.role, n=loop.index) | tojson }}
  {% endif %}
  {% if loop.index > 10 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<A>{{ greeting | default('') }}{% endif %}
"""

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 1+1? ünï 🎉"},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city, in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("byte")
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(byte_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(byte_dir)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _with_template(tmp_path: Path, template: str) -> Path:
    write_byte_tokenizer(tmp_path, chat_template=template)
    return tmp_path


# ---------------------------------------------------------------------------------------------- test tokenizers
def test_byte_tokenizer_layout(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == DEFAULT_VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_ids, tok.eos_token_id, tok.pad_token_id) == (0, (1,), 1, 1)
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    assert [tok.token_to_id(t) for t in (USER, ASSISTANT, "<think>", "</think>")] == [508, 509, 510, 511]
    assert tok.id_to_token(0) == BOS and tok.id_to_token(DEFAULT_VOCAB_SIZE) is None
    assert tok.token_to_id("not a token") is None
    assert tok.all_special_ids == (0, 1, 508, 509)  # <think> and </think> are not special, as in DeepSeek's
    assert not tok.has_own_chat_template and tok.chat_template == DEEPSEEK_V4_CHAT_TEMPLATE


@pytest.mark.parametrize("size", [300, 1000, 129_280])
def test_byte_tokenizer_vocab_size_is_exact(tmp_path: Path, size: int) -> None:
    tok = write_byte_tokenizer(tmp_path, vocab_size=size)
    assert tok.vocab_size == size
    assert tok.token_to_id("</think>") == size - 1
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_rejects_too_small_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 300"):
        write_byte_tokenizer(tmp_path, vocab_size=299)


def test_test_tokenizers_are_deterministic(tmp_path: Path) -> None:
    for run in ("a", "b"):
        write_byte_tokenizer(tmp_path / run, vocab_size=777, chat_template=LLAMA_TEMPLATE)
        write_char_tokenizer(tmp_path / run / "char", "0123456789+= ", extra_special=["<pad>"])
    for name in ("tokenizer.json", "tokenizer_config.json", "char/tokenizer.json", "char/tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_byte_tokenizer_learned_merges(tok: Tokenizer) -> None:
    # Frequent words of the built-in text are single tokens; the encoding is fixed by the merge order.
    ids = tok.encode(" the robot", add_special_tokens=False)
    assert ids == [tok.token_to_id("Ġthe"), tok.token_to_id("Ġrobot")] == [260, 301]


def test_char_tokenizer(tmp_path: Path) -> None:
    tok = write_char_tokenizer(tmp_path, "0123456789+= ", extra_special=["<pad>", "<sep>"])
    assert tok.vocab_size == 2 + 13 + 2
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, (1,))
    assert [tok.token_to_id(c) for c in "09+= "] == [2, 11, 12, 13, 14]
    assert (tok.token_to_id("<pad>"), tok.token_to_id("<sep>")) == (15, 16)
    assert tok.encode("12+34=46") == [0, 3, 4, 12, 5, 6, 13, 6, 8]
    assert tok.encode("12 + 3", add_special_tokens=False) == [3, 4, 14, 12, 14, 5]
    assert tok.decode([0, 3, 4, 12, 5, 15, 1]) == "12+3"
    assert tok.decode([0, 3, 4, 12, 5, 15, 1], skip_special_tokens=False) == f"{BOS}12+3<pad>{EOS}"
    assert tok.all_special_ids == (0, 1, 15, 16)


def test_char_tokenizer_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        write_char_tokenizer(tmp_path, "")
    with pytest.raises(ValueError, match="repeats"):
        write_char_tokenizer(tmp_path, "0120")
    with pytest.raises(ValueError, match="repeats"):
        write_char_tokenizer(tmp_path, "01", extra_special=["1"])


# ---------------------------------------------------------------------------------------------- ids ↔ text
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(ids, skip_special_tokens=False) == BOS + text


def test_bos_is_added_once(tok: Tokenizer) -> None:
    plain = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [0, *plain]
    assert tok.encode(BOS + "hi") == [0, *plain]  # a rendered chat prompt already starts with BOS
    assert tok.encode(BOS + "hi", add_special_tokens=False) == [0, *plain]
    assert tok.encode("") == [0]


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    text = f"{BOS}{USER}hi{ASSISTANT}</think>ok{EOS}"
    ids = tok.encode(text)
    assert ids[:2] == [0, 508] and ids[-1] == 1 and 511 in ids
    assert tok.decode(ids) == "hi</think>ok"
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_from_pretrained_accepts_the_file(byte_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(byte_dir / "tokenizer.json")
    assert tok.encode("hi") == Tokenizer.from_pretrained(str(byte_dir)).encode("hi")


# ---------------------------------------------------------------------------------------------- config files
def test_eos_ids_are_the_union_of_the_configs(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path)
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": [1, 7], "bos_token_id": 0})
    _write_json(tmp_path / "config.json", {"eos_token_id": 9, "bos_token_id": 0, "vocab_size": 512})
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_ids == (1, 7, 9)
    assert tok.eos_token_id == 1 and tok.eos_token == EOS


def test_config_without_token_strings_uses_config_ids(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {})
    _write_json(tmp_path / "config.json", {"eos_token_id": [1, 508], "bos_token_id": 0})
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, (1, 508))
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    assert tok.model_max_length is None


def test_token_strings_and_template_list(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": BOS, "eos_token": {"content": EOS}, "add_bos_token": True, "model_max_length": 2048,
        "chat_template": [{"name": "default", "template": "D{{ messages[0].content }}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}],
    })
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.model_max_length) == (0, (1,), 2048)
    assert tok.has_own_chat_template and tok.chat_template == "D{{ messages[0].content }}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS) == "T1"  # as transformers picks


def test_template_files_take_priority(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path, chat_template="config")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "config"
    _write_json(tmp_path / "chat_template.json", {"chat_template": "json"})
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "json"
    (tmp_path / "chat_template.jinja").write_text("jinja {{ messages | length }}", encoding="utf-8")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "jinja 1"


def test_missing_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    write_byte_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {"eos_token": 5})
    with pytest.raises(ValueError, match="eos_token must be a string or an AddedToken dict"):
        Tokenizer.from_pretrained(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {})
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": "1"})
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be an int"):
        Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- transformers oracle
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    write_byte_tokenizer(path, vocab_size=700, chat_template=LLAMA_TEMPLATE)
    return path


def test_ids_and_text_match_transformers(hf_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(hf_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, 1)
    for text in [*TEXTS, f"{USER}x{ASSISTANT}</think>y{EOS}"]:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == fast(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("template", [LLAMA_TEMPLATE, RICH_TEMPLATE, DEEPSEEK_V4_CHAT_TEMPLATE],
                         ids=["llama", "rich", "deepseek-v4"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path: Path, template: str, add_generation_prompt: bool) -> None:
    transformers = pytest.importorskip("transformers")
    root = _with_template(tmp_path, template)
    hf = transformers.AutoTokenizer.from_pretrained(root)
    tok = Tokenizer.from_pretrained(root)
    conversations: list[tuple[list[dict[str, Any]], dict[str, Any]]] = [
        (CHAT, {}),
        (CHAT[1:], {"tools": TOOLS}),
        (CHAT + [{"role": "assistant", "content": "2", "reasoning_content": "easy"}], {"greeting": "hey"}),
    ]
    if template == DEEPSEEK_V4_CHAT_TEMPLATE:
        conversations += [(CHAT, {"thinking": True}), (CHAT, {"thinking": True, "drop_thinking": False})]
    for messages, kwargs in conversations:
        expected = hf.apply_chat_template(
            copy.deepcopy(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected
        assert tok.encode(expected, add_special_tokens=False) == hf(expected, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- DeepSeek-V4 format
def test_deepseek_v4_chat_mode(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(CHAT) == (
        f"{BOS}You are terse.<｜User｜>Hi there<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>What is 1+1? ünï 🎉<｜Assistant｜></think>"
    )
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == (
        f"{BOS}You are terse.<｜User｜>Hi there<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>What is 1+1? ünï 🎉"
    )
    reply = [*CHAT, {"role": "assistant", "content": "2", "reasoning_content": "one plus one"}]
    assert tok.apply_chat_template(reply).endswith("ünï 🎉<｜Assistant｜></think>2<｜end▁of▁sentence｜>")


def test_deepseek_v4_thinking_mode(tok: Tokenizer) -> None:
    # DeepSeek-V3.2's published example (encoding_dsv32.py README): earlier reasoning is dropped.
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
        {"role": "user", "content": "1+1=?"},
    ]
    assert tok.apply_chat_template(messages, thinking=True) == (
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜>"
        "<｜User｜>1+1=?<｜Assistant｜><think>"
    )
    assert tok.apply_chat_template(messages, thinking=True, drop_thinking=False) == (
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜><think>thinking...</think>Hello! I am DeepSeek."
        "<｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>"
    )
    answered = [*messages, {"role": "assistant", "content": "2", "reasoning": "add them"}]  # alias of the field
    assert tok.apply_chat_template(answered, thinking=True).endswith(
        "<｜User｜>1+1=?<｜Assistant｜><think>add them</think>2<｜end▁of▁sentence｜>"
    )


def test_deepseek_v4_tools(tok: Tokenizer) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Rome", "days": [1, 2]}'}},
        ]},
        # answered out of order: the results are put back in the order of the calls
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "sun"}]},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS)
    schema = json.dumps(TOOLS[0]["function"], ensure_ascii=False)
    head, tail = text.split("<｜User｜>Weather", 1)
    assert head.startswith(BOS + "\n\n## Tools\n\n") and f"\n\n{schema}\n\n" in head  # after an empty system prompt
    assert tail == (
        " in Paris and Rome?<｜Assistant｜></think>\n\n"
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
        "<｜User｜><tool_result>sun</tool_result>\n\n<tool_result>rain</tool_result><｜Assistant｜></think>"
    )
    # With tools, thinking mode keeps every turn's reasoning open.
    assert tok.apply_chat_template(messages, tools=TOOLS, thinking=True).count("<｜Assistant｜><think>") == 2
    with_system = tok.apply_chat_template([{"role": "system", "content": "Sys."}, *messages], tools=TOOLS)
    assert with_system.startswith(BOS + "Sys.\n\n## Tools\n\n")


def test_deepseek_v4_merges_user_turns_and_flattens_parts(tok: Tokenizer) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "part"}]},
        {"role": "user", "content": "second"},
    ]
    assert tok.apply_chat_template(messages) == f"{BOS}<｜User｜>first\npart\n\nsecond<｜Assistant｜></think>"


def test_deepseek_v4_unknown_role(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match='no role "narrator"'):
        tok.apply_chat_template([{"role": "narrator", "content": "Once"}])


# ---------------------------------------------------------------------------------------------- DeepSeek-V4 goldens
# Prompts of DeepSeek's reference encoder (encoding_dsv4.encode_messages, DeepSeek-V4-Flash release) for these
# conversations, its request-level tools put on the first system message (an empty one added), as SGLang does.
DSV4_TOOLS_HEAD = (
    "\n\n## Tools\n\n"
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
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, "
    "arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
DSV4_TOOLS_TAIL = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool "
                   "calls.\n")
DSV4_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
GOLDEN_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    # key order as sent: the schema is rendered as given
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                       "b": {"type": "number"}}},
        "description": "a+b"}},
]
WEATHER_SCHEMA = ('{"name": "get_weather", "description": "Current weather in a city, in °C", "parameters": '
                  '{"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
                  '"required": ["city"]}}')
ADD_SCHEMA = ('{"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, '
              '"b": {"type": "number"}}}, "description": "a+b"}')
GOLDEN_CALLS = [
    {"id": "call_a", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
    {"id": "call_b", "type": "function",
     "function": {"name": "add", "arguments": '{"a": 1.5, "b": [1, {"x": null}], "flag": true, "s": "find /tmp"}'}},
]
WEATHER_CALL = (
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>"
)
ADD_CALL = (
    '<｜DSML｜invoke name="add">\n'
    '<｜DSML｜parameter name="a" string="false">1.5</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="b" string="false">[1, {"x": null}]</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="flag" string="false">true</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="s" string="true">find /tmp</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>"
)
GOLDEN: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any], str]] = [
    ("chat-multi-turn",
     [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"}, {"role": "user", "content": "1+1?"}],
     None, {},
     f"{BOS}You are terse.<｜User｜>Hi<｜Assistant｜></think>Hello!{EOS}<｜User｜>1+1?<｜Assistant｜></think>"),
    ("thinking-drops-earlier-reasoning",
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
      {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "add"}],
     None, {"thinking": True},
     f"{BOS}<｜User｜>Hi<｜Assistant｜></think>Hello!{EOS}<｜User｜>1+1?<｜Assistant｜><think>add</think>2{EOS}"),
    ("thinking-keeps-reasoning",
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
      {"role": "user", "content": "1+1?"}],
     None, {"thinking": True, "drop_thinking": False},
     f"{BOS}<｜User｜>Hi<｜Assistant｜><think>greet</think>Hello!{EOS}<｜User｜>1+1?<｜Assistant｜><think>"),
    ("tools-results-reordered-and-merged",
     [{"role": "user", "content": "Weather in Paris, and 1.5 plus a list?"},
      {"role": "assistant", "content": "Checking.", "tool_calls": GOLDEN_CALLS},
      {"role": "tool", "tool_call_id": "call_b", "content": "2.5"},
      {"role": "tool", "tool_call_id": "call_a", "content": "sunny, 21"},
      {"role": "user", "content": "Thanks"}],
     GOLDEN_TOOLS, {},
     f"{BOS}{DSV4_TOOLS_HEAD}{WEATHER_SCHEMA}\n{ADD_SCHEMA}{DSV4_TOOLS_TAIL}"
     "<｜User｜>Weather in Paris, and 1.5 plus a list?<｜Assistant｜></think>Checking.\n\n"
     f"<｜DSML｜tool_calls>\n{WEATHER_CALL}\n{ADD_CALL}\n</｜DSML｜tool_calls>{EOS}"
     "<｜User｜><tool_result>sunny, 21</tool_result>\n\n<tool_result>2.5</tool_result>\n\nThanks<｜Assistant｜></think>"),
    ("tools-thinking-keeps-reasoning",
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": "", "reasoning_content": "need the tool", "tool_calls": GOLDEN_CALLS[:1]},
      {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "sunny"},
                                                               {"type": "text", "text": "21"}]}],
     GOLDEN_TOOLS[:1], {"thinking": True},
     f"{BOS}Be brief.{DSV4_TOOLS_HEAD}{WEATHER_SCHEMA}{DSV4_TOOLS_TAIL}"
     f"<｜User｜>Weather?<｜Assistant｜><think>need the tool</think>\n\n<｜DSML｜tool_calls>\n{WEATHER_CALL}\n"
     f"</｜DSML｜tool_calls>{EOS}<｜User｜><tool_result>sunny\n\n21</tool_result><｜Assistant｜><think>"),
    ("effort-max-thinking",
     [{"role": "system", "content": "S"}, {"role": "user", "content": "Prove it."}],
     None, {"thinking": True, "reasoning_effort": "max"},
     f"{BOS}{DSV4_EFFORT_MAX}S<｜User｜>Prove it.<｜Assistant｜><think>"),
    ("effort-max-chat", [{"role": "user", "content": "Prove it."}], None, {"reasoning_effort": "max"},
     f"{BOS}<｜User｜>Prove it.<｜Assistant｜></think>"),
    ("effort-high-thinking", [{"role": "user", "content": "Prove it."}], None,
     {"thinking": True, "reasoning_effort": "high"}, f"{BOS}<｜User｜>Prove it.<｜Assistant｜><think>"),
    ("developer-reminder-no-eos",  # the reference's search-agent roles, reachable through the Python API
     [{"role": "system", "content": "Search agent."},
      {"role": "developer", "content": "Use the results.",
       "tools": [{"type": "function", "function": {"name": "search", "parameters": {}}}]},
      {"role": "user", "content": "Who won?"}, {"role": "latest_reminder", "content": "Today is Monday."},
      {"role": "assistant", "content": "Team A.", "reasoning_content": "look", "wo_eos": True}],
     None, {"thinking": True},
     f"{BOS}Search agent.<｜User｜>Use the results.{DSV4_TOOLS_HEAD}"
     '{"name": "search", "parameters": {}}'
     f"{DSV4_TOOLS_TAIL}<｜User｜>Who won?<｜Assistant｜><think><｜latest_reminder｜>Today is Monday.look</think>Team A."),
    ("task-action", [{"role": "user", "content": "Classify: fix the bug", "task": "action"},
                     {"role": "assistant", "content": "code"}], None, {},
     f"{BOS}<｜User｜>Classify: fix the bug<｜Assistant｜></think><｜action｜>code{EOS}"),
    ("call-without-arguments",
     [{"role": "user", "content": "q"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "t1", "content": "done"}], None, {},
     f'{BOS}<｜User｜>q<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n'
     f"</｜DSML｜tool_calls>{EOS}<｜User｜><tool_result>done</tool_result><｜Assistant｜></think>"),
]


@pytest.mark.parametrize(("messages", "tools", "kwargs", "expected"), [g[1:] for g in GOLDEN],
                         ids=[g[0] for g in GOLDEN])
def test_deepseek_v4_matches_reference_encoder(
    tok: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any],
    expected: str,
) -> None:
    assert tok.apply_chat_template(messages, tools=tools, **kwargs) == expected


def test_deepseek_v4_reasoning_effort_is_checked(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match='reasoning_effort must be "high", "max" or none'):
        tok.apply_chat_template([{"role": "user", "content": "x"}], thinking=True, reasoning_effort="medium")


def test_deepseek_v4_unknown_task(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match='unknown task "dance"'):
        tok.apply_chat_template([{"role": "user", "content": "x", "task": "dance"}])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list of dicts"),
        ([], "empty"),
        (["hello"], "message 0 must be a dict"),
        ([{"content": "x"}], "message 0 needs a 'role'"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "message 1 .user.: content must be"),
        ([{"role": "user"}], "message 0 .user. has no 'content'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "needs a 'text' string"),
    ],
)
def test_bad_messages(tok: Tokenizer, messages: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}", "not valid jinja"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
        ("{{ messages[0].content.nope.deeper }}", "has no attribute 'nope'"),
        ("{{ messages.__class__.__init__.__globals__ }}", "unsafe|__init__|has no attribute"),
    ],
)
def test_broken_templates(tmp_path: Path, template: str, match: str) -> None:
    tok = Tokenizer.from_pretrained(_with_template(tmp_path, template))
    with pytest.raises(ValueError, match=match) as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert str(tmp_path) in str(info.value)


def test_text_that_is_not_unicode_is_a_value_error(tok: Tokenizer) -> None:
    # JSON's "\\ud800" escape decodes to a lone surrogate, which the Rust tokenizer refuses with a TypeError
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 2"):
        tok.encode("ab\ud800")


def test_template_meeting_unexpected_input_is_a_value_error(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_with_template(tmp_path, "{{ messages[0].content + 1 }}"))
    with pytest.raises(ValueError, match="cannot render these messages: TypeError"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_messages_are_not_changed(tok: Tokenizer) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": None, "reasoning": "r"},
    ]
    before = copy.deepcopy(messages)
    tok.apply_chat_template(messages, thinking=True)
    assert messages == before


def test_kwargs_reach_the_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_with_template(tmp_path, "{{ bos_token }}|{{ eos_token }}|{{ who }}"))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], who="me") == f"{BOS}|{EOS}|me"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], who="me", bos_token="B") == f"B|{EOS}|me"

"""OpenAI-compatible request schemas and their mapping onto the engine's SamplingParams.

Unknown fields are rejected (as OpenAI does: "Unrecognized request argument supplied"), with the
vLLM/SGLang extensions users rely on accepted (top_k, min_p, repetition_penalty, stop_token_ids,
ignore_eos, min_tokens, skip_special_tokens, include_stop_str_in_output, structured_outputs and its older guided_*
spellings). Booleans are strict ("yes" and 1
are not true), every string must be valid Unicode (a lone surrogate is a 400 naming the field), and chat
content is text: other content parts (images, audio, files) are refused, not ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dsv4.engine.grammar import StructuredOutputs, build_grammar
from dsv4.engine.sampling import SamplingParams

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "GenerateRequest",
    "OpenAIError",
    "StreamOptions",
    "TokenizeRequest",
    "Tool",
    "structured_spec",
    "unencodable_text",
]

# Hard ceilings that keep one request from monopolising the server (400, not a long hang).
MAX_N = 16
MAX_TOKENS_CEILING = 1 << 20


class OpenAIError(Exception):
    """An error answered with an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(
        self, message: str, *, status: int = 400, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def unencodable_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first string of a JSON value (keys included) that UTF-8 cannot encode, as ``(path, problem)``.

    JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer (and no UTF-8 response) takes.
    Iterative, so that a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if (at := _surrogate_at(v)) is not None:
                return where or "body", f"a lone surrogate {ascii(v[at])} at index {at}"
        elif isinstance(v, dict):
            items = list(v.items())
            for k, _ in items:
                if isinstance(k, str) and (at := _surrogate_at(k)) is not None:
                    return where or "body", f"a key holds a lone surrogate {ascii(k[at])} at index {at}"
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in reversed(items))
        elif isinstance(v, list):
            stack.extend((f"{where}.{i}" if where else str(i), x) for i, x in reversed(list(enumerate(v))))
    return None


def _surrogate_at(text: str) -> int | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


class _Request(_Strict):
    """A request body: every string in it must be valid Unicode (checked before the fields are)."""

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        bad = unencodable_text(data)
        if bad is not None:
            raise PydanticCustomError("unencodable_text", "{param}: text is not valid Unicode ({problem})",
                                      {"param": bad[0], "problem": bad[1]})
        return data


def structured_spec(fields: dict[str, Any], param: str, where: str | None = None) -> StructuredOutputs:
    """A structured-output spec from a request's ``fields``, checked now (its grammar parsed): a 400 naming
    ``param`` (and ``where`` inside it) for one that is malformed or cannot be enforced."""
    try:
        spec = StructuredOutputs(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        problem = str(err["msg"]).removeprefix("Value error, ")
        raise OpenAIError(f"{param}{'.' + loc if loc else ''}: {problem}", param=param) from None
    try:
        build_grammar(spec, where or param)
    except ValueError as e:
        raise OpenAIError(str(e), param=param) from None
    return spec


# vLLM's older spellings of structured_outputs' fields
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class StreamOptions(_Strict):
    """``stream_options``: a final chunk with token usage."""

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _Sampling(_Request):
    """Sampling fields shared by both OpenAI endpoints (OpenAI's names, vLLM's extensions)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM / SGLang extensions
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: StrictBool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # structured output: vLLM's structured_outputs ({json | json_object | regex | grammar | choice |
    # structural_tag}) or one of its older guided_* fields
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def structured(self) -> tuple[StructuredOutputs, str] | None:
        """``structured_outputs`` or a ``guided_*`` field as a checked spec, with the field's name; None when
        neither is given."""
        given = [(name, value) for name, value in (("structured_outputs", self.structured_outputs),
                                                   *((g, getattr(self, g)) for g in _GUIDED)) if value is not None]
        if not given:
            return None
        if len(given) > 1:
            raise OpenAIError(f"give at most one of structured_outputs, {', '.join(_GUIDED)}; got "
                              f"{', '.join(name for name, _ in given)}", param=given[1][0])
        name, value = given[0]
        fields = value if name == "structured_outputs" else {_GUIDED[name]: value}
        if not isinstance(fields, dict):
            raise OpenAIError(f"{name} must be an object", param=name)
        return structured_spec(fields, name, None if name == "structured_outputs" else name), name

    def sampling_params(self, *, max_tokens: int, logprobs: int | None,
                        structured: StructuredOutputs | None = None) -> SamplingParams:
        """The engine's parameters for this request (defaults: OpenAI's); ``structured``: the output's constraint."""
        if self.logit_bias:
            raise OpenAIError("logit_bias is not supported", param="logit_bias")
        fields: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logprobs": logprobs,
            "structured_outputs": structured,
        }
        for name in ("top_k", "min_p", "repetition_penalty"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        try:
            return SamplingParams(**fields)
        except ValueError as e:
            raise OpenAIError(str(e)) from None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS_CEILING)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def _item_check(model: Any) -> Any:
    """A validator that checks a value against ``model`` but keeps the value as it came (its key order)."""
    adapter: TypeAdapter[Any] = TypeAdapter(model)

    def check(value: Any) -> Any:
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            raise PydanticCustomError("invalid_item", "{where}: {problem}", {
                "where": ".".join(str(x) for x in err["loc"]) or "value", "problem": err["msg"],
                "subpath": ".".join(str(x) for x in err["loc"])}) from None
        return value

    return check


# What the DSML markup can carry in name="...": no quotes, angle brackets, whitespace or control characters.
TOOL_NAME_PATTERN = r'^[^"<>\s\x00-\x1f]{1,256}$'


class FunctionDefinition(BaseModel):
    """``tools[].function``: its name, description and JSON-schema parameters (more keys pass through)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(BaseModel):
    """``tool_calls[].function`` of an assistant message: arguments as a JSON string (or an object)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    arguments: str | dict[str, Any] = "{}"


class ToolCallParam(BaseModel):
    """A tool call an assistant message made earlier in the conversation."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A chat message; extra keys pass through to the chat template, the ones it reads are typed."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    thinking: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        for i, part in enumerate(v if isinstance(v, list) else ()):
            kind = part.get("type")
            if kind != "text":
                raise PydanticCustomError(
                    "text_only", "content part {index} has type {kind}: this model takes text only (parts of "
                    "type 'text')", {"index": i, "kind": ascii(kind) if isinstance(kind, str) else "none"})
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("text_part", "content part {index} needs a 'text' string", {"index": i})
        return v


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: a named schema the reply's JSON follows (``strict`` or not: always)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    """``response_format``: plain text, any JSON object, or JSON following a schema (constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self

    def spec(self) -> StructuredOutputs | None:
        """The reply's constraint (None for text), checked: a 400 naming response_format when it cannot be."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        if schema is None:
            return structured_spec({"json_object": True}, "response_format")
        return structured_spec({"json": schema}, "response_format", "response_format.json_schema.schema")


class _ToolName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: _ToolName


# chat_template_kwargs that must be booleans, and keys that are apply_chat_template's own arguments.
_BOOL_TEMPLATE_KWARGS = ("thinking", "enable_thinking", "drop_thinking")
_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "tokenize")
# OpenAI's reasoning efforts (and DeepSeek's "max") → the DeepSeek-V4 encoder's: only "max" adds a preamble.
REASONING_EFFORTS = {"none": None, "minimal": "high", "low": "high", "medium": "high", "high": "high",
                     "xhigh": "max", "max": "max"}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CEILING)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CEILING)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # Kept as sent (key order included): the chat format renders each tool's JSON as it came.
    tools: list[Annotated[dict[str, Any], AfterValidator(_item_check(Tool))]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in _RESERVED_TEMPLATE_KWARGS:
            if v and key in v:
                raise PydanticCustomError("reserved_kwarg", "{key} is a request field, not a chat template "
                                          "argument", {"key": key})
        for key in _BOOL_TEMPLATE_KWARGS:
            if v and key in v and not isinstance(v[key], bool):
                raise PydanticCustomError("bool_kwarg", "{key} must be true or false", {"key": key})
        effort = (v or {}).get("reasoning_effort")
        if effort is not None and effort not in ("high", "max"):
            raise PydanticCustomError("effort_kwarg", "reasoning_effort must be 'high', 'max' or null", {})
        return v

    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template is rendered with: ``chat_template_kwargs`` plus ``reasoning_effort``."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = REASONING_EFFORTS[self.reasoning_effort]
        return kwargs


# SGLang's sampling_params spellings of a constraint
_SGLANG_STRUCTURED = {"json_schema": "json", "regex": "regex", "ebnf": "grammar"}


class GenerateRequest(_Request):
    """SGLang-style native ``POST /generate``: token ids (or text) in, token ids out."""

    input_ids: list[int] | None = None
    text: str | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: StrictBool = False
    return_logprob: StrictBool = False
    top_logprobs_num: int = Field(default=0, ge=0, le=20)
    rid: str | None = None

    def engine_params(self) -> SamplingParams:
        """``sampling_params`` (SGLang's ``max_new_tokens`` accepted) as the engine's, booleans strict."""
        fields = dict(self.sampling_params)
        fields.setdefault("max_tokens", fields.pop("max_new_tokens", None) or 128)
        sglang = [k for k in _SGLANG_STRUCTURED if fields.get(k) is not None]
        if "structured_outputs" in fields or sglang:
            if len(sglang) + ("structured_outputs" in fields) > 1:
                raise OpenAIError("give at most one of sampling_params.structured_outputs, json_schema, regex, ebnf",
                                  param="sampling_params")
            value = fields.pop("structured_outputs", None) or {_SGLANG_STRUCTURED[k]: fields[k] for k in sglang}
            for k in _SGLANG_STRUCTURED:
                fields.pop(k, None)
            if not isinstance(value, dict):
                raise OpenAIError("sampling_params.structured_outputs must be an object", param="sampling_params")
            fields["structured_outputs"] = structured_spec(value, "sampling_params",
                                                           "sampling_params.structured_outputs")
        if self.return_logprob:
            fields["logprobs"] = self.top_logprobs_num
        for name, info in SamplingParams.model_fields.items():
            if info.annotation is bool and name in fields and not isinstance(fields[name], bool):
                raise OpenAIError(f"sampling_params.{name} must be true or false, got {fields[name]!r}",
                                  param="sampling_params")
        try:
            return SamplingParams(**fields)
        except ValueError as e:
            raise OpenAIError(str(e), param="sampling_params") from None


class TokenizeRequest(_Request):
    """``POST /tokenize``: a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]

"""Structured output: generations constrained to a JSON schema, a regex, an EBNF grammar or a list of choices.

- :class:`StructuredOutputs` — what a request asks for (vLLM's ``StructuredOutputsParams``: exactly one field).
- :class:`Grammars` — one engine's grammar service: a request's spec is checked when it is added (a bad one is a
  ``ValueError`` there), compiled on a worker thread off the step loop, once per distinct spec (an LRU cache);
  each step fills the token bitmasks of the batch's constrained rows.
- :class:`SequenceGrammar` — one sequence's matcher (``n > 1``: one each), advanced by every token it keeps.

The grammar engine is xgrammar (SGLang's and vLLM's default). It is imported on the first constrained request,
so an engine that never sees one does not pay for it.
"""

from __future__ import annotations

import json as jsonlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import torch
from loguru import logger
from pydantic import ConfigDict, StrictBool, model_validator
from pydantic.dataclasses import dataclass

from dsv4.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar as xgr

__all__ = [
    "CACHE_SIZE", "MAX_WHITESPACE", "Grammars", "SequenceGrammar", "StructuredOutputs", "as_format", "build_grammar",
    "check_json_schema", "tokenizer_info",
]

CACHE_SIZE = 256  # compiled grammars kept (least recently used goes first)
# Whitespace between JSON tokens: at most this many characters in a row. Pretty-printed JSON fits; a model stuck
# writing newlines (a known failure of any-whitespace JSON grammars) still reaches the end.
MAX_WHITESPACE = 20
Kind = Literal["json", "json_object", "regex", "grammar", "choice", "structural_tag"]
_KINDS: tuple[Kind, ...] = ("json", "json_object", "regex", "grammar", "choice", "structural_tag")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class StructuredOutputs:
    """A constraint on the generated text; exactly one field is given (vLLM's names).

    ``json``: a JSON schema (an object, or its JSON text); ``json_object``: any JSON object; ``regex``: a
    regular expression the whole output matches; ``grammar``: an EBNF grammar (GBNF-style, rule ``root``);
    ``choice``: one of these strings exactly; ``structural_tag``: an xgrammar structural tag (its JSON).
    The generation ends (finish reason "stop") when the constraint is complete and the model writes EOS.
    """

    json: dict[str, Any] | str | None = None
    json_object: StrictBool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    structural_tag: dict[str, Any] | str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(_KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice must list at least one string")
        return self

    @property
    def kind(self) -> Kind:
        """Which field is given."""
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[Kind, str]:
        """``(kind, text)``: what the compile cache is keyed by. JSON keeps its key order (it is the output's)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json_object":
            return kind, ""
        return kind, value if isinstance(value, str) else jsonlib.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- checking
# JSON-schema keywords xgrammar would silently ignore: a schema using them is refused rather than half enforced.
_UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                         "uniqueItems", "unevaluatedItems")
# String formats xgrammar enforces (others would pass any string).
_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uri",
                      "uri-reference", "uuid", "uri-template", "json-pointer", "relative-json-pointer"})
# Keywords whose value is a map of names to subschemas, or a list of subschemas, or one subschema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "contains")


def check_json_schema(schema: Any, where: str = "schema") -> None:
    """Raise ``ValueError`` naming the first place where ``schema`` uses what xgrammar cannot enforce."""
    stack: list[tuple[str, Any]] = [(where, schema)]
    while stack:
        at, node = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise ValueError(f"{at}: a schema must be an object or a boolean, got {type(node).__name__}")
        for word in _UNSUPPORTED_KEYWORDS:
            if word in node:
                raise ValueError(f"{at}: the JSON-schema keyword {word!r} is not supported in structured output")
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            raise ValueError(f"{at}: 'allOf' with more than one schema is not supported in structured output")
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in _FORMATS:
            raise ValueError(f"{at}: string format {fmt!r} is not supported in structured output (supported: "
                             f"{', '.join(sorted(_FORMATS))})")
        for word in _SCHEMA_MAPS:
            if isinstance(node.get(word), dict):
                stack += [(f"{at}.{word}.{k}", v) for k, v in node[word].items()]
        for word in _SCHEMA_LISTS:
            if isinstance(node.get(word), list):
                stack += [(f"{at}.{word}.{i}", v) for i, v in enumerate(node[word])]
        stack += [(f"{at}.{word}", node[word]) for word in _SCHEMA_ONE if word in node]


_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[23:26:21] /project/cpp/regex_converter.cc:94: "


def _xgr_message(e: Exception) -> str:
    return _XGR_PREFIX.sub("", str(e).strip())


# xgrammar 0.2.9 spells the characters of a length-limited JSON string (minLength / maxLength) as [^"\\\r\n]:
# raw control characters, which JSON forbids, get through. They are taken out here.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _json_strings_fixed(grammar: xgr.Grammar) -> xgr.Grammar:
    import xgrammar as xgr

    ebnf = str(grammar)
    if _LOOSE_STRING_CHAR not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


def _json_grammar(schema: str, *, strict: bool = True) -> xgr.Grammar:
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, strict_mode=strict, max_whitespace_cnt=MAX_WHITESPACE)
    return _json_strings_fixed(grammar)


def _choice_ebnf(choices: Sequence[str]) -> str:
    # a JSON string literal is an EBNF one (the same escapes)
    return "root ::= " + " | ".join(jsonlib.dumps(c, ensure_ascii=False) for c in choices)


def as_format(spec: StructuredOutputs) -> dict[str, Any]:
    """``spec`` as a format of an xgrammar structural tag (its JSON), to be composed into a larger one."""
    kind, text = spec.key
    if kind == "json":
        return {"type": "json_schema", "json_schema": jsonlib.loads(text), "max_whitespace_cnt": MAX_WHITESPACE}
    if kind == "json_object":
        return {"type": "json_schema", "json_schema": {"type": "object", "additionalProperties": True},
                "max_whitespace_cnt": MAX_WHITESPACE}
    if kind == "regex":
        return {"type": "regex", "pattern": text}
    if kind in ("grammar", "choice"):
        return {"type": "grammar", "grammar": text if kind == "grammar" else _choice_ebnf(spec.choice or [])}
    tag: dict[str, Any] = jsonlib.loads(text)
    return tag["format"] if tag.get("type") == "structural_tag" else tag


def build_grammar(spec: StructuredOutputs, where: str | None = None) -> xgr.Grammar:
    """The xgrammar grammar of ``spec``; ``ValueError`` naming the place (``where``, by default
    ``structured_outputs.<kind>``) and the problem when it has none."""
    import xgrammar as xgr

    kind, text = spec.key
    where = where or f"structured_outputs.{kind}"
    try:
        if kind == "json":
            schema = jsonlib.loads(text)
            check_json_schema(schema, where)
            return _json_grammar(text)
        if kind == "json_object":
            return _json_grammar('{"type": "object"}', strict=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(text)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(spec.choice or []))
        return _json_strings_fixed(xgr.Grammar.from_structural_tag(text))
    except ValueError as e:  # ours (already names the place), a JSON decode error, or pydantic's
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {_xgr_message(e)}") from None
    except RuntimeError as e:  # xgrammar's parse errors
        raise ValueError(f"{where}: {_xgr_message(e)}") from None


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of ``tokenizer`` for a model with ``vocab_size`` logits.

    Ids past the tokenizer's (padding of the model's vocabulary) and special added tokens become empty strings,
    which xgrammar never allows: a special token would be skipped when the text is decoded, so the text would no
    longer be what the grammar matched. The stop tokens end a complete grammar.
    """
    import xgrammar as xgr

    encoded = [""] * vocab_size
    for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            encoded[i] = token
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        if added.special and i < vocab_size:
            encoded[i] = ""
    spec = jsonlib.loads(tokenizer.backend.to_str())
    return xgr.TokenizerInfo(encoded, _vocab_type(spec), vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids), add_prefix_space=_adds_prefix_space(spec))


def _decoders(spec: dict[str, Any]) -> list[dict[str, Any]]:
    decoder = spec.get("decoder") or {}
    return list(decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]


def _vocab_type(spec: dict[str, Any]) -> xgr.VocabType:
    """How token strings spell bytes: GPT-2's byte alphabet, SentencePiece's ``<0x..>`` fallback, or as text."""
    import xgrammar as xgr

    kinds = {d.get("type") for d in _decoders(spec)}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _adds_prefix_space(spec: dict[str, Any]) -> bool:
    """Whether decoding drops a leading space the encoder added (SentencePiece's ``▁`` prefix)."""
    for d in _decoders(spec):
        if d.get("type") == "Strip" and d.get("start"):
            return True
        if d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never" and d.get(
                "add_prefix_space", True):
            return True
    return False


# ---------------------------------------------------------------------------------------------- engine side
class SequenceGrammar:
    """One sequence's place in its grammar: what may come next, advanced token by token."""

    def __init__(self, compiled: Future[xgr.CompiledGrammar]) -> None:
        self._compiled = compiled
        self._matcher: xgr.GrammarMatcher | None = None

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        """The matcher (waits for the compilation on first use)."""
        if self._matcher is None:
            import xgrammar as xgr

            self._matcher = xgr.GrammarMatcher(self._compiled.result())
        return self._matcher

    @property
    def ready(self) -> bool:
        """Whether the grammar is compiled (a mask needs no wait)."""
        return self._compiled.done()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` ``[N, ceil(V / 32)]`` int32."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; whether the sequence must end here (the grammar is complete: it took a stop
        token). A token the grammar rejects (only a bug lets one through the mask) ends it too, logged."""
        matcher = self.matcher
        if not matcher.accept_token(token):
            logger.error("token {} is not allowed by the sequence's grammar; the sequence ends here", token)
            return True
        return matcher.is_terminated()


class Grammars:
    """Structured output for one engine: specs checked and compiled (off the step loop, cached), matchers
    made, and each step's token masks filled.

    ``tokenizer``: what the grammars' text is tokenized by; ``vocab_size``: the model's logits per row (may
    exceed the tokenizer's ids); ``stop_token_ids``: the tokens that end a complete grammar (EOS).
    """

    def __init__(self, tokenizer: Tokenizer | None, *, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Kind, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._compiler: xgr.GrammarCompiler | None = None  # built by the worker on its first job
        self._pool: ThreadPoolExecutor | None = None
        self.stats = {"compiled": 0, "cache_hits": 0, "waits": 0}

    def sequence_grammar(self, spec: StructuredOutputs | None) -> Callable[[], SequenceGrammar] | None:
        """For a request's spec: None when unconstrained, else a maker of one :class:`SequenceGrammar` per
        sequence. Checks the spec now (``ValueError`` naming what is wrong) and starts compiling it."""
        if spec is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer: this engine has none")
        compiled = self._compiled(spec)
        return lambda: SequenceGrammar(compiled)

    def _compiled(self, spec: StructuredOutputs) -> Future[xgr.CompiledGrammar]:
        key = spec.key
        hit = self._cache.get(key)
        if hit is not None and not (hit.done() and hit.exception() is not None):
            self._cache.move_to_end(key)
            self.stats["cache_hits"] += 1
            return hit
        grammar = build_grammar(spec)  # the parse: fast, and where a bad spec is found
        if self._pool is None:
            # one worker: compilations queue behind each other, and the step loop keeps its core
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv4-grammar")
        future = self._pool.submit(self._compile, grammar)
        self._cache[key] = future
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return future

    def _compile(self, grammar: xgr.Grammar) -> xgr.CompiledGrammar:
        """On the worker thread: the tokenizer's info once, then the grammar against it."""
        if self._compiler is None:
            import xgrammar as xgr

            assert self.tokenizer is not None
            info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
            # our own cache bounds what is kept; xgrammar's would grow without limit
            self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self.stats["compiled"] += 1
        return self._compiler.compile_grammar(grammar)

    def mask(self, grammars: Sequence[SequenceGrammar | None]) -> Callable[[torch.Tensor], None] | None:
        """What masks a step's logits ``[N, V]`` (row ``i`` follows ``grammars[i]``) in place: tokens a row's
        grammar does not allow next get ``-inf``; rows without a grammar are untouched. None when no row has
        one. The bitmasks are filled now (waiting for any grammar still compiling)."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)  # [N, ceil(V / 32)], all allowed
        for i in rows:
            g = grammars[i]
            assert g is not None
            if not g.ready:
                self.stats["waits"] += 1
            g.fill(bitmask, i)

        def apply(logits: torch.Tensor) -> None:
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)

        return apply

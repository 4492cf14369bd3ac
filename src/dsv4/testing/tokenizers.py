"""Small real tokenizers written into a checkpoint directory, for tests and toy recipes.

Both follow DeepSeek's convention (BOS id 0, EOS id 1, the same full-width token strings) and write the same
bytes on every run: the byte-level BPE merges are learned here, in a fixed order, from a built-in text.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from dsv4.engine.tokenizer import Tokenizer

__all__ = ["ASSISTANT", "BOS", "DEFAULT_VOCAB_SIZE", "EOS", "USER", "write_byte_tokenizer", "write_char_tokenizer"]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# Not special in DeepSeek's tokenizers either: decoded text keeps them, so a reasoning parser can find them.
THINK, END_THINK = "<think>", "</think>"
DEFAULT_VOCAB_SIZE = 512
_TAIL = (USER, ASSISTANT, THINK, END_THINK)  # the last ids, after the merges (where DeepSeek puts its own)
_MIN_VOCAB = 300

# What the merges are learned from; any fixed English text would do.
_CORPUS = """\
The little robot woke up before the sun and walked to the window. Outside, the river was quiet and the boats
were still tied to the old wooden pier. It counted the boats, one, two, three, four, and then it counted them
again, because counting made the morning feel orderly. In the kitchen the kettle began to hum. The robot poured
water into a cup, added a spoon of honey, and carried the cup to the table where the old man was reading.
"Good morning," said the man. "Did you sleep?" The robot said that it did not sleep, but that it had rested its
motors and sorted its memories, which was almost the same thing. The man laughed and turned the page.
They spent the morning in the garden. The tomatoes were red and heavy, the beans had climbed over the fence,
and the small green apples were not yet ready to eat. The robot learned the names of the plants and the names
of the birds that came to steal the seeds: the sparrow, the robin, the blackbird and the noisy magpie.
In the afternoon it rained. Water ran down the windows in thin silver lines, and the house smelled of wet earth
and warm bread. The man taught the robot to play chess. The robot won the first game, lost the second on
purpose, and then asked whether losing on purpose was a kind of lie. The man thought about it for a long time.
"It is a kind of kindness," he said at last, "but you should only use it when the other person will never find
out." The robot wrote that down, together with the date, the weather and the number of moves in each game.
When the evening came the clouds opened and the first stars appeared over the hills. The robot and the man sat
on the porch and listened to the frogs. A computer is a machine that follows instructions, the man explained,
and a program is a list of those instructions written in a language the machine understands. People write
programs to add numbers, to draw pictures, to send messages across the world, and to answer questions. The
robot asked what it would mean for a machine to understand a question rather than only to answer it. The man
said that nobody really knew, and that this was one of the most interesting questions there is.
Before going to bed the man wound the clock, locked the door and switched off the lights in every room except
the kitchen. The robot stayed by the window, watching the river and thinking about numbers, gardens, games and
questions, until the morning came again and it was time to count the boats.
"""


def write_byte_tokenizer(
    path: str | os.PathLike[str],
    *,
    vocab_size: int | None = None,
    chat_template: str | None | Literal["default"] = "default",
) -> Tokenizer:
    """Write a byte-level BPE ``tokenizer.json`` and ``tokenizer_config.json`` into ``path``; return it loaded.

    Ids: 0 ``BOS``, 1 ``EOS``, the 256 bytes, learned merges, then ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``
    and ``</think>``; exactly ``vocab_size`` ids in all (default :data:`DEFAULT_VOCAB_SIZE`, at least 300; DeepSeek-V4's
    129280 works too). Every
    byte string encodes, so any text round-trips. ``chat_template`` "default" or None writes none, so DeepSeek-V4's
    built-in format is used; a string is written as the checkpoint's template.
    """
    size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    n_merges = size - 2 - 256 - len(_TAIL)
    if size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={size}: a byte-level tokenizer needs at least {_MIN_VOCAB} ids")
    byte_chars = _bytes_to_unicode()
    merges = _learn_merges(n_merges, byte_chars)
    vocab = {BOS: 0, EOS: 1}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for token in _TAIL:
        vocab[token] = len(vocab)

    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    special = [BOS, EOS, USER, ASSISTANT]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    template = None if chat_template in (None, "default") else chat_template
    _save(Path(path), backend, template)
    loaded = Tokenizer.from_pretrained(path)
    assert loaded.vocab_size == size, (loaded.vocab_size, size)
    return loaded


def write_char_tokenizer(
    path: str | os.PathLike[str], alphabet: str, *, extra_special: Sequence[str] = (), chat_template: str | None = None
) -> Tokenizer:
    """Write a character-level tokenizer (with ``chat_template``, if given) into ``path``; return it loaded.

    Ids: 0 ``BOS``, 1 ``EOS``, then one per character of ``alphabet`` in order, then ``extra_special`` (special
    tokens, skipped by ``decode``). A character outside the alphabet is dropped by ``encode`` (there is no unknown
    token), so keep the alphabet complete for the task, e.g. ``"0123456789+= "`` for addition.
    """
    if not alphabet:
        raise ValueError("alphabet is empty")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet {alphabet!r} repeats a character")
    extra = list(extra_special)
    names = [BOS, EOS, *alphabet, *extra]
    if len(set(names)) != len(names):
        raise ValueError(f"extra_special {extra!r} repeats a token or an alphabet character")
    vocab = {t: i for i, t in enumerate(names)}
    # BPE without merges splits text into characters; no pre-tokenizer, so spaces are characters like any other.
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, *extra)])
    _save(Path(path), backend, chat_template)
    return Tokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- internals
def _save(root: Path, backend: tokenizers.Tokenizer, chat_template: str | None) -> None:
    # BOS comes from the post-processor (what transformers 5 reads) and from add_bos_token (what older
    # transformers and DeepSeek's configs say); both agree.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
    )
    root.mkdir(parents=True, exist_ok=True)
    backend.save(str(root / "tokenizer.json"), pretty=True)
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": _added_token(EOS),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (root / "tokenizer_config.json").write_text(text, encoding="utf-8")


def _added_token(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _bytes_to_unicode() -> list[str]:
    """The printable character GPT-2's byte-level alphabet uses for each byte 0…255, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _learn_merges(n: int, byte_chars: list[str]) -> list[tuple[str, str]]:
    """``n`` BPE merges: learned from :data:`_CORPUS` (most frequent pair first, ties by the pair's text), then,
    when the text has no pairs left, made-up ones, so that any ``n`` is reachable."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts = Counter(word for word, _ in pre.pre_tokenize_str(_CORPUS))
    words = [(list(word), c) for word, c in sorted(counts.items())]
    merges: list[tuple[str, str]] = []
    made: set[str] = set(byte_chars)
    while len(merges) < n:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, c in words:
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        made.add(best[0] + best[1])
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [best[0] + best[1]]
                i += 1
    # Padding: every known token followed by every byte, known tokens in the order they were made (the bytes
    # first, so small paddings are byte pairs); each new merge is a known token too, so there is no limit.
    order = list(byte_chars) + [a + b for a, b in merges]
    i = 0
    while len(merges) < n:
        for b in byte_chars:
            if len(merges) >= n:
                break
            if order[i] + b not in made:
                merges.append((order[i], b))
                made.add(order[i] + b)
                order.append(order[i] + b)
        i += 1
    return merges

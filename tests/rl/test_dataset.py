"""jsonl tasks: reading records (and every way a line can be bad), the hash split, epoch sampling."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dsv4.engine.tokenizer import Tokenizer
from dsv4.rl.dataset import DataConfig, Dataset, EpochSampler, in_eval_split, read_records
from dsv4.rl.tasks import Problem
from dsv4.testing.tokenizers import BOS, write_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    # no chat template of its own: messages render in DeepSeek-V4's format
    return write_byte_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


def jsonl(path: Path, *lines: object) -> Path:
    """Write ``lines`` (objects as JSON, strings as they are) one a line."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_records(tmp_path: Path, tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = jsonl(tmp_path / "d.jsonl",
                 {"prompt": "1+1=", "answer": "2", "id": 7},
                 "",
                 "   ",
                 {"messages": messages, "response": "4", "answer": 4},
                 {"prompt": "Say hi.", "response": None, "pattern": "hi.*"},
                 {"prompt": "def add", "tests": [{"input": "1 2\n", "output": "3\n"}], "response": "(a, b): ..."})
    records = read_records(path, tokenizer)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:4", f"{path}:5", f"{path}:6"]  # blank lines skipped
    assert records[0].problem == Problem("1+1=", reference={"answer": "2", "id": 7})  # every other field
    chat = f"{BOS}Be brief.<｜User｜>2+2?<｜Assistant｜></think>"  # DeepSeek-V4's format, generation prompt
    assert records[1].problem == Problem(chat, reference={"answer": 4}, response="4")
    assert records[1].problem.prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert records[2].problem.response is None and records[2].problem.reference == {"pattern": "hi.*"}
    assert records[3].problem.reference == {"tests": [{"input": "1 2\n", "output": "3\n"}]}
    # token counts are what the engine and SFT will see: the rendered prompt's BOS is not doubled
    assert records[0].prompt_tokens == len(tokenizer.encode("1+1=")) == 1 + len("1+1=")
    assert records[1].prompt_tokens == len(tokenizer.encode(chat, add_special_tokens=False))
    assert records[1].sft_tokens == records[1].prompt_tokens + 1 + 1  # "4" and EOS
    assert records[0].sft_tokens is None
    # the split key: the prompt string, or the messages as canonical JSON
    assert records[0].key == "1+1=" and json.loads(records[1].key) == messages


def test_chat_options(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = jsonl(tmp_path / "d.jsonl", {"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]})
    plain, chat = read_records(path, tokenizer)
    assert plain.problem.prompt == "hi"
    assert chat.problem.prompt == f"{BOS}<｜User｜>hi<｜Assistant｜></think>"
    as_chat = read_records(path, tokenizer, chat=True)  # prompt strings become one user message
    assert as_chat[0].problem.prompt == chat.problem.prompt and as_chat[0].key == "hi"
    thinking = read_records(path, tokenizer, chat_template_kwargs={"thinking": True})
    assert thinking[1].problem.prompt.endswith("<｜Assistant｜><think>")


BAD_LINES = [
    ('{"prompt": "1+1="', "not valid JSON"),
    (b'{"prompt": "\xff"}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got a list"),
    ('{"answer": "2"}', "no prompt: a record needs 'prompt'"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}', "both 'prompt' and 'messages'"),
    ('{"prompt": 12}', "'prompt' must be a string, got a number"),
    ('{"prompt": ""}', "'prompt' is empty"),
    ('{"prompt": "a", "response": ["b"]}', "'response' must be a string, got a list"),
    ('{"messages": "hi"}', "'messages' must be a list of chat messages, got a string"),
    ('{"messages": []}', "'messages': messages is empty"),
    ('{"messages": [{"role": "user"}]}', "'messages': message 0 (user) has no 'content'"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "'messages': chat template"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "ends with an assistant message"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_a_bad_line_names_file_line_and_problem(tmp_path: Path, tokenizer: Tokenizer, line: str | bytes,
                                                problem: str) -> None:
    path = tmp_path / "d.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(b'{"prompt": "fine", "answer": "1"}\n\n' + raw + b'\n{"prompt": "also fine"}\n')
    with pytest.raises(ValueError) as e:
        read_records(path, tokenizer)
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value), str(e.value)


def test_lengths_are_checked_against_the_engine(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = jsonl(tmp_path / "d.jsonl", {"prompt": "abc", "response": "defgh"}, {"prompt": "abcdefgh"})
    data = Dataset(train=read_records(path, tokenizer), eval=[])
    data.check_lengths(16, sft=True)
    with pytest.raises(ValueError, match=rf"^{path}:2: the prompt is 9 tokens; engine.max_model_len=9 must leave"):
        data.check_lengths(9, sft=False)
    data.check_lengths(10, sft=False)  # line 1's 10 SFT tokens do not matter without SFT
    with pytest.raises(ValueError, match=rf"^{path}:1: prompt \+ response \+ EOS is 10 tokens, more than "
                                         r"engine.max_model_len=9"):
        Dataset(train=data.train[:1], eval=[]).check_lengths(9, sft=True)


def test_empty_and_missing_files(tmp_path: Path, tokenizer: Tokenizer) -> None:
    empty = jsonl(tmp_path / "empty.jsonl", "", "  ")
    good = jsonl(tmp_path / "good.jsonl", *({"prompt": f"q{i}"} for i in range(40)))
    with pytest.raises(ValueError, match=rf"^data.train: {empty} has no records"):
        Dataset.load(DataConfig(train=str(empty)), tokenizer)
    with pytest.raises(ValueError, match=rf"^data.eval: {empty} has no records"):
        Dataset.load(DataConfig(train=str(good), eval=str(empty)), tokenizer)
    with pytest.raises(ValueError, match="nope.jsonl: no such file"):
        Dataset.load(DataConfig(train=str(tmp_path / "nope.jsonl")), tokenizer)
    one = jsonl(tmp_path / "one.jsonl", {"prompt": "q0"})  # q0 is a training prompt at eval_fraction 0.1
    with pytest.raises(ValueError, match="data.eval_fraction=0.1 leaves no eval record among the 1 .*data.eval"):
        Dataset.load(DataConfig(train=str(one)), tokenizer)


def test_split_is_a_fixed_property_of_the_prompt(tmp_path: Path, tokenizer: Tokenizer) -> None:
    # pinned: changing the hash would silently move records between train and eval
    assert [k for k in (f"q{i}" for i in range(40)) if in_eval_split(k, 0.1)] == ["q6", "q9", "q10", "q25"]
    lines = [{"prompt": f"q{i % 150}", "answer": str(i)} for i in range(300)]  # every prompt twice
    path = jsonl(tmp_path / "d.jsonl", *lines)
    config = DataConfig(train=str(path), eval_fraction=0.2)
    data = Dataset.load(config, tokenizer)
    train, held = {r.key for r in data.train}, {r.key for r in data.eval}
    assert train and held and not train & held and len(train | held) == 150  # disjoint; both copies together
    assert 0.1 < len(held) / 150 < 0.3
    assert [r.where for r in data.eval] == sorted((r.where for r in data.eval), key=lambda w: int(w.rsplit(":")[1]))
    again = Dataset.load(config, tokenizer)
    assert [r.problem for r in again.train] == [r.problem for r in data.train]
    assert [r.problem for r in again.eval] == [r.problem for r in data.eval]
    # a given eval file is used as it is, and the train file whole
    other = jsonl(tmp_path / "e.jsonl", {"prompt": "held out", "answer": "1"})
    given = Dataset.load(DataConfig(train=str(path), eval=str(other)), tokenizer)
    assert len(given.train) == 300 and [r.problem.prompt for r in given.eval] == ["held out"]


def test_sampler_is_pure_and_walks_epochs() -> None:
    problems = [Problem(f"q{i}", str(i)) for i in range(7)]
    sampler = EpochSampler(problems, "0:sft")
    stream = [p for salt in range(7) for p in sampler(3, salt)]  # 21 draws: three epochs of 7
    for epoch in range(3):
        assert sorted(p.prompt for p in stream[7 * epoch: 7 * epoch + 7]) == sorted(p.prompt for p in problems)
    assert stream[:7] != stream[7:14]  # a fresh order each epoch
    # pure: a batch depends on (key, n, salt) alone, not on what was asked before or on the object
    assert EpochSampler(problems, "0:sft")(3, 5) == sampler(3, 5) == stream[15:18]
    assert EpochSampler(list(problems), "1:sft")(7, 0) != sampler(7, 0)  # another seed, another order
    # pinned: changing the scheme would change what a resumed run trains on
    assert [p.prompt for p in sampler(7, 0)] == [p.prompt for p in stream[:7]] == [
        "q3", "q6", "q1", "q5", "q4", "q2", "q0"]
    many = EpochSampler(problems, "k")(20, 0)
    assert max(Counter(p.prompt for p in many).values()) == 3  # n > size: every problem ~ n / size times
    with pytest.raises(ValueError, match="no problems"):
        EpochSampler([], "k")

"""The contract checks catch broken implementations, naming the rule they break."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from dsv4.core.interfaces import KVPool, SequenceStatus
from dsv4.engine.scheduler import FCFSScheduler
from dsv4.testing.contracts import check_scheduler


class OverBudget(FCFSScheduler[Any]):
    """Schedules twice the tokens it is allowed."""

    def __init__(self, pool: KVPool, **options: Any) -> None:
        super().__init__(pool, **{**options, "max_num_batched_tokens": 2 * options["max_num_batched_tokens"]})


class CutsPrefills(FCFSScheduler[Any]):
    """Cuts prompts into chunks even when built with ``chunked_prefill=False``."""

    def __init__(self, pool: KVPool, **options: Any) -> None:
        super().__init__(pool, **{**options, "chunked_prefill": True})


class KeepsFinished(FCFSScheduler[Any]):
    """``finish`` frees the pages but leaves the sequence in the running set."""

    def finish(self, seq: Any) -> None:
        self.pool.release(seq.seq_id)
        seq.status = SequenceStatus.FINISHED


class ForgetsAborts(FCFSScheduler[Any]):
    """``abort`` drops nothing."""

    def abort(self, request_id: str) -> list[Any]:
        return []


class SkipsReserve(FCFSScheduler[Any]):
    """Runs sequences without reserving their pages."""

    def _reserve(self, seq: Any, n: int) -> bool:
        return True


class NoFinish(FCFSScheduler[Any]):
    """Lacks ``finish`` (an object without it is not a Scheduler)."""

    finish: ClassVar[None] = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("cls", "rule"),
    [
        (OverBudget, "token budget: .* > max_num_batched_tokens=16"),
        (CutsPrefills, r"\(chunked_prefill=False\), step \d+: no cut prefill without chunked prefill"),
        (KeepsFinished, "ended sequences never come back: finished"),
        (ForgetsAborts, "abort returns the request's unfinished sequences"),
        (SkipsReserve, "pages reserved: sequence"),
        (NoFinish, "does not implement the Scheduler Protocol"),
    ],
)
def test_check_scheduler_names_the_broken_rule(cls: type[Any], rule: str) -> None:
    with pytest.raises(AssertionError, match=rule):
        check_scheduler(cls)


def test_check_scheduler_needs_a_scheduler_that_serves_something() -> None:
    class RefusesAll(FCFSScheduler[Any]):
        @classmethod
        def refuse(cls, options: Any) -> str | None:
            return "never"

    with pytest.raises(AssertionError, match="refuses every configuration"):
        check_scheduler(RefusesAll)


def test_check_scheduler_needs_refuse_to_ignore_unknown_options() -> None:
    class Picky(FCFSScheduler[Any]):
        @classmethod
        def refuse(cls, options: Any) -> str | None:
            unknown = set(options) - {"max_num_seqs", "max_num_batched_tokens", "chunked_prefill"}
            return f"unknown options {sorted(unknown)}" if unknown else None

    with pytest.raises(AssertionError, match="refuse must ignore options it does not know"):
        check_scheduler(Picky)

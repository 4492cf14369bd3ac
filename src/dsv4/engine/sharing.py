"""Prompt sharing inside one engine call (``share_prompt``): what n samples of a prompt, or the
prompts of one ``generate()`` call, have in common is computed once and the others start from it.

Across requests and over time the prefix cache (:mod:`dsv4.engine.caching`) does the same for any
start; sharing covers what the cache cannot yet hold, because no request has computed it: the prompt
of the samples running beside it, the common start of a batch arriving at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv4.core.batch import common_prefix
from dsv4.core.interfaces import KVPool, Scheduler, can_adopt, can_fork, can_share
from dsv4.engine.caching import SequenceCache
from dsv4.engine.request import Request, Sequence
from dsv4.engine.sampling import SamplingParams, SequenceSampling

__all__ = ["PromptSharing"]

# generate() prefills its prompts' common start once when it is at least this long (shorter ones are
# not worth the extra step and the page copies).
MIN_SHARED_START = 16


class PromptSharing:
    """A request's first sample computes the prompt and the others get its cache; the common start
    of a batch of prompts is computed by a sequence of its own whose cache each request then gets.
    ``enabled=False`` (``share_prompt`` off, or plugins without the ``"fork"`` capability): every
    sequence computes all of its tokens."""

    def __init__(self, pool: KVPool, scheduler: Scheduler[Sequence], cache: SequenceCache | None, *, enabled: bool,
                 new_seq_id: Callable[[], int], new_request_id: Callable[[str], str]) -> None:
        self.pool, self.scheduler, self.cache = pool, scheduler, cache
        self.enabled = enabled and "fork" in pool.capabilities and "fork" in scheduler.capabilities
        self._new_seq_id, self._new_request_id = new_seq_id, new_request_id
        # Samples waiting for their first sample to compute the prompt: leader seq_id -> the others
        self.forks: dict[int, list[Sequence]] = {}
        # generate(): the sequence computing the prompts' common start, and the requests waiting for it
        self.starts: dict[int, tuple[Sequence, list[Request]]] = {}

    def enqueue(self, req: Request, *, queue_leader: bool = True) -> None:
        """Queue the request's sequences (sharing: its first one; the others get a copy of its cache
        once it has computed the prompt). ``queue_leader=False``: the first waits for a copy too."""
        first, *others = req.seqs
        if self.enabled and others:
            self.forks[first.seq_id] = others
            others = []
        for seq in ([first] if queue_leader else []) + others:
            self.scheduler.add(seq)

    def share_start(self, reqs: list[Request]) -> bool:
        """Compute the common start of ``reqs``' prompts (a system prompt, few-shot examples) once, as a
        sequence of its own whose cache every request's first sequence then gets. Only for a start of
        at least MIN_SHARED_START tokens, short of every prompt (each computes its last token itself),
        and not when the prefix cache holds it already (each request then resumes from the deepest
        checkpoint of its own prompt). Returns whether it does: then queue the requests with
        ``queue_leader=False``."""
        if not self.enabled or len(reqs) < 2:
            return False
        prompts = [r.prompt_ids for r in reqs]
        length = min(min(len(p) for p in prompts) - 1, common_prefix(prompts))
        if length < MIN_SHARED_START:
            return False
        ids = prompts[0][:length]
        cached = self.cache.cache.match(ids) if self.cache is not None else None
        if cached is not None and cached.depth == length:
            return False
        params = SamplingParams(max_tokens=1)
        holder = Request(request_id=self._new_request_id("start"), prompt=None, prompt_ids=ids, params=params,
                         arrival_order=min(r.arrival_order for r in reqs) - 1)  # before the requests it serves
        seq = Sequence(seq_id=self._new_seq_id(), request=holder, index=0,
                       sampling=SequenceSampling(params, ids, index=0), detok=None, stop=None)
        holder.seqs.append(seq)
        self.starts[seq.seq_id] = (seq, reqs)
        self.scheduler.add(seq)
        return True

    def after_step(self, sampled: list[Sequence], logits: torch.Tensor
                   ) -> tuple[list[Sequence], torch.Tensor, list[Sequence]]:
        """The sequences that computed their last token this step (``sampled``, one row of ``logits``
        each): common-start holders hand out their cache and leave; leaders that just computed their
        prompt hand it to their samples, which sample their first token from the leader's row. Returns
        the sequences to sample, their logits, and the samples that run from here."""
        if self.starts and any(seq.seq_id in self.starts for seq in sampled):
            keep = [k for k, seq in enumerate(sampled) if seq.seq_id not in self.starts]
            for seq in sampled:
                if seq.seq_id in self.starts:
                    self._hand_out_start(seq)
            logits, sampled = logits[keep], [sampled[k] for k in keep]
        forked: list[tuple[int, Sequence]] = []
        for k, leader in enumerate(sampled if self.forks else ()):
            if leader.num_computed == len(leader.prompt_ids) and leader.seq_id in self.forks:
                forked += [(k, sib) for sib in self._copy_cache(leader, self.forks.pop(leader.seq_id))]
        if forked:
            logits = torch.cat((logits, logits[[k for k, _ in forked]]))
            sampled = sampled + [sib for _, sib in forked]
        return sampled, logits, [sib for _, sib in forked]

    def abort(self, req: Request) -> None:
        """Forget an aborted request's waiting samples, and a common start nobody waits for any more."""
        self.forks.pop(req.seqs[0].seq_id, None)
        for sid, (holder, waiting) in list(self.starts.items()):
            if all(r.aborted for r in waiting):
                del self.starts[sid]
                self.scheduler.abort(holder.request.request_id)

    # ------------------------------------------------------------------------------------------
    def _hand_out_start(self, holder: Sequence) -> None:
        """The prompts' common start is computed: every waiting request's first sequence gets its cache
        (and routing records) and computes the rest of its prompt from there; the holder is
        checkpointed and its pages go back. One without pages or a running slot is queued to compute
        all of its prompt."""
        _, reqs = self.starts.pop(holder.seq_id)
        self._copy_cache(holder, [r.seqs[0] for r in reqs if not r.aborted])
        if self.cache is not None:
            self.cache.checkpoint(holder, holder.num_computed, holder.frontier)
        self.scheduler.finish(holder)

    def _copy_cache(self, src: Sequence, targets: list[Sequence]) -> list[Sequence]:
        """Give ``targets`` ``src``'s KV cache and routing records and run them from the next step on;
        one without pages or a running slot is queued to compute everything itself (a waiting sequence
        never holds pages, so preemption can always make room). Returns those that run."""
        pool, scheduler = self.pool, self.scheduler
        assert can_fork(pool) and can_adopt(scheduler), "share_prompt needs both with the 'fork' capability"
        sharing = self.pool if can_share(self.pool) else None
        copied = False
        if sharing is None:
            try:  # every copy at once; when pages are short, as many as fit, one by one
                pool.fork(src.seq_id, [seq.seq_id for seq in targets])
                copied = True
            except MemoryError:
                pass
        running = []
        for seq in targets:
            if not copied:
                try:  # a sharing pool shares the prompt's full pages and copies only its last ones
                    if sharing is not None:
                        sharing.share(src.seq_id, seq.seq_id, src.num_computed)
                    else:
                        pool.fork(src.seq_id, seq.seq_id)
                except MemoryError:
                    scheduler.add(seq)
                    continue
            seq.num_computed = src.num_computed  # what its copy holds, as adopt() expects
            if not scheduler.adopt(seq):
                seq.num_computed = 0
                pool.release(seq.seq_id)
                scheduler.add(seq)
                continue
            # its MTP row at the last shared token waits for its own next token (speculative decoding)
            seq.mtp_computed, seq.frontier = min(src.mtp_computed, src.num_computed - 1), src.frontier
            seq.routing_log = list(src.routing_log)
            running.append(seq)
        return running

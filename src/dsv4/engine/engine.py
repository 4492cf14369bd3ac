"""The inference engine: plugins → model, KV pool, scheduler, sampler → a step loop.

``Engine(model_dir).generate(prompts, SamplingParams(...))`` is the offline API; ``add_request`` /
``step`` / ``abort`` are what the async wrapper (and the server) drive.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence as Seq
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from dsv4.cache.prefix import PrefixCache
from dsv4.core.batch import ForwardBatch
from dsv4.core.interfaces import KVPool, RoutingTrace, Scheduler
from dsv4.core.numerics import token_logprobs
from dsv4.core.plugins import choose_plugins, get_registry
from dsv4.core.runtime import tune_allocator
from dsv4.engine.caching import SequenceCache
from dsv4.engine.config import DTYPES, EngineConfig, pool_pages
from dsv4.engine.detok import IncrementalDetokenizer, StopChecker
from dsv4.engine.grammar import Grammars
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.request import Request, Sequence, SequenceStatus
from dsv4.engine.sampling import Sampler, SamplingParams, SequenceSampling
from dsv4.engine.sharing import PromptSharing
from dsv4.engine.speculative import Drafter, accept
from dsv4.engine.tokenizer import Tokenizer
from dsv4.model import Transformer, load_model

__all__ = ["Engine", "EngineConfig", "Prompt"]

Prompt = str | list[int]


class Engine:
    """Continuous-batching DeepSeek-V4 inference on one device."""

    pool: KVPool
    scheduler: Scheduler[Sequence]

    def __init__(
        self,
        model: str | os.PathLike[str] | Transformer | None = None,
        *,
        tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
        config: EngineConfig | None = None,
        **options: Any,
    ) -> None:
        path = None if model is None or isinstance(model, Transformer) else str(model)
        if config is None:
            config = EngineConfig(model=path, **options)
        else:
            same = path is None or config.model is None or Path(path).resolve() == Path(config.model).resolve()
            if not same:
                raise ValueError(f"two checkpoints given: {path!r} and config.model={config.model!r}")
            if options or (path is not None and config.model is None):
                # validated like the constructor's options (model_copy would not check them)
                config = EngineConfig.model_validate({**config.model_dump(), **options, "model": path or config.model})
        self.config = config
        if config.tune_allocator:
            tune_allocator()
        if isinstance(model, Transformer):
            self.model = model.eval()
        elif config.model is not None:
            self.model = load_model(config.model, dtype=DTYPES[config.dtype], device=config.device,
                                    fake_quant=config.fake_quant)
        else:
            raise ValueError("Engine needs a model: a checkpoint directory or a dsv4 Transformer")
        choice = choose_plugins(
            self.model.config, self.model.embed.weight.device, attention_backend=config.attention_backend,
            expert_executor=config.expert_executor, kernels=config.kernels, native_kernels=config.native_kernels,
            packed_weights=config.packed_weights, batch_invariant=config.batch_invariant,
            current=self.model.plugins if isinstance(model, Transformer) else None,
        )
        self.model.use_plugins(choice, config.model_dump())
        self.tokenizer = self._load_tokenizer(tokenizer)
        mcfg = self.model.config
        self.max_model_len = config.max_model_len or min(mcfg.max_position_embeddings, 8192)
        eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else mcfg.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        if config.batch_invariant:
            self.model.set_batch_invariant(True, max_context=self.max_model_len)
        self.pool = self._build_pool()
        registry = get_registry()
        options_map = config.model_dump()
        sched_cls = registry.select("scheduler", config.scheduler, options_map)
        self.scheduler = sched_cls(
            self.pool,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            chunked_prefill=config.chunked_prefill,
        )
        self.sampler = Sampler(eos_token_ids=sorted(self.eos_token_ids), token_logprobs=config.return_token_logprobs)
        self.grammars = Grammars(self.tokenizer, vocab_size=mcfg.vocab_size, stop_token_ids=sorted(self.eos_token_ids))
        # In-place weight updates (RL's weight sync, load_state_dict) flush the cache; a caller that
        # swaps parameter objects instead calls flush_cache() itself.
        self.cache = SequenceCache.build(config, self.pool, self.scheduler,
                                         [*self.model.parameters(), *self.model.buffers()])
        self.requests: dict[str, Request] = {}
        self.sharing = PromptSharing(self.pool, self.scheduler, self.cache, enabled=config.share_prompt,
                                     new_seq_id=lambda: next(self._seq_ids),
                                     new_request_id=lambda kind: f"{kind}-{next(self._request_ids)}")
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._request_ids = itertools.count()
        self.drafter = (Drafter(self.model, self.pool, config.num_speculative_tokens)
                        if config.speculative == "mtp" else None)
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0,
                      "cache_lookup_tokens": 0, "cache_hit_tokens": 0,
                      "spec_steps": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0}
        # Speculative decoding: how often the draft at each position (1 … k) stood, out of how often
        # it was verified.
        self.spec_position_accepted = [0] * config.num_speculative_tokens
        self.spec_position_verified = [0] * config.num_speculative_tokens
        self._retiring: list[Sequence] = []  # ended this step; their pages go back once it is over
        self._expert_load: dict[int, torch.Tensor] = {}  # MoE layer -> tokens routed to each expert

    # ------------------------------------------------------------------------------------------
    def _load_tokenizer(self, tokenizer: Tokenizer | str | os.PathLike[str] | None) -> Tokenizer | None:
        if isinstance(tokenizer, Tokenizer):
            return tokenizer
        source = tokenizer if tokenizer is not None else self.config.model
        if source is not None and (Path(source) / "tokenizer.json").is_file():
            return Tokenizer.from_pretrained(source)
        if tokenizer is not None:
            raise FileNotFoundError(f"{tokenizer}: no tokenizer.json")
        logger.info("no tokenizer.json next to the model: prompts must be token ids")
        return None

    def _build_pool(self) -> KVPool:
        cfg = self.config
        streams = self.model.attn_backend.kv_streams()
        pages = pool_pages(streams, cfg, self.max_model_len)
        device = self.model.embed.weight.device  # a model passed in runs where it is, its cache beside it
        pool_cls = get_registry().select("kv_pool", cfg.kv_pool, self.model.config, device)
        pool: KVPool = pool_cls(streams, pages, page_size=cfg.page_size, dtype=DTYPES[cfg.dtype], device=device)
        return pool

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (``None`` when off)."""
        return self.cache.cache if self.cache is not None else None

    def flush_cache(self) -> int:
        """Drop every prefix-cache checkpoint (SGLang's ``/flush_cache``); how many there were."""
        return self.cache.cache.flush() if self.cache is not None else 0

    # ------------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a prompt (text or token ids). Raises ``ValueError`` for a prompt the engine can't serve."""
        req = self._new_request(prompt, params or SamplingParams(), request_id)
        self.sharing.enqueue(req)
        return req

    def _new_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None) -> Request:
        """A validated request and its sequences, registered but not yet queued."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids")
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self._validate_prompt(ids)
        rid = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        grammar = self.grammars.sequence_grammar(params.structured_outputs)  # checked now, compiled aside
        req = Request(request_id=rid, prompt=text, prompt_ids=ids, params=params, arrival_order=next(self._arrivals))
        for j in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request=req,
                index=j,
                sampling=SequenceSampling(params, ids, index=j),
                detok=(IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens)
                       if self.tokenizer is not None else None),
                stop=StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None,
                logprobs=[] if params.logprobs is not None else None,
                grammar=grammar() if grammar is not None else None,
            )
            req.seqs.append(seq)
        self.requests[rid] = req
        return req

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; this engine's context limit (max_model_len) is "
                f"{self.max_model_len}, which must also leave room for at least one generated token"
            )
        if not self.config.chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with chunked_prefill off a prompt is prefilled in one step, "
                f"and max_num_batched_tokens is {self.config.max_num_batched_tokens}"
            )
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0 … {vocab - 1})")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its KV pages; its final output (finish "abort")."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        self.sharing.abort(req)
        if self.cache is not None:  # a client that went away may well send it again
            for seq in req.seqs:
                if seq.status is SequenceStatus.RUNNING and seq.num_computed:
                    self.cache.checkpoint(seq, seq.num_computed)
        for seq in self.scheduler.abort(request_id):
            seq.finish_reason = seq.finish_reason or "abort"
        for seq in req.seqs:
            if not seq.finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        req.metrics.finished = time.monotonic()
        return req.output()

    def kv_stats(self) -> dict[str, dict[str, float]]:
        """Per KV stream: pages used (by requests and checkpoints), free and held only by prefix-cache
        checkpoints; bytes the running requests hold and bytes per token of their context (bytes /
        tokens in the cache across running sequences); bytes only checkpoints hold. ``"total"`` sums
        the streams; ``"prefix_cache"`` has the cache's checkpoints, the tokens in its tree, hits
        (prompt tokens resumed from it, out of every request's prompt tokens), bytes and evictions."""
        context = sum(s.num_computed for r in self.requests.values() for s in r.seqs if not s.finished)
        cache = self.prefix_cache
        stats: dict[str, dict[str, float]] = {}
        for name in self.pool.streams:
            used, cached = self.pool.pages_used(name), cache.pages(name) if cache is not None else 0
            page_bytes = self.pool.bytes_used(name) / used if used else 0.0
            held = (used - cached) * page_bytes
            stats[name] = {"pages_used": float(used), "pages_free": float(self.pool.pages_free(name)),
                           "pages_cached": float(cached), "bytes": held,
                           "bytes_per_token": held / context if context else 0.0, "cached_bytes": cached * page_bytes}
        total = sum(v["bytes"] for v in stats.values())
        cached_bytes = sum(v["cached_bytes"] for v in stats.values())
        stats["total"] = {"bytes": total, "bytes_per_token": total / context if context else 0.0,
                          "context_tokens": float(context), "cached_bytes": cached_bytes}
        looked, hit = self.stats["cache_lookup_tokens"], self.stats["cache_hit_tokens"]
        stats["prefix_cache"] = {
            "enabled": float(cache is not None), "prompt_tokens": float(looked), "hit_tokens": float(hit),
            "hit_rate": hit / looked if looked else 0.0, "bytes": cached_bytes, "checkpoints": 0.0,
            "cached_tokens": 0.0, "inserted": 0.0, "evictions": 0.0,
        }
        if cache is not None:
            stats["prefix_cache"] |= {"checkpoints": float(cache.num_checkpoints),
                                      "cached_tokens": float(cache.cached_tokens()),
                                      "inserted": float(cache.stats.inserted), "evictions": float(cache.stats.evictions)}
        return stats

    def spec_stats(self) -> dict[str, Any]:
        """Speculative decoding since start: verifying steps (one per speculating sequence and step),
        drafts verified and accepted, the accept length (tokens per verifying step: accepted drafts + the
        one sampled), and per draft position how often it was verified and how often it stood."""
        steps, drafted, accepted = (self.stats[k] for k in ("spec_steps", "spec_draft_tokens", "spec_accepted_tokens"))
        verified = self.spec_position_verified
        return {"enabled": self.drafter is not None, "steps": steps, "draft_tokens": drafted,
                "accepted_tokens": accepted, "accept_length": (accepted + steps) / steps if steps else 0.0,
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "position_verified": list(verified), "position_accepted": list(self.spec_position_accepted),
                "position_acceptance": [a / v if v else 0.0
                                        for a, v in zip(self.spec_position_accepted, verified, strict=True)]}

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of every MoE layer the engine runs, since it started:
        what expert-parallel placement is decided from."""
        return {layer: counts.tolist() for layer, counts in sorted(self._expert_load.items())}

    def has_unfinished(self) -> bool:
        """Whether any request is still running or waiting."""
        return bool(self.requests)

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; the outputs of every request that advanced or finished."""
        if self.cache is not None:
            self.cache.check_weights()
        plan = self.scheduler.schedule()
        self.stats["preemptions"] += len(plan.preempted)
        for seq in plan.preempted:
            seq.request.metrics.num_preemptions += 1
            seq.draft_ids, seq.mtp_computed, seq.frontier = [], 0, None
        if not plan.items:
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler made no progress: the KV pool cannot hold a single sequence")
            return []
        now = time.monotonic()
        chunks, prefixes, rids, sample, sample_rows = [], [], [], [], []
        drafts: list[list[int]] = []  # per item: the drafts this step verifies after its last token
        for i, (seq, n) in enumerate(plan.items):
            start = seq.num_computed
            verify = seq.draft_ids[: max(0, n - (seq.num_tokens - start))]
            seq.draft_ids = []  # verified now or never: a speculating sequence drafts anew after each step
            chunks.append(seq.tokens(start, start + n - len(verify)) + verify)
            drafts.append(verify)
            prefixes.append(start)
            rids.append(seq.seq_id)
            if start + n - len(verify) == seq.num_tokens:
                sample.append(i)
                sample_rows.append(1 + len(verify))
            if seq.request.metrics.first_scheduled is None:
                seq.request.metrics.first_scheduled = now
                seq.request.metrics.cached_tokens = start
                if seq.request_id in self.requests:  # a client's (not a batch's common start)
                    self.stats["cache_lookup_tokens"] += len(seq.prompt_ids)
                    self.stats["cache_hit_tokens"] += start
        device = self.model.embed.weight.device
        batch = ForwardBatch.from_requests(chunks, prefixes, rids=rids, sample=sample, sample_rows=sample_rows,
                                           device=device)
        trace = RoutingTrace() if self.config.record_routing else None
        out = self.model.run(batch, self.pool, routing=trace)
        logits = out.logits.float()
        for layer, counts in out.expert_load.items():  # summed on the device: no sync per step
            held = self._expert_load.get(layer)
            self._expert_load[layer] = counts if held is None else held + counts
        self.stats["steps"] += 1
        step = _Step(plan.items, batch.starts_host, out.hidden, drafts)
        if trace is not None:
            step.routing = trace
        step.advance()  # every row but the drafts' stands
        for i, (seq, _) in enumerate(plan.items):
            if seq.num_computed <= len(seq.prompt_ids):
                self.stats["prompt_tokens"] += step.computed[i]
        plain = [k for k, i in enumerate(sample) if not drafts[i]]
        spec = [k for k, i in enumerate(sample) if drafts[i]]
        speculating = self.drafter is not None and len(sample) <= self.config.speculative_max_batch
        if self.drafter is not None:
            step.keep_frontiers()
        if speculating:  # the MTP rows of positions whose next token is known already (prompt chunks)
            self._extend_mtp(step, before_sampling=True)
        self._checkpoint(step, [i for i in range(len(plan.items)) if not drafts[i]])
        touched: dict[str, Request] = {}
        # common starts hand out their cache; samples of a prompt just computed get theirs
        rows = list(itertools.accumulate(sample_rows, initial=0))
        sampled, plain_logits, forked = self.sharing.after_step(
            [plan.items[sample[k]][0] for k in plain], logits if not spec else logits[[rows[k + 1] - 1 for k in plain]])
        exact = self.model.invariant and self.config.return_token_logprobs
        if sampled:
            result = self.sampler.sample(plain_logits, [s.sampling for s in sampled],
                                         mask=self.grammars.mask([s.grammar for s in sampled]))
            if exact:  # the trainer's own function, so true on-policy logprobs match it bit for bit
                tokens = torch.tensor(result.tokens, device=plain_logits.device)
                result.chosen_logprob = token_logprobs(plain_logits, tokens, True).tolist()
            for k, seq in enumerate(sampled):
                self._append(seq, result.tokens[k], result.logprobs[k], result.chosen_logprob[k], now)
                touched[seq.request.request_id] = seq.request
        if spec:
            picked = torch.cat([torch.arange(rows[k], rows[k + 1]) for k in spec]).to(logits.device)
            self._verify([sample[k] for k in spec], logits[picked], step, touched, now, exact)
            if self.drafter is not None:
                step.keep_frontiers()
        if speculating:  # the rows of the tokens just sampled or accepted, then the next step's drafts
            self._extend_mtp(step, before_sampling=False, extra=forked)
        self._checkpoint(step, [i for i in range(len(plan.items)) if drafts[i]])
        for seq in self._retiring:  # ended this step: checkpointed with every row written, then released
            if self.cache is not None:
                self.cache.checkpoint(seq, seq.num_computed, seq.frontier)  # the next turn starts with these
            self.scheduler.finish(seq)
        self._retiring.clear()
        for seq in itertools.chain((s for s, _ in plan.items), forked):
            if not seq.finished:
                self.pool.release(seq.seq_id, seq.num_computed)  # recycle what the window left behind
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished = time.monotonic()
                self.requests.pop(req.request_id, None)
            outputs.append(req.output())
        return outputs

    def _checkpoint(self, step: _Step, items: list[int]) -> None:
        """Prefix-cache checkpoints due in the rows of ``items`` that stand, with the MTP rows before them
        written; the routing records of those rows."""
        for i in items:
            seq = step.items[i][0]
            if step.routing is not None:
                _keep_routing(seq, step.routing, step.starts[i], step.computed[i], fresh=step.first[i] == 0)
            if self.cache is not None and not seq.finished:
                self.cache.step_computed(seq, step.first[i], seq.num_computed,
                                         step.frontier_of(i) if self.drafter is not None else _no_frontier)

    def _verify(self, items: list[int], logits: torch.Tensor, step: _Step, touched: dict[str, Request],
                now: float, exact: bool) -> None:
        """Judge the drafts of the step's speculating ``items`` on their rows of ``logits`` and append what
        stands; the rows of rejected drafts stay behind ``num_computed`` (written again later)."""
        seqs = [step.items[i][0] for i in items]

        def append(seq: Sequence, token: int, logprobs: Any, chosen: float) -> bool:
            self._append(seq, token, logprobs, chosen, now)
            return seq.finish_reason is None

        stood = accept(self.sampler, logits, seqs, [step.drafts[i] for i in items], append, exact_logprobs=exact)
        for i, seq, a in zip(items, seqs, stood, strict=True):
            seq.num_computed += a
            step.computed[i] += a
            k = len(step.drafts[i])
            metrics = seq.request.metrics
            metrics.spec_steps += 1
            metrics.spec_draft_tokens += k
            metrics.spec_accepted_tokens += a
            self.stats["spec_steps"] += 1
            self.stats["spec_draft_tokens"] += k
            self.stats["spec_accepted_tokens"] += a
            for j in range(k):
                self.spec_position_verified[j] += 1
                self.spec_position_accepted[j] += j < a
            touched[seq.request.request_id] = seq.request

    def _extend_mtp(self, step: _Step, *, before_sampling: bool, extra: Seq[Sequence] = ()) -> None:
        """Write the MTP block's rows of every position whose next token is known (before sampling: the
        prompt's; after: the tokens just sampled or accepted too), then, after sampling, draft the next
        step's tokens for each sequence whose rows reach its last computed position."""
        assert self.drafter is not None
        work = []
        for i, (seq, _) in enumerate(step.items):
            upto = min(seq.num_computed, seq.num_tokens - 1)
            if seq.finished:  # a common start that handed out its cache
                continue
            rows = step.hidden_for(i, seq.mtp_computed, upto)
            if rows is not None:
                work.append((seq, rows[0], upto, rows[1]))
        for seq in extra:  # samples given a prompt's cache this step: its last row is theirs to write
            if seq.frontier is not None and seq.mtp_computed == seq.num_computed - 1 < seq.num_tokens - 1:
                work.append((seq, seq.mtp_computed, seq.num_computed, seq.frontier[None]))
        done = self.drafter.extend(work)
        if before_sampling or done is None:
            return
        seqs, logits, streams = done
        keep = [j for j, seq in enumerate(seqs)
                if seq.finish_reason is None and seq.mtp_computed == seq.num_computed and _may_speculate(seq)]
        if keep:
            self.drafter.draft([seqs[j] for j in keep], logits[keep], streams[keep])

    def _append(self, seq: Sequence, token: int, logprobs: Any, chosen: float, now: float) -> None:
        params = seq.request.params
        seq.output_ids.append(token)
        seq.sampling.append(token)
        self.stats["generated_tokens"] += 1
        if seq.request.metrics.first_token is None:
            seq.request.metrics.first_token = now
        if self.config.return_token_logprobs:
            seq.token_logprobs.append(chosen)
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += chosen
        reason: str | None = None
        stop_reason: str | int | None = None
        if seq.grammar is not None and seq.grammar.accept(token):
            reason = "stop"  # the grammar is complete (the token is a stop token) even under ignore_eos
        special = token in self.eos_token_ids or token in params.stop_token_ids
        if seq.detok is not None and not (special and params.skip_special_tokens):
            new = seq.detok.push(token)
            if seq.stop is not None:
                emit, matched = seq.stop.feed(new)
                seq.text += emit
                if matched is not None:
                    reason, stop_reason = "stop", matched
            else:
                seq.text += new
        n_out = len(seq.output_ids)
        if reason is None and n_out >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                reason = "stop"
            elif token in params.stop_token_ids:
                reason, stop_reason = "stop", token
        if reason is None and (n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, stop_reason)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        if not isinstance(stop_reason, str):
            # Release text held back for an unfinished character or a possible stop string.
            tail = seq.detok.flush() if seq.detok is not None else ""
            if seq.stop is not None:
                emit, matched = seq.stop.feed(tail)
                seq.text += emit + ("" if matched is not None else seq.stop.flush())
                if matched is not None:
                    reason, stop_reason = "stop", matched
            else:
                seq.text += tail
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.draft_ids = []
        self._retiring.append(seq)  # the step's MTP rows are written before it is checkpointed and released

    # ------------------------------------------------------------------------------------------
    def iter_generate(
        self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Run prompts to completion, yielding ``(index, output)`` as each request finishes."""
        plist = _per_prompt(params, len(prompts))
        reqs = []
        try:  # every prompt is checked before any is queued
            for prompt, p in zip(prompts, plist, strict=True):
                reqs.append(self._new_request(prompt, p, None))
        except Exception:
            for req in reqs:
                del self.requests[req.request_id]
            raise
        shared = self.sharing.share_start(reqs)
        for req in reqs:
            self.sharing.enqueue(req, queue_leader=not shared)
        ids = {req.request_id: i for i, req in enumerate(reqs)}
        while any(rid in self.requests for rid in ids):
            for out in self.step():
                if out.finished and out.request_id in ids:
                    yield ids.pop(out.request_id), out

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """One finished output per prompt, in order (vLLM's ``LLM.generate``)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list: list[Prompt] = list(prompts)  # type: ignore[arg-type]
        for i, p in enumerate(_per_prompt(params, len(prompt_list))):  # validate before queueing anything
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling params {i} is a {type(p).__name__}, not SamplingParams")
        results: list[RequestOutput | None] = [None] * len(prompt_list)
        for i, out in self.iter_generate(prompt_list, params):
            results[i] = out
        return [r for r in results if r is not None]


class _Step:
    """Bookkeeping of one engine step: where each scheduled sequence's rows sit in the forward, how many
    of them stand (drafts that were rejected do not), and the main model's streams of every row."""

    def __init__(self, items: Seq[tuple[Sequence, int]], starts: Seq[int], hidden: torch.Tensor,
                 drafts: list[list[int]]) -> None:
        self.items, self.starts, self.hidden, self.drafts = items, starts, hidden, drafts
        self.first = [seq.num_computed for seq, _ in items]  # each one's first position in the step
        self.frontier_before = [seq.frontier for seq, _ in items]  # the streams at first - 1
        self.computed = [0] * len(items)  # rows that stand
        self.routing: RoutingTrace | None = None  # the step's expert / indexer record, when kept

    def advance(self) -> None:
        """Every row but the drafts' stands (until the drafts are judged)."""
        for i, (seq, n) in enumerate(self.items):
            self.computed[i] = n - len(self.drafts[i])
            seq.num_computed += self.computed[i]

    def hidden_for(self, i: int, first: int, stop: int) -> tuple[int, torch.Tensor] | None:
        """The main model's streams at positions ``first:stop`` of item ``i``: this step's rows, and the
        sequence's frontier for the position before them. A range reaching further back starts at what
        is known (speculation was paused, or no streams were kept: the MTP rows before stay as they
        are). ``(first, [stop - first, n, D])``, or ``None`` when nothing is left."""
        lo = self.first[i]
        before = self.frontier_before[i]
        if first < lo - 1 or (first == lo - 1 and before is None):
            first = lo
        if stop <= first:
            return None
        rows = self.hidden[self.starts[i] + max(first, lo) - lo : self.starts[i] + stop - lo]
        return first, torch.cat((before[None], rows)) if first == lo - 1 and before is not None else rows

    def frontier_of(self, i: int) -> Callable[[int], torch.Tensor | None]:
        """``at -> `` the streams at position ``at - 1`` of item ``i`` (a checkpoint at ``at`` tokens)."""
        return lambda at: self.hidden[self.starts[i] + at - 1 - self.first[i]].clone()

    def keep_frontiers(self) -> None:
        """Each sequence keeps the streams at its last computed position."""
        for i, (seq, _) in enumerate(self.items):
            if self.computed[i]:
                seq.frontier = self.hidden[self.starts[i] + self.computed[i] - 1].clone()


def _may_speculate(seq: Sequence) -> bool:
    """Whether the MTP block drafts for ``seq``: not under a grammar (its drafts are not constrained)."""
    return seq.grammar is None


def _per_prompt(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    plist = list(params)
    if len(plist) != n:
        raise ValueError(f"{len(plist)} sampling params for {n} prompts")
    return plist


def _no_frontier(at: int) -> None:
    return None


def _keep_routing(seq: Sequence, trace: RoutingTrace, start: int, n: int, *, fresh: bool) -> None:
    """Note that the step's expert / indexer picks of rows ``start : start + n`` are the sequence's next;
    ``fresh``: its first (the sequence is computed from scratch: earlier records are stale)."""
    if fresh:
        seq.routing_log.clear()
    seq.routing_log.append((trace, start, n))

"""The inference engine: plugins → model, KV pool, scheduler, sampler → a step loop.

``Engine(model_dir).generate(prompts, SamplingParams(...))`` is the offline API; ``add_request`` /
``step`` / ``abort`` are what the async wrapper (and the server) drive.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator, Sequence as Seq
from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger
from pydantic import Field

from dsv4.core.batch import ForwardBatch, common_prefix
from dsv4.core.interfaces import KVPool, RoutingTrace, Scheduler, can_adopt, can_fork
from dsv4.core.numerics import token_logprobs
from dsv4.core.kv import StreamSpec
from dsv4.core.plugins import choose_plugins, get_registry
from dsv4.core.runconfig import RunConfigModel
from dsv4.core.runtime import tune_allocator
from dsv4.engine.detok import IncrementalDetokenizer, StopChecker
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.request import Request, Sequence, SequenceStatus
from dsv4.engine.sampling import Sampler, SamplingParams, SequenceSampling
from dsv4.engine.tokenizer import Tokenizer
from dsv4.model import Transformer, load_model

__all__ = ["Engine", "EngineConfig", "Prompt"]

Prompt = str | list[int]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(RunConfigModel):
    """Engine options (each is also a ``dsv4.Engine(...)`` keyword and a ``key=value`` override)."""

    model: str | None = None  # checkpoint directory (config.json, safetensors, tokenizer.json)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # CPU: keep float32
    device: str = "cpu"  # where a checkpoint is loaded ("cuda", "cuda:1"); a model passed in stays where it is
    # Plugin names (see `dsv4 plugins`). "auto" (decided by dsv4.core.plugins.choose_plugins): the
    # native-kernel "cpu" plugins where they apply (CPU, native_kernels, not batch_invariant), else the
    # "reference" backend, for experts "grouped" (batched small steps) or "reference" in batch-invariant
    # mode, and for kernels "reference" (autograd), "batch_invariant", and "cpu" or "reference" for
    # inference. A named kernel set computes every step mode it declares. A model passed in keeps
    # third-party plugins under "auto"; built-in PyTorch ones are swapped for the auto choice.
    attention_backend: str = "auto"
    expert_executor: str = "auto"
    kernels: str = "auto"
    kv_pool: str = "paged"
    scheduler: str = "fcfs"
    fake_quant: bool = False  # reproduce the reference's FP8/FP4 activation quantisation
    max_model_len: int | None = Field(default=None, ge=2)  # prompt + output; default min(config, 8192)
    max_num_seqs: int = Field(default=64, ge=1)  # sequences running at once
    max_num_batched_tokens: int = Field(default=2048, ge=1)  # new tokens per step (prefill chunks + decodes)
    chunked_prefill: bool = True
    page_size: int = Field(default=16, ge=1)
    # Context tokens the compressed-entry pools hold across all sequences (default: every running
    # sequence at max_model_len, so nothing is ever preempted); smaller values trade memory for preemption.
    kv_cache_tokens: int | None = Field(default=None, ge=1)
    # Compute every sampled token's logprob (RL rollouts need them); costs a pass over the vocabulary.
    return_token_logprobs: bool = False
    # Record every layer's expert (and indexer) choices per token, for routing replay in RL training.
    record_routing: bool = False
    # Batch-invariant numerics (true on-policy RL): a token's logits do not depend on its batch.
    batch_invariant: bool = False
    # Small-batch fp32 CPU linears through MKL-packed weights (1.3–2x faster per linear at 4–256
    # rows; the packed copies cost about the weights' memory again), in the "cpu" kernel set. Ignored
    # off the CPU, without MKL, and in batch-invariant mode.
    packed_weights: bool = True
    # Fused C kernels for CPU inference (dsv4.native: mHC, norms, rope and the router in the "cpu"
    # kernel set; attention, compression and experts through the "cpu" plugins that "auto" then
    # picks), compiled on first use. Ignored off the CPU, in batch-invariant mode and where no C
    # compiler works (the PyTorch paths run instead).
    native_kernels: bool = True
    # n > 1: prefill the prompt once and give the other samples a copy of its KV cache (pools with
    # the "fork" capability); off: every sample prefills the prompt itself.
    share_prompt: bool = True
    # Keep large CPU tensors in glibc's heap (process-wide; dsv4.core.runtime): ~1.5x faster long
    # prefills, but ~10 % slower small-tensor RL training, so off unless asked (dsv4 serve/batch do).
    tune_allocator: bool = False


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
            self.model = load_model(config.model, dtype=_DTYPES[config.dtype], device=config.device,
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
        self.requests: dict[str, Request] = {}
        self._share_prompt = (config.share_prompt and "fork" in self.pool.capabilities
                              and "fork" in self.scheduler.capabilities)
        # Samples waiting for their first sample to prefill the prompt (share_prompt): leader seq_id -> rest
        self._forks: dict[int, list[Sequence]] = {}
        # generate(): the sequence prefilling the prompts' common start, and the requests waiting for a copy
        self._starts: dict[int, tuple[Sequence, list[Request]]] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._request_ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0}
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
        capacity = cfg.kv_cache_tokens or cfg.max_num_seqs * self.max_model_len
        chunk = min(cfg.max_num_batched_tokens, self.max_model_len)
        pages = {s.name: _pages_needed(s, cfg.page_size, cfg.max_num_seqs, capacity, chunk) for s in streams}
        device = self.model.embed.weight.device  # a model passed in runs where it is, its cache beside it
        pool_cls = get_registry().select("kv_pool", cfg.kv_pool, self.model.config, device)
        pool: KVPool = pool_cls(streams, pages, page_size=cfg.page_size, dtype=_DTYPES[cfg.dtype], device=device)
        return pool

    # ------------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a prompt (text or token ids). Raises ``ValueError`` for a prompt the engine can't serve."""
        req = self._new_request(prompt, params or SamplingParams(), request_id)
        self._enqueue(req)
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
            )
            req.seqs.append(seq)
        self.requests[rid] = req
        return req

    def _enqueue(self, req: Request, *, queue_leader: bool = True) -> None:
        """Queue the request's sequences (with share_prompt, its first one; the others get a copy of its
        cache once it has computed the prompt). ``queue_leader=False``: the first waits for a copy too."""
        first, *others = req.seqs
        if self._share_prompt and others:
            self._forks[first.seq_id] = others
            others = []
        for seq in ([first] if queue_leader else []) + others:
            self.scheduler.add(seq)

    def _share_start(self, reqs: list[Request]) -> bool:
        """Prefill the common start of ``reqs``' prompts (a system prompt, few-shot examples) once, as a
        sequence of its own whose cache every request's first sequence then gets a copy of. Only for a
        start of at least _MIN_SHARED_START tokens, and short of every prompt (each still prefills its
        last token itself). Returns whether it does."""
        if not self._share_prompt or len(reqs) < 2:
            return False
        prompts = [r.prompt_ids for r in reqs]
        length = min(min(len(p) for p in prompts) - 1, common_prefix(prompts))
        if length < _MIN_SHARED_START:
            return False
        ids = prompts[0][:length]
        params = SamplingParams(max_tokens=1)
        holder = Request(request_id=f"start-{next(self._request_ids)}", prompt=None, prompt_ids=ids, params=params,
                         arrival_order=min(r.arrival_order for r in reqs) - 1)  # before the requests it serves
        seq = Sequence(seq_id=next(self._seq_ids), request=holder, index=0,
                       sampling=SequenceSampling(params, ids, index=0), detok=None, stop=None)
        holder.seqs.append(seq)
        self._starts[seq.seq_id] = (seq, reqs)
        self.scheduler.add(seq)
        return True

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
        self._forks.pop(req.seqs[0].seq_id, None)
        for sid, (holder, waiting) in list(self._starts.items()):
            if all(r.aborted for r in waiting):  # nobody left to copy the common start to
                del self._starts[sid]
                self.scheduler.abort(holder.request.request_id)
        for seq in self.scheduler.abort(request_id):
            seq.finish_reason = seq.finish_reason or "abort"
        for seq in req.seqs:
            if not seq.finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        req.metrics.finished = time.monotonic()
        return req.output()

    def kv_stats(self) -> dict[str, dict[str, float]]:
        """Per KV stream: pages used and free, bytes held, and bytes per token of cached context
        (bytes held / tokens in the cache across running sequences). ``"total"`` sums the streams."""
        context = sum(s.num_computed for r in self.requests.values() for s in r.seqs if not s.finished)
        stats: dict[str, dict[str, float]] = {}
        for name in self.pool.streams:
            used = self.pool.bytes_used(name)
            stats[name] = {"pages_used": float(self.pool.pages_used(name)), "pages_free": float(self.pool.pages_free(name)),
                           "bytes": float(used), "bytes_per_token": used / context if context else 0.0}
        total = sum(v["bytes"] for v in stats.values())
        stats["total"] = {"bytes": total, "bytes_per_token": total / context if context else 0.0,
                          "context_tokens": float(context)}
        return stats

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
        plan = self.scheduler.schedule()
        self.stats["preemptions"] += len(plan.preempted)
        for seq in plan.preempted:
            seq.request.metrics.num_preemptions += 1
        if not plan.items:
            if self.scheduler.has_work():
                raise RuntimeError("the scheduler made no progress: the KV pool cannot hold a single sequence")
            return []
        now = time.monotonic()
        chunks, prefixes, rids, sample = [], [], [], []
        for i, (seq, n) in enumerate(plan.items):
            start = seq.num_computed
            chunks.append(seq.tokens(start, start + n))
            prefixes.append(start)
            rids.append(seq.seq_id)
            if start + n == seq.num_tokens:
                sample.append(i)
            if seq.request.metrics.first_scheduled is None:
                seq.request.metrics.first_scheduled = now
        device = self.model.embed.weight.device
        batch = ForwardBatch.from_requests(chunks, prefixes, rids=rids, sample=sample, device=device)
        trace = RoutingTrace() if self.config.record_routing else None
        out = self.model.run(batch, self.pool, routing=trace)
        logits = out.logits.float()
        for layer, counts in out.expert_load.items():  # summed on the device: no sync per step
            held = self._expert_load.get(layer)
            self._expert_load[layer] = counts if held is None else held + counts
        self.stats["steps"] += 1
        starts = batch.starts_host
        for i, (seq, n) in enumerate(plan.items):
            if trace is not None:
                _keep_routing(seq, trace, starts[i], n)
            seq.num_computed += n
            if seq.num_computed <= len(seq.prompt_ids):
                self.stats["prompt_tokens"] += n
        touched: dict[str, Request] = {}
        sampled = [plan.items[i][0] for i in sample]
        if self._starts and any(seq.seq_id in self._starts for seq in sampled):
            keep = [k for k, seq in enumerate(sampled) if seq.seq_id not in self._starts]
            for seq in sampled:
                if seq.seq_id in self._starts:
                    self._hand_out_start(seq)
            logits, sampled = logits[keep], [sampled[k] for k in keep]
        forked = self._fork_samples(sampled) if self._forks else []
        if forked:  # they sample their first token from their leader's logits
            rows = [k for k, _ in forked]
            logits = torch.cat((logits, logits[rows]))
            sampled += [sib for _, sib in forked]
        if sampled:
            result = self.sampler.sample(logits, [s.sampling for s in sampled])
            if self.model.invariant and self.config.return_token_logprobs:
                # the trainer's own function, so true on-policy logprobs match it bit for bit
                chosen = token_logprobs(logits, torch.tensor(result.tokens, device=logits.device), True)
                result.chosen_logprob = chosen.tolist()
            now = time.monotonic()
            for k, seq in enumerate(sampled):
                self._append(seq, result.tokens[k], result.logprobs[k], result.chosen_logprob[k], now)
                touched[seq.request.request_id] = seq.request
        for seq in itertools.chain((s for s, _ in plan.items), (s for _, s in forked)):
            if not seq.finished:
                self.pool.release(seq.seq_id, seq.num_computed)  # recycle what the window left behind
        outputs = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished = time.monotonic()
                self.requests.pop(req.request_id, None)
            outputs.append(req.output())
        return outputs

    def _hand_out_start(self, holder: Sequence) -> None:
        """The prompts' common start is computed: every waiting request's first sequence gets a copy of
        its cache (and routing records) and prefills the rest of its prompt from there; the holder's
        pages go back. One without pages or a running slot is queued to prefill all of its prompt."""
        _, reqs = self._starts.pop(holder.seq_id)
        self._copy_cache(holder, [r.seqs[0] for r in reqs if not r.aborted])
        self.scheduler.finish(holder)

    def _fork_samples(self, sampled: list[Sequence]) -> list[tuple[int, Sequence]]:
        """Samples whose leader (``sampled[k]``) just computed their shared prompt get a copy of its
        cache (:meth:`_copy_cache`). Returns ``(k, sample)`` for those that now run."""
        forked = []
        for k, leader in enumerate(sampled):
            if leader.num_computed != len(leader.prompt_ids) or leader.seq_id not in self._forks:
                continue
            forked += [(k, sib) for sib in self._copy_cache(leader, self._forks.pop(leader.seq_id))]
        return forked

    def _copy_cache(self, src: Sequence, targets: list[Sequence]) -> list[Sequence]:
        """Give ``targets`` a copy of ``src``'s KV cache and routing records and run them from the next
        step on; one without pages or a running slot is queued to compute everything itself (a waiting
        sequence never holds pages, so preemption can always make room). Returns those that run."""
        pool, scheduler = self.pool, self.scheduler
        assert can_fork(pool) and can_adopt(scheduler), "share_prompt needs both with the 'fork' capability"
        try:  # every copy at once; when pages are short, as many as fit, one by one
            pool.fork(src.seq_id, [seq.seq_id for seq in targets])
            copied = True
        except MemoryError:
            copied = False
        running = []
        for seq in targets:
            if not copied:
                try:
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
            seq.routing_log = list(src.routing_log)
            running.append(seq)
        return running

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
        self.scheduler.finish(seq)

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
        shared = self._share_start(reqs)
        for req in reqs:
            self._enqueue(req, queue_leader=not shared)
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


# generate() prefills its prompts' common start once when it is at least this long (shorter ones are
# not worth the extra step and the page copies).
_MIN_SHARED_START = 16


def _per_prompt(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    plist = list(params)
    if len(plist) != n:
        raise ValueError(f"{len(plist)} sampling params for {n} prompts")
    return plist


def _pages_needed(s: StreamSpec, page: int, max_seqs: int, capacity_tokens: int, chunk: int) -> int:
    """Pages of stream ``s`` for ``max_seqs`` sequences holding ``capacity_tokens`` tokens in total."""
    if s.keep is None:  # grows with the context: sized by total capacity, plus a partial page each
        return math.ceil(s.length(capacity_tokens) / page) + max_seqs
    # Bounded per sequence: what it keeps, the open block, and a step's chunk, plus partial pages.
    rows = math.ceil((s.keep + s.align + chunk) / s.ratio) + 1
    return max_seqs * (math.ceil(rows / page) + 2)


def _keep_routing(seq: Sequence, trace: RoutingTrace, start: int, n: int) -> None:
    """Note that the step's expert / indexer picks of rows ``start : start + n`` are the sequence's next."""
    if seq.num_computed == 0:  # (re)computed from scratch: earlier records are stale
        seq.routing_log.clear()
    seq.routing_log.append((trace, start, n))

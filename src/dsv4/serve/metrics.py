"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["RequestTimer", "ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """Counters, latency histograms and engine gauges, exposed at ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsv4_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dsv4_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("dsv4_num_requests_running", "Sequences with KV in the pool", registry=r)
        self.waiting = Gauge("dsv4_num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.pages_used = Gauge("dsv4_kv_pages_used", "KV pool pages running requests hold", ["pool"], registry=r)
        self.pages_cached = Gauge("dsv4_kv_pages_cached", "KV pool pages only prefix-cache checkpoints hold",
                                  ["pool"], registry=r)
        self.pages_free = Gauge("dsv4_kv_pages_free", "KV pool pages free", ["pool"], registry=r)
        self.cache_checkpoints = Gauge("dsv4_prefix_cache_checkpoints", "Prefix-cache checkpoints held", registry=r)
        self.cache_tokens = Gauge("dsv4_prefix_cache_tokens", "Tokens in the prefix cache's tree", registry=r)
        self.cache_bytes = Gauge("dsv4_prefix_cache_bytes", "KV bytes only the prefix cache holds", registry=r)
        self.cache_hit_rate = Gauge("dsv4_prefix_cache_hit_rate", "Prompt tokens resumed from the prefix cache, "
                                    "out of all prompt tokens, since start", registry=r)
        self.cache_counters = {
            key: Counter(f"dsv4_prefix_cache_{key}", text, registry=r)
            for key, text in (("prompt_tokens", "Prompt tokens of requests looked up in the prefix cache"),
                              ("hit_tokens", "Prompt tokens resumed from the prefix cache"),
                              ("evictions", "Prefix-cache checkpoints evicted"))
        }
        self._cache_seen: dict[str, float] = {}
        self.aborted = Counter("dsv4_requests_aborted", "Requests aborted (client gone, shutdown)", registry=r)
        self.routed_tokens = Counter("dsv4_moe_routed_tokens", "Tokens routed to each expert of each MoE layer",
                                     ["layer", "expert"], registry=r)
        self._routed_seen: dict[tuple[int, int], int] = {}
        # speculative decoding
        self.spec_counters = {
            key: Counter(f"dsv4_spec_{key}", text, registry=r)
            for key, text in (("steps", "Verifying steps (a speculating sequence in a step)"),
                              ("draft_tokens", "Draft tokens verified"),
                              ("accepted_tokens", "Draft tokens accepted"))
        }
        self.spec_accept_length = Gauge("dsv4_spec_accept_length", "Tokens per verifying step since start "
                                        "(accepted drafts + the sampled one)", registry=r)
        self.spec_position = Counter("dsv4_spec_position_drafts", "Drafts at each position (1 = first after "
                                     "the last token), verified and accepted", ["position", "outcome"], registry=r)
        self.spec_request_accept_length = Histogram(
            "dsv4_spec_request_accept_length", "Accept length of each finished speculating request",
            buckets=(1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0), registry=r)
        self._spec_seen: dict[str, float] = {}

    def update_engine(self, snapshot: Mapping[str, object]) -> None:
        """Set the gauges from an engine snapshot (see ``dsv4.serve.app``)."""
        self.running.set(float(snapshot["running"]))  # type: ignore[arg-type]
        self.waiting.set(float(snapshot["waiting"]))  # type: ignore[arg-type]
        pages = snapshot["pages"]
        assert isinstance(pages, dict)
        for pool, (used, cached, free) in pages.items():
            self.pages_used.labels(pool).set(used)
            self.pages_cached.labels(pool).set(cached)
            self.pages_free.labels(pool).set(free)
        cache = snapshot.get("prefix_cache", {})
        assert isinstance(cache, dict)
        if cache:
            self.cache_checkpoints.set(cache["checkpoints"])
            self.cache_tokens.set(cache["cached_tokens"])
            self.cache_bytes.set(cache["bytes"])
            self.cache_hit_rate.set(cache["hit_rate"])
            for key, counter in self.cache_counters.items():  # engine totals -> increments
                counter.inc(max(cache[key] - self._cache_seen.get(key, 0.0), 0.0))
                self._cache_seen[key] = max(cache[key], self._cache_seen.get(key, 0.0))
        load = snapshot.get("expert_load", {})
        assert isinstance(load, dict)
        for layer, counts in load.items():  # the engine's totals since start -> counter increments
            for expert, total in enumerate(counts):  # every expert has a series: an idle one shows 0
                new = total - self._routed_seen.get((layer, expert), 0)
                self.routed_tokens.labels(str(layer), str(expert)).inc(max(new, 0))
                self._routed_seen[layer, expert] = max(total, self._routed_seen.get((layer, expert), 0))

        spec = snapshot.get("spec", {})
        assert isinstance(spec, dict)
        if spec.get("enabled"):
            self.spec_accept_length.set(spec["accept_length"])
            for key, counter in self.spec_counters.items():
                counter.inc(self._spec_increment(key, spec[key]))
            for outcome in ("verified", "accepted"):
                for j, total in enumerate(spec[f"position_{outcome}"]):
                    new = self._spec_increment(f"{outcome}/{j + 1}", total)
                    self.spec_position.labels(str(j + 1), outcome).inc(new)

    def _spec_increment(self, key: str, total: float) -> float:
        """An engine total since start -> the increment since the last snapshot."""
        seen = self._spec_seen.get(key, 0.0)
        self._spec_seen[key] = max(float(total), seen)
        return max(float(total) - seen, 0.0)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class RequestTimer:
    """Feeds TTFT, inter-token and end-to-end latency of one request into the histograms."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: float | None = None
        self.tokens = 0

    def tokens_out(self, total: int) -> None:
        """The request now has ``total`` output tokens (all sequences)."""
        new = total - self.tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            gap = (now - self.last) / new
            for _ in range(new):
                self.metrics.itl.observe(gap)
        self.last, self.tokens = now, total
        self.metrics.generation_tokens.inc(new)

    def done(self, prompt_tokens: int, spec_accept_length: float | None = None) -> None:
        """The request finished (``spec_accept_length``: its accept length, if it speculated)."""
        self.metrics.e2e.observe(time.monotonic() - self.start)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        if spec_accept_length is not None:
            self.metrics.spec_request_accept_length.observe(spec_accept_length)

"""The prefix cache through the server: a conversation resent each turn is served from it, ``usage``
says how much, ``/metrics`` counts it, ``POST /flush_cache`` empties it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx


def test_a_resent_conversation_hits_the_cache(launch_server: Callable[..., AbstractContextManager[Any]],
                                              metric_value: Callable[[str, str], float]) -> None:
    with launch_server(api_key="k") as srv, httpx.Client(base_url=srv.url, timeout=30,
                                                         headers={"Authorization": "Bearer k"}) as c:
        messages = [{"role": "system", "content": "You are a terse assistant who answers in one line. " * 2},
                    {"role": "user", "content": "Name a prime number."}]
        body = {"model": "tiny-dsv4", "messages": messages, "max_tokens": 5, "temperature": 0}
        first = c.post("/v1/chat/completions", json=body).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"] or "ok"},
                     {"role": "user", "content": "Another one?"}]
        second = c.post("/v1/chat/completions", json=body).json()
        # at least the first turn's prompt (checkpointed at its last token) comes from the cache
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert first["usage"]["prompt_tokens"] - 1 <= cached < second["usage"]["prompt_tokens"]
        text = c.get("/metrics").text
        assert metric_value(text, "dsv4_prefix_cache_hit_tokens_total") == cached
        assert metric_value(text, "dsv4_prefix_cache_checkpoints") > 0
        assert metric_value(text, "dsv4_kv_pages_cached") > 0 and metric_value(text, "dsv4_kv_pages_used") == 0
        assert c.post("/flush_cache", headers={"Authorization": "Bearer wrong"}).status_code == 401
        flushed = c.post("/flush_cache").json()["flushed_checkpoints"]
        assert flushed == metric_value(text, "dsv4_prefix_cache_checkpoints")
        text = c.get("/metrics").text
        assert metric_value(text, "dsv4_prefix_cache_checkpoints") == 0
        assert metric_value(text, "dsv4_kv_pages_cached") == 0
        assert metric_value(text, "dsv4_prefix_cache_evictions_total") == flushed
        third = c.post("/v1/chat/completions", json=body).json()
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert third["choices"][0]["message"] == second["choices"][0]["message"]


def test_the_cache_off(launch_server: Callable[..., AbstractContextManager[Any]]) -> None:
    with launch_server(prefix_cache=False) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        body = {"prompt": "the same prompt, twice over, long enough to cache", "max_tokens": 2}
        for _ in range(2):
            usage = c.post("/v1/completions", json=body).json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert c.post("/flush_cache").json() == {"flushed_checkpoints": 0}

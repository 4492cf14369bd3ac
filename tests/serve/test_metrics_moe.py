"""``/metrics`` counts the tokens routed to each expert of each MoE layer (what expert placement reads)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx


def test_routed_tokens_per_layer_and_expert(launch_server: Callable[..., AbstractContextManager[Any]],
                                            metric_value: Callable[[str, str], float]) -> None:
    with launch_server() as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        before = metric_value(c.get("/metrics").text, "dsv4_moe_routed_tokens_total")
        r = c.post("/v1/completions", json={"prompt": "count my experts", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        text = c.get("/metrics").text
        load = srv.on_engine(lambda engine: engine.expert_load())
        config = srv.on_engine(lambda engine: engine.model.config)
        assert sorted(load) == list(range(config.num_hidden_layers))  # the engine does not run MTP blocks
        routed = sum(sum(counts) for counts in load.values())
        assert routed > 0 and routed % config.num_experts_per_tok == 0
        assert metric_value(text, "dsv4_moe_routed_tokens_total") - before == routed
        for layer, counts in load.items():
            for expert, n in enumerate(counts):
                line = f'dsv4_moe_routed_tokens_total{{expert="{expert}",layer="{layer}"}} {float(n)}'
                assert line in text, line

"""The whole model and the engine through the plugin, on a tiny random checkpoint (under the interpreter)."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4 import ForwardBatch
from dsv4.core.config import ModelConfig
from dsv4.core.interfaces import RoutingTrace
from dsv4.model import Transformer
from dsv4.testing.models import greedy_reference, random_model
from dsv4_triton.attention import TritonAttentionBackend
from dsv4_triton.experts import TritonExpertExecutor
from dsv4_triton.kernel_set import TritonKernels

CFG = ModelConfig.tiny()
FQ_CFG = ModelConfig.tiny(head_dim=144, qk_rope_head_dim=16, index_head_dim=32)  # dims fake quantisation takes
PROMPTS = [[3, 4, 5, 6], [7, 1, 9, 30, 2, 2, 41, 5, 9]]


def _all_triton(cfg: ModelConfig, *, fake_quant: bool = False) -> Transformer:
    """A random model (seed 0) running every step of inference on the plugin's three classes."""
    model = random_model(cfg, seed=0, fake_quant=fake_quant)
    model.kernels.inference = TritonKernels(cfg, "cpu", "inference")
    model.attn_backend, model.expert_executor = TritonAttentionBackend(cfg), TritonExpertExecutor(cfg)
    return model


@pytest.mark.parametrize("plugins", ["kernels", "all"])
def test_logits_match_the_reference(plugins: str) -> None:
    ref = random_model(CFG, seed=0)
    if plugins == "all":
        model = _all_triton(CFG)
    else:
        model = random_model(CFG, seed=0)
        model.kernels.inference = TritonKernels(CFG, "cpu", "inference")
    ids = torch.randint(0, CFG.vocab_size, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids) - ref(ids)).abs().max().item() <= 1e-4


def test_short_and_fake_quantised_sequences_match_the_reference() -> None:
    # 3 tokens: no compressed entry anywhere yet; fake quantisation: compression keeps the reference's arithmetic
    for cfg, fake_quant, length in ((CFG, False, 3), (FQ_CFG, True, 13)):
        model, ref = _all_triton(cfg, fake_quant=fake_quant), random_model(cfg, seed=0, fake_quant=fake_quant)
        ids = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert (model(ids) - ref(ids)).abs().max().item() <= 1e-4


def test_routing_is_recorded_and_replayed_as_the_reference_does() -> None:
    model, ref = _all_triton(CFG), random_model(CFG, seed=0)
    ids = torch.randint(0, CFG.vocab_size, (2, 19), generator=torch.Generator().manual_seed(7))
    batch = ForwardBatch.from_requests(list(ids), sample="all")
    got, want = RoutingTrace(), RoutingTrace()
    with torch.no_grad():
        model.run(batch, routing=got)
        ref.run(batch, routing=want)
    assert want.experts and want.indexer
    for recorded in ("experts", "indexer"):
        for layer, picks in getattr(want, recorded).items():
            assert torch.equal(getattr(got, recorded)[layer], picks), f"{recorded} of layer {layer}"
    # Replay other experts (each row's shifted by one) and the reference's indexer picks: both follow them.
    imposed = {layer: (picks + 1) % CFG.n_routed_experts for layer, picks in want.experts.items()}
    replays = [RoutingTrace(replay=True, experts=imposed, indexer=want.indexer) for _ in range(2)]
    with torch.no_grad():
        out, expected = model.run(batch, routing=replays[0]).logits, ref.run(batch, routing=replays[1]).logits
    assert (out - expected).abs().max().item() <= 1e-4
    for layer, picks in imposed.items():
        assert torch.equal(replays[0].applied_experts[layer], picks)


@pytest.mark.parametrize("plugins", [{"kernels": "triton"},
                                     {"kernels": "triton", "attention_backend": "triton", "expert_executor": "triton"}],
                         ids=["kernels", "all"])
def test_engine_greedy_tokens_match_the_reference(plugins: dict[str, str]) -> None:
    # max_num_batched_tokens=5: prefill in chunks, cut inside compression blocks, beside decode tokens
    engine = dsv4.Engine(random_model(CFG, seed=0), max_num_batched_tokens=5, page_size=4, **plugins)
    choice = engine.model.plugins
    assert choice.kernels["inference"] == "triton"
    assert (choice.attention_backend, choice.expert_executor) == (plugins.get("attention_backend", "cpu"),
                                                                  plugins.get("expert_executor", "cpu"))
    outs = engine.generate(PROMPTS, dsv4.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    ref = random_model(CFG, seed=0)
    assert [o.outputs[0].token_ids for o in outs] == [greedy_reference(ref, p, 6) for p in PROMPTS]

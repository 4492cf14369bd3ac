"""MoE load balancing while training: the bias update, the sequence-wise balance loss, load metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv4.core.config import ModelConfig
from dsv4.kernels import ReferenceKernels
from dsv4.model import build_model
from dsv4.model.moe import seq_balance_loss
from dsv4.rl.balance import ExpertBalancer, load_metrics
from dsv4.rl.monitor import plot_expert_load
from dsv4.rl.sft import SFTConfig, SFTTrainer
from dsv4.rl.state import capture_rng, load_training_state, restore_rng, save_training_state
from dsv4.rl.tasks import ALPHABET, AdditionTask, Problem
from dsv4.testing.tokenizers import write_char_tokenizer

# layer 0 hash-routed (no bias), layer 1 learned routing; 4 experts, top 2
TINY = dict(vocab_size=16, hidden_size=32, num_hidden_layers=2, head_dim=32, qk_rope_head_dim=16,
            moe_intermediate_size=32, layer_types=["sliding_attention"] * 2, mlp_layer_types=["hash_moe", "moe"],
            n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=32, num_nextn_predict_layers=0)


def _model(seed: int = 0):  # type: ignore[no-untyped-def]
    model = build_model(ModelConfig.tiny(**TINY), seed=seed)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    return model


def test_bias_update_sign_and_size_on_hand_made_counts() -> None:
    model = _model()
    gate = model.layers[1].ffn.gate
    balancer = ExpertBalancer(model, speed=0.001)
    balancer.observe({0: torch.tensor([9, 1, 1, 1]), 1: torch.tensor([10, 2, 6, 6])})  # layer 1 mean 6
    balancer.observe({1: torch.tensor([0, 2, 2, 4])})  # a second forward of the step adds up: [10, 4, 8, 10]
    metrics = balancer.step()
    assert gate.bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, -0.001])  # mean 8: over, under, even, over
    assert model.layers[0].ffn.gate.bias is None  # hash routing: nothing to move
    assert metrics["moe/layer1/load_max_over_mean"] == pytest.approx(10 / 8)
    assert metrics["moe/layer0/load_max_over_mean"] == pytest.approx(9 / 3)
    assert metrics["moe/load_max_over_mean"] == pytest.approx((10 / 8 + 3) / 2)
    assert metrics["moe/dead_expert_share"] == 0.0
    assert metrics["moe/load"] == {"0": [9, 1, 1, 1], "1": [10, 4, 8, 10]}
    assert balancer.step() == {}  # a new step starts from no load (and moves nothing)
    assert gate.bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, -0.001])
    frozen = ExpertBalancer(model, speed=0.0)
    frozen.observe({1: torch.tensor([10, 0, 0, 0])})
    assert frozen.step()["moe/dead_expert_share"] == 0.75
    assert gate.bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, -0.001])  # speed 0: frozen
    with pytest.raises(ValueError, match="bias_update_speed"):
        ExpertBalancer(model, speed=-1.0)


def test_the_bias_selects_but_never_weighs() -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(9, 32, generator=g), torch.randn(4, 32, generator=g)
    k = ReferenceKernels(mode="autograd")
    for func in ("sqrtsoftplus", "sigmoid", "softmax"):
        kw = {"score_func": func, "top_k": 2, "route_scale": 1.5}
        w0, i0 = k.route(x, weight, torch.zeros(4), None, **kw)
        push = torch.tensor([5.0, -5.0, -5.0, 5.0])  # large enough to force experts 0 and 3
        w1, i1 = k.route(x, weight, push, None, **kw)
        assert sorted(i1[0].tolist()) == [0, 3]
        scores = k.router_scores(x, weight, func)
        want = scores.gather(1, i1)
        if func != "softmax":
            want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(w1, want * 1.5)  # from the scores, not scores + bias
        same, _ = k.route(x, weight, push, i0, **kw)  # the same experts imposed: the same weights
        torch.testing.assert_close(same, w0)


def test_seq_balance_loss_equals_the_v3_formula() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(7, 4, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    want = []
    for r in (0, 1):
        rows = (seq == r).nonzero().flatten().tolist()
        t = len(rows)
        total = 0.0
        for i in range(4):
            f = 4 / (2 * t) * sum(int(i in idx[row].tolist()) for row in rows)
            p = sum(float(scores[row, i] / scores[row].sum()) for row in rows) / t
            total += f * p
        want.append(total)
    assert float(seq_balance_loss(scores, idx, seq)) == pytest.approx(sum(want) / 2, rel=1e-6)
    even = torch.full((4, 4), 0.25)
    spread = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(seq_balance_loss(even, spread, torch.zeros(4, dtype=torch.long))) == pytest.approx(1.0)


def test_the_model_reports_load_and_the_balance_loss_has_gradients() -> None:
    model = _model()
    ids = torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(2))
    from dsv4.core.batch import ForwardBatch

    out = model.run(ForwardBatch.dense(ids), balance_loss=True)
    assert sorted(out.expert_load) == [0, 1] and all(int(c.sum()) == 27 * 2 for c in out.expert_load.values())
    loss = out.aux_losses["seq_balance"]
    loss.backward()
    assert model.layers[1].ffn.gate.weight.grad is not None and model.layers[1].ffn.gate.weight.grad.abs().sum() > 0
    assert "seq_balance" not in model.run(ForwardBatch.dense(ids)).aux_losses


def _skewed(n: int, salt: int) -> list[Problem]:
    """Additions whose digits are all 1s and 2s: a narrow input distribution that crowds the router."""
    task = AdditionTask(2, seed=salt)
    out = []
    for p in task.sample(4 * n, "train"):
        if set(p.prompt) <= set("12+="):
            out.append(p)
    pad = [Problem(prompt="11+12=", reference={"answer": "23"}), Problem(prompt="21+2=", reference={"answer": "23"})]
    return (out + pad * n)[:n]


def _sft(tmp_path: Path, speed: float, **extra: object) -> SFTTrainer:
    torch.manual_seed(0)
    tokenizer = write_char_tokenizer(tmp_path, ALPHABET)
    cfg = SFTConfig(batch_size=16, lr=3e-3, bias_update_speed=speed, indexer_coef=0, **extra)  # type: ignore[arg-type]
    return SFTTrainer(_model(), tokenizer, _skewed, cfg)


def test_sft_on_skewed_data_ends_more_balanced_with_the_update(tmp_path: Path) -> None:
    ends = {}
    for speed in (0.0, 0.01):
        trainer = _sft(tmp_path, speed)
        history = [float(trainer.step(s)["moe/layer1/load_max_over_mean"]) for s in range(60)]  # type: ignore[arg-type]
        ends[speed] = sum(history[-10:]) / 10
    print(f"layer-1 max/mean load over the last 10 of 60 SFT steps: frozen {ends[0.0]:.3f}, updated {ends[0.01]:.3f}")
    assert ends[0.01] < ends[0.0]


def test_resume_is_bit_exact_with_the_bias_in_the_checkpoint(tmp_path: Path) -> None:
    straight = _sft(tmp_path / "a", 0.01, seq_balance_loss_coef=0.01)
    for s in range(6):
        straight.step(s)
    first = _sft(tmp_path / "b", 0.01, seq_balance_loss_coef=0.01)
    for s in range(3):
        first.step(s)
    assert first.policy.layers[1].ffn.gate.bias.abs().sum() > 0
    save_training_state(tmp_path / "ckpt", model=first.policy, optimizer=first.optimizer, step=3,
                        rng=capture_rng())
    resumed = _sft(tmp_path / "c", 0.01, seq_balance_loss_coef=0.01)
    state = load_training_state(tmp_path / "ckpt", model=resumed.policy, optimizer=resumed.optimizer)
    restore_rng(state.rng)
    for s in range(3, 6):
        resumed.step(s)
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_sft_metrics_and_the_heatmap(tmp_path: Path) -> None:
    from dsv4.rl.monitor import MetricsLog

    trainer = _sft(tmp_path, 0.001)
    with MetricsLog(tmp_path / "sft_metrics.jsonl") as log:
        for s in range(3):
            log.log(s + 1, trainer.step(s))
    record = json.loads((tmp_path / "sft_metrics.jsonl").read_text().splitlines()[-1])
    assert {"moe/load_max_over_mean", "moe/dead_expert_share", "moe/layer1/load_max_over_mean"} <= set(record)
    assert sum(record["moe/load"]["1"]) > 0
    png = plot_expert_load(tmp_path / "sft_metrics.jsonl", tmp_path / "sft_expert_load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_metrics({}) == {}

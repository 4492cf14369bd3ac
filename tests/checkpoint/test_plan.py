"""``dsv4 inspect`` / ``plan_deployment``: a deployment planned from config.json alone."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dsv4
from dsv4.checkpoint.plan import plan_deployment
from dsv4.checkpoint.quant import quant_fp4, quant_fp8_block
from dsv4.cli import main
from dsv4.core.config import ModelConfig
from dsv4.testing.models import random_model

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))
from test_config import FLASH, PRO  # noqa: E402  (the released configs, V4-Flash / V4-Pro)


def _config_file(tmp_path: Path, config: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def flash(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return plan_deployment(_config_file(tmp_path_factory.mktemp("flash"), FLASH), ep=8, context=65536, batch=4)


def test_flash_matches_what_deepseek_published(flash) -> None:  # type: ignore[no-untyped-def]
    # DeepSeek-V4-Flash: 284B parameters, 13B active; released as ~160 GB (FP8 linears, FP4 routed experts)
    assert (flash.parameters - flash.mtp_parameters) / 1e9 == pytest.approx(284, rel=0.005)
    assert 13e9 <= flash.active_parameters <= 14.5e9
    assert 150e9 <= flash.weight_bytes <= 165e9
    assert list(flash.bytes_by_dtype())[:2] == ["fp4_e2m1", "uint8"]  # the experts and their ue8m0 scales
    assert not flash.exact
    assert flash.weight_bytes_per_device() < flash.weight_bytes / 4  # ep=8 splits the experts
    assert "284.33 B without the MTP block" in flash.report()


@pytest.mark.slow
def test_pro_matches_what_deepseek_published(tmp_path: Path) -> None:
    pro = plan_deployment(_config_file(tmp_path, PRO), ep=8)
    # DeepSeek-V4-Pro: 1.6T parameters, 49B active (rounded)
    assert (pro.parameters - pro.mtp_parameters) / 1e12 == pytest.approx(1.6, abs=0.05)
    assert 48.5e9 <= pro.active_parameters <= 51e9


def test_stored_bytes_are_exact_from_the_safetensors_headers(tmp_path: Path) -> None:
    model = random_model(ModelConfig.tiny(), seed=0)
    dsv4.save_model(model, tmp_path / "fp32")
    plan = plan_deployment(tmp_path / "fp32", dtype="float32")
    data = tmp_path / "fp32" / "model.safetensors"
    header = struct.unpack("<Q", data.read_bytes()[:8])[0]
    assert plan.exact and plan.weight_bytes == data.stat().st_size - 8 - header
    assert plan.parameters == sum(t.numel() for t in model.state_dict().values())
    dense = plan_deployment(tmp_path / "fp32", weights="dequantized", dtype="bfloat16")
    assert not dense.exact and dense.bytes_by_dtype() == {"bfloat16": plan.parameters * 2}


def test_a_quantised_checkpoint_is_read_as_stored(tmp_path: Path) -> None:
    cfg = ModelConfig.tiny(hidden_size=128, moe_intermediate_size=64, q_lora_rank=128)
    model = random_model(cfg, seed=0)
    stored: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        official = name
        if ".experts." in name and name.endswith(".weight"):
            stored[official], stored[official[:-6] + "scale"] = quant_fp4(t)
        elif ".attn.wq_b" in name:
            stored[official], stored[official[:-6] + "scale"] = quant_fp8_block(t, scale_fmt="ue8m0")
        else:
            stored[official] = t.contiguous()
    (tmp_path / "q").mkdir()
    save_file(stored, tmp_path / "q" / "model.safetensors")
    config = cfg.to_official_dict() | {"expert_dtype": "fp4", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    plan = plan_deployment(tmp_path / "q", dtype="float32")
    assert plan.exact
    by = plan.bytes_by_dtype()
    experts = sum(t.numel() for n, t in model.state_dict().items() if ".experts." in n)
    assert by["fp4_e2m1"] == experts / 2
    assert by["float8_e4m3fn"] == sum(t.numel() for n, t in model.state_dict().items() if ".attn.wq_b" in n)
    assert plan.parameters == sum(t.numel() for t in model.state_dict().values())  # FP4 counts its values


def test_kv_bytes_per_token_equal_the_engines_pool(tmp_path: Path) -> None:
    dsv4.save_model(random_model(ModelConfig.tiny(), seed=0), tmp_path)
    for context in (8, 37, 96):  # inside the window, past the window and past compression blocks
        plan = plan_deployment(tmp_path, kv_dtype="float32", context=context)
        engine = dsv4.Engine(tmp_path, page_size=1, max_model_len=context + 4, max_num_seqs=1)
        engine.add_request(list(range(3, 3 + context)), dsv4.SamplingParams(max_tokens=2, ignore_eos=True))
        engine.step()  # the prompt's prefill: the pool now holds what a request of `context` tokens keeps
        assert engine.kv_stats()["total"]["bytes"] == plan.kv_bytes_per_request, context


def test_bad_input_names_the_problem(tmp_path: Path) -> None:
    path = _config_file(tmp_path, json.loads(json.dumps(FLASH)))
    with pytest.raises(ValueError, match="ep=3 does not divide n_routed_experts=256"):
        plan_deployment(path, ep=3)
    with pytest.raises(ValueError, match="tp=3 does not divide num_attention_heads=64"):
        plan_deployment(path, tp=3)
    with pytest.raises(ValueError, match="unknown weights format 'fp2'; valid: stored, fp8, int8, dequantized"):
        plan_deployment(path, weights="fp2")
    with pytest.raises(ValueError, match="no such file"):
        plan_deployment(tmp_path / "nowhere")


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dsv4.save_model(random_model(ModelConfig.tiny(), seed=0), tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--json", "--context", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exact"] and out["weight_bytes"] > 0 and out["kv_bytes_per_token"] > 0
    assert main(["inspect", "--model", str(tmp_path / "config.json"), "--weights", "fp8", "--ep", "2"]) == 0
    assert "float8_e4m3fn" in capsys.readouterr().out
    assert main(["inspect", "--model", str(tmp_path), "--ep", "3"]) == 2
    assert "ep=3 does not divide" in capsys.readouterr().err

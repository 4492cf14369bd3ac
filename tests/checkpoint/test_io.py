"""Checkpoint reading/writing against transformers' DeepseekV4ForCausalLM as the independent oracle."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.checkpoint import io
from dsv4.checkpoint.io import CheckpointError, check_tensors, read_checkpoint, save_checkpoint
from dsv4.checkpoint.quant import quant_fp4, quant_fp8_block
from dsv4.core.config import ModelConfig
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
               "compressed_sparse_attention"]
N_EXPERTS, N_HASH = 4, 3  # transformers' default: the first 3 layers are hash-routed


def official_names() -> set[str]:
    """The spec §8 tensor list for the tiny model below, written out independently of the code."""
    names = {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"}
    for layer, kind in enumerate(LAYER_TYPES):
        p = f"layers.{layer}"
        names |= {f"{p}.attn_norm.weight", f"{p}.ffn_norm.weight"}
        names |= {f"{p}.hc_{s}_{t}" for s in ("attn", "ffn") for t in ("fn", "base", "scale")}
        names |= {f"{p}.attn.attn_sink"} | {f"{p}.attn.{m}.weight" for m in
                                             ("wq_a", "q_norm", "wq_b", "wkv", "kv_norm", "wo_a", "wo_b")}
        compressor = {f"compressor.{m}.weight" for m in ("wkv", "wgate", "norm")} | {"compressor.ape"}
        if kind != "sliding_attention":
            names |= {f"{p}.attn.{c}" for c in compressor}
        if kind == "compressed_sparse_attention":
            names |= {f"{p}.attn.indexer.{c}" for c in compressor}
            names |= {f"{p}.attn.indexer.wq_b.weight", f"{p}.attn.indexer.weights_proj.weight"}
        names |= {f"{p}.ffn.gate.weight", f"{p}.ffn.gate.tid2eid" if layer < N_HASH else f"{p}.ffn.gate.bias"}
        names |= {f"{p}.ffn.experts.{e}.w{i}.weight" for e in range(N_EXPERTS) for i in (1, 2, 3)}
        names |= {f"{p}.ffn.shared_experts.w{i}.weight" for i in (1, 2, 3)}
    return names


def tiny_hf_model() -> DeepseekV4ForCausalLM:
    cfg = DeepseekV4Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, layer_types=LAYER_TYPES,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        num_attention_heads=4, head_dim=16, partial_rotary_factor=0.5, q_lora_rank=16, o_groups=2, o_lora_rank=8,
        index_n_heads=16, index_head_dim=8, index_topk=2, sliding_window=8, n_routed_experts=N_EXPERTS,
        num_experts_per_tok=2, moe_intermediate_size=32,  # FP4 needs in % 32 == 0
    )
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():  # every saved parameter and buffer
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(N_EXPERTS, generator=g)[:2] for _ in range(t.shape[0])]))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    tiny_hf_model().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path) -> DeepseekV4ForCausalLM:
    return DeepseekV4ForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(hf_dir)


def logits(model: DeepseekV4ForCausalLM) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out: torch.Tensor = model(ids).logits
    assert torch.isfinite(out).all()
    return out


def load_hf(path: Path) -> DeepseekV4ForCausalLM:
    model, info = DeepseekV4ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_read_transformers_layout_gives_official_names(tensors: dict[str, torch.Tensor],
                                                       hf_model: DeepseekV4ForCausalLM) -> None:
    assert set(tensors) == official_names()
    hf = hf_model.state_dict()
    assert torch.equal(tensors["embed.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(tensors["head.weight"], hf["lm_head.weight"])
    assert torch.equal(tensors["hc_head_fn"], hf["model.hc_head.hc_fn"])
    assert torch.equal(tensors["layers.1.attn.kv_norm.weight"], hf["model.layers.1.self_attn.kv_norm.weight"])
    assert torch.equal(tensors["layers.1.attn.compressor.norm.weight"],
                       hf["model.layers.1.self_attn.compressor.kv_norm.weight"])
    gate_up = hf["model.layers.2.mlp.experts.gate_up_proj"]  # [E, 2 * inter, D]: w1 rows then w3 rows
    assert torch.equal(tensors["layers.2.ffn.experts.3.w1.weight"], gate_up[3, :32])
    assert torch.equal(tensors["layers.2.ffn.experts.3.w3.weight"], gate_up[3, 32:])
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert torch.equal(tensors["layers.0.ffn.gate.tid2eid"], hf["model.layers.0.mlp.gate.tid2eid"])
    assert all(t.dtype == torch.float32 for n, t in tensors.items() if not n.endswith("tid2eid"))


def test_save_transformers_layout_loads_bit_identical(tmp_path: Path, hf_dir: Path, tensors: dict[str, torch.Tensor],
                                                      hf_model: DeepseekV4ForCausalLM) -> None:
    mtp = {"mtp.0.e_proj.weight": torch.randn(32, 32), "mtp.0.attn.kv_norm.weight": torch.randn(16)}
    save_checkpoint(tensors | mtp, ModelConfig.from_pretrained(hf_dir), tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert {"head.weight", "model.embed_tokens.weight", "model.hc_head.hc_base", "model.layers.3.attn.norm.weight",
            "model.layers.3.attn.compressor.norm.weight", "mtp.0.e_proj.weight"} <= stored
    assert torch.equal(logits(load_hf(tmp_path / "ckpt")), logits(hf_model))
    assert_same(read_checkpoint(tmp_path / "ckpt"), tensors | mtp)


def test_sharded_save_round_trips(tmp_path: Path, hf_dir: Path, tensors: dict[str, torch.Tensor],
                                  hf_model: DeepseekV4ForCausalLM) -> None:
    save_checkpoint(tensors, ModelConfig.from_pretrained(hf_dir), tmp_path, max_shard_bytes=16_384)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "model.safetensors").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    for shard in tmp_path.glob("*.safetensors"):  # readable like any file the user writes, not 0600
        assert shard.stat().st_mode & 0o777 == 0o666 & ~umask
    assert_same(read_checkpoint(tmp_path), tensors)
    assert torch.equal(logits(load_hf(tmp_path)), logits(hf_model))


def test_official_layout_with_and_without_prefix(tmp_path: Path, hf_dir: Path,
                                                 tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tensors, ModelConfig.from_pretrained(hf_dir), tmp_path / "plain", layout="official")
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == official_names()
        prefixed = {f"model.{k}": f.get_tensor(k) for k in f.keys()}
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    assert_same(read_checkpoint(tmp_path / "plain"), tensors)
    assert_same(read_checkpoint(tmp_path / "prefixed.safetensors"), tensors)  # a single file works too


def _fp8_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantise the slow, obvious way: each element times its block's scale."""
    s = 2.0 ** (scale.view(torch.uint8).double() - 127) if scale.dtype != torch.float32 else scale.double()
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = float(q[i, j]) * s[i // 128, j // 128]
    return out.float()


def _fp4_reference(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    table = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    out = torch.empty(packed.shape[0], packed.shape[1] * 2)
    for i, row in enumerate(packed.view(torch.uint8).tolist()):
        for j, byte in enumerate(row):
            for k, code in enumerate((byte & 0xF, byte >> 4)):
                col = 2 * j + k
                out[i, col] = table[code] * 2.0 ** (int(scale[i, col // 32]) - 127)
    return out


def test_quantized_official_checkpoint(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    stored: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if any(name.endswith(f".attn.{m}.weight") for m in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")):
            q, s = quant_fp8_block(t)  # ue8m0 scales as uint8 bytes
            if name.startswith("layers.1."):
                s = s.view(torch.float8_e8m0fnu)  # the dtype DeepSeek's files use
            stored |= {name: q, name.removesuffix("weight") + "scale": s}
            want[name] = _fp8_reference(q, s)
        elif ".shared_experts." in name:
            q, s = quant_fp8_block(t, scale_fmt=None)  # float32 scales, as in Base checkpoints
            stored |= {name: q, name.removesuffix("weight") + "scale": s}
            want[name] = _fp8_reference(q, s)
        elif ".experts." in name:
            q, s = quant_fp4(t)
            stored |= {name: q, name.removesuffix("weight") + "scale": s}
            want[name] = _fp4_reference(q, s)
        else:
            stored[name] = t.bfloat16() if t.is_floating_point() else t.int()
            want[name] = stored[name].float() if t.is_floating_point() else t
    save_file(stored, str(tmp_path / "model.safetensors"))
    got = read_checkpoint(tmp_path)
    assert_same(got, want)
    assert set(got) == official_names()
    raw = read_checkpoint(tmp_path, keep_quantized=True)
    assert raw.keys() == stored.keys()
    assert raw["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(raw["layers.0.ffn.experts.1.w2.scale"], stored["layers.0.ffn.experts.1.w2.scale"])
    assert read_checkpoint(tmp_path, dtype=torch.bfloat16)["layers.0.ffn.experts.1.w2.weight"].dtype == torch.bfloat16


def test_check_tensors_lists_every_problem(tensors: dict[str, torch.Tensor],
                                           hf_model: DeepseekV4ForCausalLM) -> None:
    expected = {n: (t.shape, t.dtype) for n, t in tensors.items()}
    check_tensors(expected, tensors)
    check_tensors(tensors, tensors)  # a state_dict works as the expectation too
    broken = dict(tensors)
    del broken["norm.weight"], broken["layers.3.ffn.gate.bias"]
    broken["layers.1.attn.wq_a.weight"] = torch.zeros(3, 5)
    broken["layers.0.ffn.gate.tid2eid"] = torch.zeros(64, 2)
    broken["layers.9.attn.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        check_tensors(expected, broken)
    msg = str(e.value)
    for needle in ("2 missing", "norm.weight", "layers.3.ffn.gate.bias", "1 unexpected", "layers.9.attn.extra",
                   "layers.1.attn.wq_a.weight: expected shape (16, 32), found (3, 5)",
                   "layers.0.ffn.gate.tid2eid: expected dtype torch.int64, found torch.float32"):
        assert needle in msg


def test_read_errors_name_tensor_and_file(tmp_path: Path, hf_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    config = ModelConfig.from_pretrained(hf_dir)
    save_checkpoint(tensors, config, tmp_path / "sharded", max_shard_bytes=16_384, layout="official")
    index_file = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"]["norm.weight"]
    other = next(s for s in index["weight_map"].values() if s != shard)

    index["weight_map"]["norm.weight"] = other  # the index points at a shard that lacks the tensor
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"norm.weight.*{other}"):
        read_checkpoint(tmp_path / "sharded")
    (tmp_path / "sharded" / shard).unlink()  # the index names a shard file that is gone
    with pytest.raises(CheckpointError, match=f"{shard}.*should hold"):
        read_checkpoint(tmp_path / "sharded")

    q, s = quant_fp8_block(tensors["layers.0.attn.wq_a.weight"])
    save_file({"layers.0.attn.wq_a.weight": q, "layers.0.attn.wq_a.scale": s[:, :0]}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers.0.attn.wq_a.weight in .*a.safetensors.*shape \(1, 1\)"):
        read_checkpoint(tmp_path / "a.safetensors")
    save_file({"layers.0.attn.wq_b.scale": s}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="layers.0.attn.wq_b.scale in .*b.safetensors has no weight"):
        read_checkpoint(tmp_path / "b.safetensors")
    save_file({"layers.0.attn.wq_a.weight": q}, str(tmp_path / "c.safetensors"))
    with pytest.raises(CheckpointError, match="layers.0.attn.wq_a.weight in .*c.safetensors has no .scale"):
        read_checkpoint(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        read_checkpoint(tmp_path / "nowhere")


def test_save_handles_shared_storage_and_views(tmp_path: Path, hf_dir: Path) -> None:
    base = torch.randn(8, 6)
    views = {"layers.0.ffn.shared_experts.w1.weight": base[:4], "layers.0.ffn.shared_experts.w3.weight": base[4:],
             "layers.0.ffn.shared_experts.w2.weight": base.T, "layers.0.attn_norm.weight": base[0]}
    save_checkpoint(views, ModelConfig.from_pretrained(hf_dir), tmp_path, layout="official")
    assert_same(read_checkpoint(tmp_path), {k: v.contiguous() for k, v in views.items()})


def test_atomic_save_survives_a_crash(tmp_path: Path, hf_dir: Path, tensors: dict[str, torch.Tensor],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig.from_pretrained(hf_dir)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(tensors, config, ckpt, max_shard_bytes=16_384)
    (ckpt / "tokenizer.json").write_text('{"tok": 1}')
    (ckpt / "generation_config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    real_write = io._write_file
    calls: list[Path] = []

    def crash_after_first(shard: dict[str, torch.Tensor], file: Path) -> None:
        if calls:
            raise OSError("disk on fire")
        calls.append(file)
        real_write(shard, file)

    changed = {n: t + 1 if t.is_floating_point() else t for n, t in tensors.items()}
    monkeypatch.setattr(io, "_write_file", crash_after_first)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(changed, config, ckpt, max_shard_bytes=16_384)
    assert calls  # it did write a file before crashing
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    assert_same(read_checkpoint(ckpt), tensors)
    load_hf(ckpt)

    monkeypatch.setattr(io, "_write_file", real_write)
    save_checkpoint(changed, config, ckpt)  # now unsharded: the old shards must not linger
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                       "tokenizer.json"]
    assert (ckpt / "tokenizer.json").read_text() == '{"tok": 1}'
    assert_same(read_checkpoint(ckpt), changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

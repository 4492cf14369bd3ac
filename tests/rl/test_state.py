"""Training checkpoints: exact round trip, bit-identical resumed training, crash safety, retention, no pickle."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dsv4.checkpoint import io
from dsv4.checkpoint.io import CheckpointError
from dsv4.core.config import ModelConfig
from dsv4.model import load_model
from dsv4.rl import state as state_mod
from dsv4.rl.state import capture_rng, latest_step_dir, load_training_state, restore_rng, save_training_state
from dsv4.testing.models import random_model

ALLOWED_SUFFIXES = {".safetensors", ".json"}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # Dropout draws from torch's global RNG, so resuming must restore it to reproduce the losses.
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer, data: torch.Generator, steps: int) -> list[float]:
    """Steps drawing batches from ``data``, noise from python/numpy ``random`` and dropout from torch's."""
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=data)
        target = x.sum(1, keepdim=True) + random.random() + float(np.random.rand())
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # hyper-parameters, betas still a tuple
    assert sa["state"].keys() == sb["state"].keys()
    for idx, entry in sa["state"].items():
        assert entry.keys() == sb["state"][idx].keys()
        for name, value in entry.items():
            other = sb["state"][idx][name]
            assert value.dtype == other.dtype and torch.equal(value, other), (idx, name)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    data = seed_all(0)
    model = make_model(0)
    opt = make_optimizer(model)
    train(model, opt, data, 3)
    rng = capture_rng({"data": data})
    out = save_training_state(tmp_path, model=model, optimizer=opt, step=3, rng=rng,
                              extra={"config": {"lr": 1e-2}, "cursor": 24})
    assert out == tmp_path / "step-3" and (tmp_path / "latest").read_text().strip() == "step-3"
    umask = os.umask(0o022)
    os.umask(umask)
    for f in out.glob("*.safetensors"):  # readable like any file the user writes (safetensors makes 0600)
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
    expected_draws = (torch.rand(4), torch.randn(3, generator=data), random.random(), np.random.rand(2))

    fresh = make_model(1)
    fresh_opt = make_optimizer(fresh)
    fresh_opt.param_groups[0]["lr"] = 0.5  # must come back from the checkpoint
    other = seed_all(99)
    loaded = load_training_state(tmp_path, model=fresh, optimizer=fresh_opt)
    assert loaded.step == 3 and loaded.extra == {"config": {"lr": 1e-2}, "cursor": 24}
    assert loaded.path == tmp_path / "step-3"
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    assert_same_optimizer(opt, fresh_opt)
    steps = [s["step"] for s in fresh_opt.state_dict()["state"].values()]
    assert all(isinstance(s, torch.Tensor) and s.item() == 3 for s in steps)

    restore_rng(loaded.rng, {"data": other})
    draws = (torch.rand(4), torch.randn(3, generator=other), random.random(), np.random.rand(2))
    assert torch.equal(draws[0], expected_draws[0]) and torch.equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2] and np.array_equal(draws[3], expected_draws[3])


def test_resumed_training_is_bit_identical(tmp_path: Path) -> None:
    k = 5
    data = seed_all(0)
    uninterrupted_model = make_model(0)
    uninterrupted = train(uninterrupted_model, make_optimizer(uninterrupted_model), data, 3 + k)

    data = seed_all(0)
    model = make_model(0)
    opt = make_optimizer(model)
    first = train(model, opt, data, 3)
    save_training_state(tmp_path, model=model, optimizer=opt, step=3, rng=capture_rng({"data": data}))
    continued = train(model, opt, data, k)  # saving must not disturb the run it checkpoints
    assert first + continued == uninterrupted

    seed_all(123)  # a new process: different RNG, different initial weights
    data = torch.Generator()
    resumed_model = make_model(7)
    resumed_opt = make_optimizer(resumed_model)
    state = load_training_state(tmp_path, model=resumed_model, optimizer=resumed_opt)
    restore_rng(state.rng, {"data": data})
    resumed = train(resumed_model, resumed_opt, data, k)
    assert resumed == uninterrupted[3:]  # float equality: bit-identical
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_dsv4_model_checkpoint_is_a_loadable_model(tmp_path: Path) -> None:
    config = ModelConfig.tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = random_model(config, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():  # one optimizer step from synthetic gradients: no forward needed
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "tokenizer.json").write_text('{"version": "1.0"}')
    (assets / "tokenizer_config.json").write_text("{}")
    (assets / "config.json").write_text('{"not": "the model config"}')  # must not replace the real one

    step_dir = save_training_state(tmp_path / "ckpt", model=model, optimizer=opt, step=1, rng=capture_rng(),
                                   assets_dir=assets)
    assert (step_dir / "tokenizer.json").read_text() == '{"version": "1.0"}'
    reloaded = load_model(step_dir)
    for name, t in model.state_dict().items():
        assert torch.equal(t, reloaded.state_dict()[name]), name

    fresh = random_model(config, seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_training_state(tmp_path / "ckpt", model=fresh, optimizer=fresh_opt)
    for name, t in model.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[name]), name
    assert_same_optimizer(opt, fresh_opt)


def saved(tmp_path: Path, step: int, keep: int = 2, tag: str = "") -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model(step)
    opt = make_optimizer(model)
    train(model, opt, seed_all(step), 1)
    save_training_state(tmp_path, model=model, optimizer=opt, step=step, rng=capture_rng(),
                        extra={"tag": tag or f"s{step}"}, keep=keep)
    return model, opt


def load_any(path: Path, step: int | None = None) -> state_mod.TrainingState:
    model = make_model(0)
    return load_training_state(path, model=model, optimizer=make_optimizer(model), step=step)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved(tmp_path, 1)
    real = state_mod._write_safetensors

    def crash_at_optimizer(tensors: dict[str, torch.Tensor], file: Path) -> None:
        if file.name == "optimizer.safetensors":  # the model file is already written by now
            raise OSError("disk full")
        real(tensors, file)

    monkeypatch.setattr(state_mod, "_write_safetensors", crash_at_optimizer)
    with pytest.raises(OSError, match="disk full"):
        saved(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]  # no temporaries left
    assert latest_step_dir(tmp_path) == tmp_path / "step-1"
    assert load_any(tmp_path).extra == {"tag": "s1"}
    monkeypatch.undo()

    # A crash after the new directory is in place but before `latest` moves: latest still names step-1.
    def killed(root: Path, name: str) -> None:
        raise OSError("killed")

    monkeypatch.setattr(state_mod, "_write_latest", killed)
    with pytest.raises(OSError, match="killed"):
        saved(tmp_path, 2)
    monkeypatch.undo()
    assert load_any(tmp_path).step == 1
    assert load_any(tmp_path, step=2).step == 2  # complete, just not yet `latest`


def test_crash_inside_dsv4_model_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig.tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = random_model(config)
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path, model=model, optimizer=opt, step=1, rng=capture_rng())
    def power_cut(tensors: dict[str, torch.Tensor], file: Path) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(io, "_write_file", power_cut)
    with pytest.raises(OSError, match="power cut"):
        save_training_state(tmp_path, model=model, optimizer=opt, step=2, rng=capture_rng())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]


def test_hard_crash_leftovers_are_cleaned_by_next_save(tmp_path: Path) -> None:
    saved(tmp_path, 1)
    # What a SIGKILL mid-save leaves: our temporary, save_checkpoint's nested one, a half-written latest.
    for name in (".step-2.tmp-deadbeef", "..step-2.tmp-deadbeef.tmp-cafef00d", ".step-0.del-0badf00d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".latest.tmp-12345678").write_text("step-")
    assert load_any(tmp_path).step == 1  # leftovers do not confuse loading
    saved(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1", "step-2"]


def test_keep_retention(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        saved(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-3", "step-4"]
    saved(tmp_path, 5, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-5"]
    with pytest.raises(ValueError, match="keep"):
        saved(tmp_path, 6, keep=0)


def test_resave_of_an_existing_step_replaces_it(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        saved(tmp_path, step, keep=3)
    # Resumed from step 1, the new run saves step 2 again: it replaces the abandoned run's step-2.
    saved(tmp_path, 2, keep=2, tag="rerun")
    assert latest_step_dir(tmp_path) == tmp_path / "step-2"
    assert load_any(tmp_path).extra == {"tag": "rerun"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1", "step-2", "step-3"]


def test_no_pickle_only_safetensors_and_json(tmp_path: Path) -> None:
    saved(tmp_path, 1)
    files = [p for p in (tmp_path / "step-1").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == ALLOWED_SUFFIXES
    assert sorted(p.name for p in files) == ["model.safetensors", "optimizer.json", "optimizer.safetensors",
                                              "rng.json", "rng.safetensors", "trainer_state.json"]
    for p in files:
        assert not p.read_bytes().startswith(b"\x80"), p  # the pickle protocol-2+ opcode
    optimizer_json = json.loads((tmp_path / "step-1" / "optimizer.json").read_text())
    assert optimizer_json["param_groups"][0]["betas"] == {"__tuple__": [0.8, 0.95]}


def test_optimizer_tensors_keyed_by_param_index(tmp_path: Path) -> None:
    from safetensors import safe_open

    saved(tmp_path, 1)
    with safe_open(str(tmp_path / "step-1" / "optimizer.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {f"state.{i}.{n}" for i in range(4) for n in ("step", "exp_avg", "exp_avg_sq")}


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_any(tmp_path / "nowhere")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/latest does not exist"):
        load_any(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"step-7.*checkpoints there: none"):
        load_any(tmp_path / "empty", step=7)

    saved(tmp_path / "a", 1)
    step_dir = tmp_path / "a" / "step-1"
    opt_file = step_dir / "optimizer.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is \d+ bytes but was written with"):
        load_any(tmp_path / "a")

    saved(tmp_path / "b", 1)
    (tmp_path / "b" / "step-1" / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is corrupt"):
        load_any(tmp_path / "b")

    saved(tmp_path / "c", 1)
    (tmp_path / "c" / "step-1" / "rng.json").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.json is missing"):
        load_any(tmp_path / "c")

    saved(tmp_path / "d", 1)
    (tmp_path / "d" / "latest").write_text("step-9\n")
    with pytest.raises(CheckpointError, match=r"latest names step-9, which does not exist"):
        load_any(tmp_path / "d")

    # Same size, garbage bytes: the digest written with the file names it.
    saved(tmp_path / "e", 1)
    model_file = tmp_path / "e" / "step-1" / "model.safetensors"
    model_file.write_bytes(b"\xff" * model_file.stat().st_size)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the digest"):
        load_any(tmp_path / "e")

    # One flipped bit in a tensor's data, a file the safetensors reader would load without complaint.
    saved(tmp_path / "f", 1)
    data = bytearray((tmp_path / "f" / "step-1" / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (tmp_path / "f" / "step-1" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-1/model\.safetensors does not match the digest"):
        load_any(tmp_path / "f")

    # A checkpoint written before digests were recorded still loads (its sizes are checked).
    saved(tmp_path / "g", 1)
    meta_file = tmp_path / "g" / "step-1" / "trainer_state.json"
    meta = json.loads(meta_file.read_text())
    del meta["digests"]
    meta_file.write_text(json.dumps(meta))
    assert load_any(tmp_path / "g").step == 1


def test_missing_latest_pointer_falls_back_to_the_newest_complete_step(tmp_path: Path) -> None:
    saved(tmp_path, 1)
    saved(tmp_path, 2)
    (tmp_path / "latest").unlink()
    (tmp_path / "step-3").mkdir()  # no trainer_state.json: never completed, not a candidate
    assert latest_step_dir(tmp_path) == tmp_path / "step-2"
    assert load_any(tmp_path).step == 2


def test_mismatched_model_or_optimizer_is_rejected_before_anything_changes(tmp_path: Path) -> None:
    saved(tmp_path, 1)
    other = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match=r"step-1.*mismatched"):
        load_training_state(tmp_path, model=other, optimizer=make_optimizer(other))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))

    model = make_model(0)
    split = torch.optim.AdamW([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    with pytest.raises(CheckpointError, match=r"optimizer\.json.*groups of sizes \[4\].*\[2, 2\]"):
        load_training_state(tmp_path, model=model, optimizer=split)


def test_extra_must_be_json(tmp_path: Path) -> None:
    model = make_model(0)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_training_state(tmp_path, model=model, optimizer=make_optimizer(model), step=1, rng=capture_rng(),
                            extra={"bad": object()})
    assert not tmp_path.joinpath("step-1").exists()


def test_restore_rng_requires_the_same_generators() -> None:
    rng = capture_rng({"data": torch.Generator()})
    with pytest.raises(ValueError, match=r"captured generators \['data'\] but was given \[\]"):
        restore_rng(rng)

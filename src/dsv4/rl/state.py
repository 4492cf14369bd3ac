"""Atomic training checkpoints (model, optimizer, RNG, trainer state) with bit-exact resume; never pickle.

A checkpoint root holds complete step directories and a ``latest`` pointer::

    root/
      latest                      "step-120"
      step-100/  step-120/
        config.json, model.safetensors (or shards + index)   a loadable dsv4 checkpoint (load_model)
        tokenizer files                                      copied from ``assets_dir`` when given
        optimizer.safetensors     tensors of optimizer.state_dict(), keyed state.<param_index>.<name>
        optimizer.json            everything else (param_groups, python-number state), tensors by key
        rng.safetensors           torch global CPU (and CUDA) states, named generators, as uint8
        rng.json                  python ``random`` and numpy states
        trainer_state.json        step, extra, the size and XXH3-128 digest of every other file (written last)

A step directory only ever gets its name by ``os.rename`` of a fully written and fsynced temporary
sibling, and ``latest`` is replaced the same way, so a crash at any point leaves ``latest`` naming a
complete checkpoint. Leftover temporaries are removed by the next save. Loading checks every file's
size and digest, so a truncated or damaged file is an error naming it, never silently loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import xxhash
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.checkpoint.io import file_mode_from_umask, fsync_path, standalone_tensors
from dsv4.checkpoint.io import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError, check_tensors, official_name
from dsv4.model import Transformer, save_model

try:  # numpy is optional: its global RNG is captured only when it is installed
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with the dev environment
    np = None  # type: ignore[assignment]

__all__ = [
    "CheckpointError",
    "RngState",
    "TrainingState",
    "capture_rng",
    "latest_step_dir",
    "load_training_state",
    "restore_rng",
    "save_training_state",
]

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
RNG_JSON = "rng.json"
FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Temporaries this module (and save_checkpoint, nested one level: "..step-3.tmp-ab.tmp-cd") leaves
# behind only when the process dies mid-save; they never carry a step directory's name.
_STALE = re.compile(r"^\.\.?step-\d+\.(?:tmp|del)-|^\.latest\.tmp-")
# Our own files: never overwritten by assets, whose copy only adds tokenizer and similar files.
_RESERVED = {CONFIG_FILE, INDEX_FILE, SINGLE_FILE, LATEST_FILE, TRAINER_STATE_FILE, OPTIMIZER_TENSORS,
             OPTIMIZER_JSON, RNG_TENSORS, RNG_JSON}


class RngState(TypedDict):
    """Every random number generator a training step draws from (see :func:`capture_rng`)."""

    torch: torch.Tensor  # torch's global CPU generator, uint8
    cuda: list[torch.Tensor]  # one per visible CUDA device; empty without CUDA
    generators: dict[str, torch.Tensor]  # the named torch.Generator objects the trainer owns
    python: list[Any]  # random.getstate() as JSON: [version, [625 ints], gauss_next]
    numpy: list[Any] | None  # np.random.get_state() as JSON; None when numpy is not installed


@dataclass(frozen=True)
class TrainingState:
    """What :func:`load_training_state` returns besides restoring the model and optimizer in place."""

    step: int
    rng: RngState  # pass to restore_rng(state.rng, generators) before the next step
    extra: dict[str, Any]
    path: Path  # the step directory it came from


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> RngState:
    """Snapshot torch's global CPU (and CUDA) RNG, the given named generators, python ``random`` and
    numpy's global RNG (when installed)."""
    version, internal, gauss = random.getstate()
    np_state: list[Any] | None = None
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        np_state = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return RngState(
        torch=torch.get_rng_state(),
        cuda=list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        generators={name: g.get_state() for name, g in (generators or {}).items()},
        python=[version, list(internal), gauss],
        numpy=np_state,
    )


def restore_rng(state: RngState, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put every generator back where :func:`capture_rng` found it.

    ``generators`` must name exactly the generators that were captured: a generator silently left
    unrestored would make the resumed run diverge from the uninterrupted one.
    """
    given = dict(generators or {})
    if given.keys() != state["generators"].keys():
        raise ValueError(f"restore_rng: captured generators {sorted(state['generators'])} but was given "
                         f"{sorted(given)}; pass the same names to capture_rng and restore_rng")
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("restore_rng: the checkpoint has RNG states for {} CUDA device(s) but {} are "
                           "visible; CUDA draws will not match the original run", len(state["cuda"]),
                           torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for name, g in given.items():
        g.set_state(state["generators"][name])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["numpy"] is not None:
        if np is None:
            logger.warning("restore_rng: the checkpoint has a numpy RNG state but numpy is not installed")
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fsync_path(path)


def _standalone(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with storage of their own (safetensors refuses shared views)."""
    return dict(standalone_tensors(tensors))


def _write_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write one safetensors file and flush it to disk (tests replace this to simulate a crash)."""
    save_file(tensors, str(file), metadata={"format": "pt"})
    file_mode_from_umask(file)
    _fsync(file)


def _write_json(obj: Any, file: Path) -> None:
    file.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync(file)


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise CheckpointError(f"{file} is corrupt or not a safetensors file: {e}") from None


def _copy_assets(assets_dir: Path, dest: Path) -> None:
    if not assets_dir.is_dir():
        raise FileNotFoundError(f"assets_dir {assets_dir} is not a directory")
    for entry in sorted(assets_dir.iterdir()):
        if entry.name in _RESERVED or entry.name.endswith(".safetensors"):
            continue  # the model's own files come from the model, never from the assets
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
            for f in (dest / entry.name).rglob("*"):
                if f.is_file():
                    _fsync(f)
        else:
            shutil.copy2(entry, dest / entry.name)
            _fsync(dest / entry.name)


def _manifest(directory: Path) -> dict[str, int]:
    """Size of every file below ``directory``: trainer_state.json records it to detect truncation."""
    return {f.relative_to(directory).as_posix(): f.stat().st_size
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name != TRAINER_STATE_FILE}


def _digest(file: Path) -> str:
    """XXH3-128 of a file's bytes (read in chunks): detects damage that keeps the size, e.g. flipped bytes."""
    h = xxhash.xxh3_128()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Optimizer state: JSON with tensors stored by key in safetensors
# ---------------------------------------------------------------------------------------------


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, each tensor replaced by ``{"__tensor__": key}`` and moved into ``tensors``.

    Tuples and dicts with non-string keys (``state`` is keyed by param index) are tagged so that
    decoding gives back exactly what ``optimizer.state_dict()`` held (``betas`` stays a tuple).
    """
    sub = (lambda k: f"{key}.{k}") if key else str
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, sub(i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, sub(i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, sub(k), tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, sub(f"key{i}"), tensors), _encode(v, sub(k), tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj  # json writes floats with repr, which round-trips every float exactly
    raise CheckpointError(f"optimizer state {key or '<root>'} holds a {type(obj).__name__}, which cannot "
                          "be stored without pickle; only tensors, numbers, strings, lists, tuples and dicts can")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], file: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, file) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise CheckpointError(f"{file.with_name(OPTIMIZER_JSON)} refers to tensor {key!r}, which {file} lacks")
        return tensors[key]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, file) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, file): _decode(v, tensors, file) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, file) for k, v in obj.items()}


def _write_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(optimizer.state_dict(), "", tensors)
    _write_safetensors(_standalone(tensors.items()), directory / OPTIMIZER_TENSORS)
    _write_json(encoded, directory / OPTIMIZER_JSON)


def _read_optimizer(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    file = directory / OPTIMIZER_TENSORS
    state = _decode(_read_json(directory / OPTIMIZER_JSON), _read_safetensors(file), file)
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise CheckpointError(f"{directory / OPTIMIZER_JSON} is not an optimizer state (no param_groups)")
    saved = [len(g.get("params", ())) for g in state["param_groups"]]
    current = [len(g["params"]) for g in optimizer.param_groups]
    if saved != current:
        raise CheckpointError(f"{directory / OPTIMIZER_JSON}: the optimizer was saved with parameter groups of "
                              f"sizes {saved} but the given optimizer has {current}")
    return state


# ---------------------------------------------------------------------------------------------
# Model weights
# ---------------------------------------------------------------------------------------------


def _write_model(model: torch.nn.Module, directory: Path) -> str:
    """Write the model into the not yet existing ``directory``; return the layout for the loader."""
    if isinstance(model, Transformer):
        save_model(model, directory)  # a directory load_model (and transformers) can read as is
        return "dsv4"
    # Any other module (tests, small policies): its state_dict under its own names, no config.json.
    directory.mkdir()
    _write_safetensors(_standalone(model.state_dict().items()), directory / SINGLE_FILE)
    return "state_dict"


def _read_model(directory: Path, layout: str) -> dict[str, torch.Tensor]:
    """The stored weights under state_dict names, in their stored dtype (no cast: resume is exact)."""
    if (directory / INDEX_FILE).is_file():
        index = _read_json(directory / INDEX_FILE)
        try:
            files = sorted(set(index["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{directory / INDEX_FILE} has no weight_map") from None
    else:
        files = [SINGLE_FILE]
    out: dict[str, torch.Tensor] = {}
    for file in files:
        for stored, tensor in _read_safetensors(directory / file).items():
            out[official_name(stored) if layout == "dsv4" else stored] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> dict[int, Path]:
    """Complete checkpoints in ``root`` by step (only complete ones ever carry the ``step-N`` name)."""
    out: dict[int, Path] = {}
    if root.is_dir():
        for entry in root.iterdir():
            if (m := _STEP_DIR.match(entry.name)) and entry.is_dir():
                out[int(m.group(1))] = entry
    return out


def _read_latest(root: Path) -> str | None:
    try:
        return (root / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, root / LATEST_FILE)
    _fsync(root)


def _remove(path: Path) -> None:
    """Delete a directory, first renaming it so a half-deleted one never looks like a checkpoint."""
    m = _STEP_DIR.match(path.name)
    trash = path.with_name(f".{path.name}.del-{uuid.uuid4().hex[:8]}") if m else path
    if trash != path:
        os.rename(path, trash)
    shutil.rmtree(trash)


def _clean_stale(root: Path) -> None:
    for entry in root.iterdir():
        if _STALE.match(entry.name):
            logger.info("removing {} left by an interrupted checkpoint save", entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _install(root: Path, tmp: Path, name: str) -> None:
    """Give the finished ``tmp`` the name ``name``, replacing a checkpoint already there."""
    target = root / name
    if not target.exists():
        os.rename(tmp, target)
        _fsync(root)
        return
    # The same step again: a run resumed from an older checkpoint reached a step its abandoned
    # predecessor had saved. Point `latest` away from the old copy while the two are swapped (when
    # it is the only checkpoint, `latest` names a missing directory between the two renames).
    if _read_latest(root) == name:
        others = {s: d for s, d in _step_dirs(root).items() if d.name != name}
        if others:
            _write_latest(root, others[max(others)].name)
    aside = root / f".{name}.del-{uuid.uuid4().hex[:8]}"
    os.rename(target, aside)
    os.rename(tmp, target)
    _fsync(root)
    shutil.rmtree(aside)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the new checkpoint and the ``keep - 1`` newest before it; later steps (left by an abandoned
    run this one resumed before) are left alone until this run overwrites them."""
    dirs = _step_dirs(root)
    older = sorted(s for s in dirs if s < step)
    for s in older[: max(len(older) - (keep - 1), 0)]:
        _remove(dirs[s])


def save_training_state(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: RngState,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
    assets_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Atomically write checkpoint ``path/step-<step>/`` and point ``path/latest`` at it; return its path.

    ``model`` is saved with :func:`dsv4.model.save_model` when it is a dsv4 ``Transformer`` (so the
    directory is also a checkpoint :func:`dsv4.model.load_model` reads; ``assets_dir``'s tokenizer
    files are copied in), else as its ``state_dict``. ``rng`` comes from :func:`capture_rng`;
    ``extra`` (config, metrics so far, data cursor, ...) must be JSON-serialisable. After the new
    checkpoint is in place, all but the newest ``keep`` are deleted.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint being written), got {keep}")
    extra = dict(extra or {})
    try:  # fail before touching the disk
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)

    name = f"step-{step}"
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        layout = _write_model(model, tmp)
        if assets_dir is not None:
            _copy_assets(Path(assets_dir), tmp)
        _write_optimizer(optimizer, tmp)
        rng_tensors = {"torch": rng["torch"], **{f"cuda.{i}": t for i, t in enumerate(rng["cuda"])},
                       **{f"generator.{n}": t for n, t in rng["generators"].items()}}
        _write_safetensors(_standalone(rng_tensors.items()), tmp / RNG_TENSORS)
        _write_json({"python": rng["python"], "numpy": rng["numpy"], "cuda_devices": len(rng["cuda"]),
                     "generators": sorted(rng["generators"])}, tmp / RNG_JSON)
        # Written last: its presence with a matching manifest means every other file is whole.
        files = _manifest(tmp)
        _write_json({"format": FORMAT_VERSION, "step": step, "model_layout": layout, "extra": extra,
                     "files": files, "digests": {rel: _digest(tmp / rel) for rel in files}},
                    tmp / TRAINER_STATE_FILE)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(root, tmp, name)
    _write_latest(root, name)
    _prune(root, step, keep)
    return root / name


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def latest_step_dir(path: str | os.PathLike[str]) -> Path | None:
    """The step directory ``path/latest`` names, or None when ``path`` holds no checkpoint yet.

    Without ``latest`` (a crash between a first save's rename and its pointer, or a hand-deleted file)
    the newest complete ``step-N`` is the latest: step directories only get their name when whole.
    """
    root = Path(path)
    name = _read_latest(root)
    if name is None:
        dirs = {s: d for s, d in _step_dirs(root).items() if (d / TRAINER_STATE_FILE).is_file()}
        if not dirs:
            return None
        logger.warning("{} is missing; using the newest checkpoint there, {}", root / LATEST_FILE, dirs[max(dirs)].name)
        return dirs[max(dirs)]
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{root / LATEST_FILE} should name a step-<N> directory but holds {name!r}")
    if not (root / name).is_dir():
        # A crash inside _install between its two renames, while re-saving the only checkpoint, leaves
        # the complete old copy aside: put it back (the load's manifest check still vets every file).
        for aside in sorted(root.glob(f".{name}.del-*")):
            if (aside / TRAINER_STATE_FILE).is_file():
                logger.warning("restoring {} from {}, left aside by an interrupted save", name, aside.name)
                os.rename(aside, root / name)
                _fsync(root)
                return root / name
        raise CheckpointError(f"{root / LATEST_FILE} names {name}, which does not exist in {root}")
    return root / name


def _resolve(path: Path, step: int | None) -> Path:
    if step is not None:
        directory = path / f"step-{step}"
        if not directory.is_dir():
            have = ", ".join(d.name for _, d in sorted(_step_dirs(path).items())) or "none"
            raise CheckpointError(f"no checkpoint {directory} (checkpoints there: {have})")
        return directory
    if (path / TRAINER_STATE_FILE).is_file():
        return path  # a step directory itself
    if not path.is_dir():
        raise CheckpointError(f"no training checkpoint at {path}: the directory does not exist")
    latest = latest_step_dir(path)
    if latest is None:
        raise CheckpointError(f"no training checkpoint at {path}: {path / LATEST_FILE} does not exist")
    return latest


def load_training_state(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int | None = None,
) -> TrainingState:
    """Restore ``model`` and ``optimizer`` in place from a checkpoint written by :func:`save_training_state`.

    ``path`` is a checkpoint root (its ``latest``, or ``step-<step>`` when ``step`` is given) or a step
    directory. Every file is read and checked before anything is modified. The RNG states come back in
    the result for ``restore_rng(state.rng, generators)``. A missing, truncated or mismatched file
    raises :class:`~dsv4.checkpoint.io.CheckpointError` naming it.
    """
    directory = _resolve(Path(path), step)
    meta = _read_json(directory / TRAINER_STATE_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / TRAINER_STATE_FILE}: unknown checkpoint format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}; expected {FORMAT_VERSION}")
    missing = [k for k in ("step", "model_layout", "extra", "files") if k not in meta]
    if missing:
        raise CheckpointError(f"{directory / TRAINER_STATE_FILE} is corrupt: it lacks {missing}")
    for rel, size in meta["files"].items():
        file = directory / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
        if (found := file.stat().st_size) != size:
            raise CheckpointError(f"{file} is {found} bytes but was written with {size}: truncated or changed")
    # Checkpoints written before digests were recorded have none; their sizes are still checked above.
    for rel, digest in meta.get("digests", {}).items():
        if _digest(directory / rel) != digest:
            raise CheckpointError(f"{directory / rel} does not match the digest it was written with: "
                                  "the file is damaged or was changed")

    weights = _read_model(directory, meta["model_layout"])
    try:
        check_tensors(model.state_dict(), weights)
    except CheckpointError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    optim_state = _read_optimizer(directory, optimizer)
    rng_file = directory / RNG_TENSORS
    rng_tensors = _read_safetensors(rng_file)
    rng_json = _read_json(directory / RNG_JSON)
    try:
        rng = RngState(
            torch=rng_tensors["torch"],
            cuda=[rng_tensors[f"cuda.{i}"] for i in range(rng_json["cuda_devices"])],
            generators={n: rng_tensors[f"generator.{n}"] for n in rng_json["generators"]},
            python=rng_json["python"],
            numpy=rng_json["numpy"],
        )
    except KeyError as e:
        raise CheckpointError(f"{rng_file} / {RNG_JSON}: missing RNG state {e}") from None

    with torch.no_grad():
        model.load_state_dict(weights, strict=True)
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / OPTIMIZER_JSON} does not fit the optimizer: {e}") from None
    return TrainingState(step=int(meta["step"]), rng=rng, extra=dict(meta["extra"]), path=directory)

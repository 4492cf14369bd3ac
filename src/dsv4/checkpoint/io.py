"""Safetensors checkpoint reading and writing (never pickle).

In memory, tensors carry DeepSeek's official names (spec §8): ``embed.weight``,
``layers.3.attn.kv_norm.weight``, ``layers.3.ffn.experts.7.w1.weight``, ``mtp.0.…``. On disk two
layouts exist:
- official: those names, optionally behind a ``model.`` prefix, FP8/FP4 weights with ``.scale``
  siblings;
- transformers (``DeepseekV4ForCausalLM.save_pretrained``): ``model.`` on everything but
  ``head.weight``, ``model.embed_tokens.weight``, ``model.hc_head.hc_{fn,base,scale}``,
  ``attn.norm.weight`` for the attention's ``kv_norm``, no ``mtp.*``.
:func:`read_checkpoint` accepts both; :func:`save_checkpoint` writes either, atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.checkpoint.quant import dequant_fp4, dequant_fp8_block

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_FP4_BLOCK = 32
_FP8_BLOCK = (128, 128)

# The attention's own norm only (compressor.norm keeps its name): transformers' `attn.norm`.
_HF_ATTN_NORM = re.compile(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$")
_OFFICIAL_ATTN_NORM = re.compile(r"^((?:layers|mtp)\.\d+\.attn)\.kv_norm\.weight$")
_HF_HC_HEAD = re.compile(r"^hc_head\.hc_(fn|base|scale)$")
_OFFICIAL_HC_HEAD = re.compile(r"^hc_head_(fn|base|scale)$")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, inconsistent or does not match the model."""


class TransformersConfig(Protocol):
    """What :func:`save_checkpoint` needs of a config (``dsv4.core.config.ModelConfig``)."""

    def to_transformers_dict(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def official_name(name: str) -> str:
    """Map an on-disk name (official, ``model.``-prefixed official, or transformers) to the official one."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name == "embed_tokens.weight":
        return "embed.weight"
    if m := _HF_HC_HEAD.match(name):
        return f"hc_head_{m.group(1)}"
    if m := _HF_ATTN_NORM.match(name):
        return f"{m.group(1)}.kv_norm.weight"
    return name


def transformers_name(name: str) -> str:
    """Map an official name to the name ``DeepseekV4ForCausalLM`` checkpoints use (inverse of
    :func:`official_name`); ``mtp.*`` keeps its official name, which transformers ignores on load."""
    if name == "head.weight" or name.startswith("mtp."):
        return name
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if m := _OFFICIAL_HC_HEAD.match(name):
        return f"model.hc_head.hc_{m.group(1)}"
    if m := _OFFICIAL_ATTN_NORM.match(name):
        return f"model.{m.group(1)}.norm.weight"
    return f"model.{name}"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map every stored tensor name to the file holding it (from the index when sharded)."""
    if path.is_file():
        files = [path]
    elif (path / INDEX_FILE).is_file():
        weight_map: dict[str, str] = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        located = {name: path / shard for name, shard in weight_map.items()}
        missing: dict[Path, list[str]] = {}
        for name, file in located.items():
            if not file.is_file():
                missing.setdefault(file, []).append(name)
        if missing:
            listing = "; ".join(f"{f} (should hold {', '.join(sorted(n)[:3])}, ...)" for f, n in missing.items())
            raise CheckpointError(f"{path / INDEX_FILE} names shard file(s) that do not exist: {listing}")
        return located
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    elif path.is_dir() and (files := sorted(path.glob("*.safetensors"))):
        pass
    else:
        raise CheckpointError(f"no safetensors checkpoint at {path}")
    located = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in located:
                    raise CheckpointError(f"tensor {name} is stored twice: in {located[name]} and {file}")
                located[name] = file
    return located


class _Reader:
    """Reads single tensors, keeping each file open once (safe_open memory-maps it)."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._handles: dict[Path, Any] = {}

    def get(self, name: str, file: Path) -> torch.Tensor:
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        handle = self._handles[file]
        if name not in handle.keys():
            raise CheckpointError(f"tensor {name} is listed in the index for {file.name} but {file} lacks it")
        tensor: torch.Tensor = handle.get_tensor(name)
        return tensor


def _dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor, file: Path, dtype: torch.dtype) -> torch.Tensor:
    """Dequantise ``weight`` with its ``.scale`` sibling: FP8 blocks for float8 weights, FP4 pairs
    for int8/uint8 weights."""
    try:
        if weight.dtype == torch.float8_e4m3fn:
            return dequant_fp8_block(weight, scale, _FP8_BLOCK, dtype)
        if weight.dtype in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2):
            return dequant_fp4(weight, scale, dtype, _FP4_BLOCK)
    except ValueError as e:
        raise CheckpointError(f"{name} in {file}: {e}") from e
    raise CheckpointError(f"{name} in {file} has a .scale but dtype {weight.dtype} is neither FP8 nor packed FP4")


def read_checkpoint(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
) -> dict[str, torch.Tensor]:
    """Read a checkpoint into official names: a directory (``model.safetensors``, a sharded
    ``model.safetensors.index.json``, or loose ``*.safetensors``) or one ``.safetensors`` file.

    FP8/FP4 weights are dequantised with their ``.scale`` siblings (dropped), floating tensors cast to
    ``dtype``, integer tensors (``tid2eid``) returned as int64. ``keep_quantized=True`` returns
    quantised weights and their scales as stored. Tensors are read one at a time.
    """
    located = _tensor_files(Path(path))
    by_official: dict[str, str] = {}
    for stored in located:
        name = official_name(stored)
        if name in by_official:
            raise CheckpointError(f"{stored} and {by_official[name]} both map to {name}")
        by_official[name] = stored

    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        reader = _Reader(stack)
        for name, stored in by_official.items():
            file = located[stored]
            if name.endswith(".scale"):
                if name.removesuffix("scale") + "weight" not in by_official:
                    raise CheckpointError(f"scale tensor {stored} in {file} has no weight tensor beside it")
                if keep_quantized:
                    out[name] = reader.get(stored, file)
                continue  # otherwise consumed when its weight is dequantised
            tensor = reader.get(stored, file)
            scale_name = name.removesuffix("weight") + "scale" if name.endswith(".weight") else ""
            if scale_name in by_official:
                if not keep_quantized:
                    scale_stored = by_official[scale_name]
                    scale = reader.get(scale_stored, located[scale_stored])
                    tensor = _dequantize(name, tensor, scale, file, dtype)
            elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise CheckpointError(f"FP8 tensor {stored} in {file} has no .scale to dequantise it with")
            elif tensor.is_floating_point():
                tensor = tensor.to(dtype)
            else:
                tensor = tensor.to(torch.int64)
            out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


def check_tensors(
    expected: Mapping[str, tuple[torch.Size, torch.dtype]] | Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
) -> None:
    """Raise :class:`CheckpointError` listing every missing, unexpected and mis-shaped tensor (and
    every integer/float mismatch); ``expected`` is name -> (shape, dtype) or a model's state_dict."""
    want: dict[str, tuple[torch.Size, torch.dtype]] = {}
    for name, spec in expected.items():
        want[name] = (spec.shape, spec.dtype) if isinstance(spec, torch.Tensor) else spec
    missing = sorted(want.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - want.keys())
    wrong: list[str] = []
    for name in sorted(want.keys() & loaded.keys()):
        shape, dt = want[name]
        got = loaded[name]
        if tuple(got.shape) != tuple(shape):
            wrong.append(f"  {name}: expected shape {tuple(shape)}, found {tuple(got.shape)}")
        elif got.is_floating_point() != dt.is_floating_point:
            wrong.append(f"  {name}: expected dtype {dt}, found {got.dtype}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing:\n" + "\n".join(f"  {n}" for n in missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected:\n" + "\n".join(f"  {n}" for n in unexpected))
    if wrong:
        problems.append(f"{len(wrong)} mismatched:\n" + "\n".join(wrong))
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _is_checkpoint_file(name: str) -> bool:
    return name in (CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors")


def _write_file(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write one safetensors file and flush it to disk (tests replace this to simulate a crash)."""
    save_file(tensors, str(file), metadata={"format": "pt"})
    file_mode_from_umask(file)
    fsync_path(file)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def file_mode_from_umask(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` would (safetensors creates files 0600)."""
    os.chmod(path, 0o666 & ~_UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file (or directory) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def standalone_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Contiguous tensors with storage of their own: safetensors refuses views sharing memory."""
    seen: set[int] = set()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        yield name, t


def _shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    config: TransformersConfig,
    path: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 2 << 30,
    layout: Literal["transformers", "official"] = "transformers",
) -> None:
    """Write ``tensors`` (official names) and ``config.json`` to the directory ``path``, atomically.

    ``layout="transformers"`` writes names ``DeepseekV4ForCausalLM.from_pretrained`` loads without
    renaming (``mtp.*`` stays official; transformers ignores it); ``"official"`` keeps the official
    names. More than ``max_shard_bytes`` of tensors are split into shards with an index. Everything is
    written to a sibling temporary directory and swapped in with renames, so a crash mid-save leaves the
    previous checkpoint intact; non-checkpoint files already in ``path`` (tokenizer, generation config,
    chat template, ...) are carried over.
    """
    if layout not in ("transformers", "official"):
        raise ValueError(f"layout must be 'transformers' or 'official', got {layout!r}")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    rename: Callable[[str], str] = transformers_name if layout == "transformers" else str
    named = list(standalone_tensors((rename(n), t) for n, t in tensors.items()))
    if len({n for n, _ in named}) != len(named):
        raise CheckpointError("two tensors map to the same stored name")
    shards = _shards(named, max_shard_bytes)

    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_transformers_dict(), indent=2) + "\n")
        fsync_path(tmp / CONFIG_FILE)
        if len(shards) == 1:
            _write_file(shards[0], tmp / SINGLE_FILE)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                _write_file(shard, tmp / file)
                weight_map.update(dict.fromkeys(shard, file))
            index = {"metadata": {"total_size": sum(t.nbytes for _, t in named)}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            fsync_path(tmp / INDEX_FILE)
        if target.is_dir():
            for entry in target.iterdir():
                if _is_checkpoint_file(entry.name):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
                    if not entry.is_symlink():
                        fsync_path(tmp / entry.name)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap: the old directory is renamed aside before the new one takes its name, so the
    # checkpoint at `path` is always complete (either old or new) except between the two renames,
    # when the old one is still whole under `.<name>.old-<tag>`.
    old = target.parent / f".{target.name}.old-{tag}"
    had_old = target.is_dir()
    if had_old:
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_path(target.parent)
    if had_old:
        shutil.rmtree(old)

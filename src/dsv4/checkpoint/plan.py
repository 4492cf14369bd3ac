"""Plan a deployment from ``config.json`` alone: parameters, weight bytes by dtype, KV cache bytes and
memory per device, without reading (or having) the weights (``dsv4 inspect``).

The model is built on the meta device, so every tensor has its real shape and no memory. Weight formats
(``weights=``):

- ``"stored"``: as a checkpoint directory's safetensors headers say when it has them (exact); from
  ``config.json`` alone, as DeepSeek's released checkpoints store them: every linear weight but the head
  FP8 e4m3 with a scale per 128×128 block (ue8m0 bytes, or float32 for Base checkpoints), routed experts
  FP4 e2m1 with a ue8m0 scale per 32 inputs when ``expert_dtype`` is ``fp4``, the embedding, head and
  router weights in ``dtype`` (bfloat16), the other vectors (norms, mHC, sinks, biases) in float32;
- ``"fp8"`` / ``"int8"``: every linear weight but the head quantised at load (FP8 with 128×128 block
  scales; int8 with a float32 scale per output channel), the rest as ``"stored"`` from a config;
- ``"dequantized"``: every tensor in ``dtype``.

Parallelism: tensor parallelism (``tp``) splits the attention projections, the shared expert and the
vocabulary (embedding, head) ``tp`` ways; expert parallelism (``ep``) gives each device
``n_routed_experts / ep`` routed experts; everything else (norms, mHC, router) is replicated. DeepSeek-V4
attention has one KV head shared by all query heads, so each tensor-parallel rank keeps the whole KV cache.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dsv4.core.config import ModelConfig

__all__ = ["DeploymentPlan", "TensorPlan", "WEIGHT_FORMATS", "plan_deployment"]

WeightFormat = Literal["stored", "fp8", "int8", "dequantized"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("stored", "fp8", "int8", "dequantized")
_DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "float8_e4m3fn": 1.0, "int8": 1.0,
                "uint8": 1.0, "float8_e8m0fnu": 1.0, "int64": 8.0, "int32": 4.0, "fp4_e2m1": 0.5}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "float8_e4m3fn",
                       "I8": "int8", "U8": "uint8", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32"}


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One stored tensor: its name, shape, dtype and how the parallel layout splits it."""

    name: str
    shape: tuple[int, ...]  # the values' shape (an FP4 weight [out, in] takes out·in/2 bytes)
    dtype: str
    split: Literal["replicated", "tp", "ep"] = "replicated"

    @property
    def nbytes(self) -> float:
        """Bytes on disk / in memory."""
        return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]


@dataclass(slots=True)
class DeploymentPlan:
    """What a model needs: parameters, bytes by dtype, KV bytes, and memory per device."""

    config: ModelConfig
    weights: WeightFormat
    tensors: list[TensorPlan]
    tp: int
    ep: int
    context: int
    batch: int
    kv_bytes_per_token: float  # at ``context`` tokens, cache dtype ``kv_dtype``
    kv_dtype: str
    exact: bool  # dtypes read from the checkpoint's safetensors headers, not derived from config.json
    parameters: int = field(init=False)  # every tensor's values, the MTP block's included
    mtp_parameters: int = field(init=False)
    active_parameters: int = field(init=False)  # per token of the main model

    def __post_init__(self) -> None:
        cfg = self.config
        values = {t.name: math.prod(t.shape) for t in self.tensors if not _is_scale(t.name)}
        self.parameters = sum(values.values())
        self.mtp_parameters = sum(v for n, v in values.items() if n.startswith("mtp."))
        routed = sum(v for n, v in values.items() if ".experts." in n and not n.startswith("mtp."))
        # a token of the main model runs top-k of each layer's routed experts (the MTP block: none)
        self.active_parameters = (self.parameters - self.mtp_parameters - routed
                                  + routed * cfg.num_experts_per_tok // cfg.n_routed_experts)

    def bytes_by_dtype(self) -> dict[str, float]:
        """Weight bytes (scales included) per stored dtype."""
        out: dict[str, float] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0.0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def weight_bytes(self) -> float:
        """All weight bytes."""
        return sum(t.nbytes for t in self.tensors)

    def weight_bytes_per_device(self) -> float:
        """Weight bytes on one device of the ``tp × ep`` layout (the largest share)."""
        split = {"replicated": 1, "tp": self.tp, "ep": self.ep}
        return sum(t.nbytes / split[t.split] for t in self.tensors)

    @property
    def kv_bytes_per_request(self) -> float:
        """KV bytes of one request of ``context`` tokens."""
        return self.kv_bytes_per_token * self.context

    def memory_per_device(self) -> float:
        """Weights plus the KV cache of ``batch`` requests of ``context`` tokens, on one device."""
        return self.weight_bytes_per_device() + self.batch * self.kv_bytes_per_request

    def report(self) -> str:
        """A human-readable table."""
        gib = 2.0**30
        cfg = self.config
        lines = [
            f"parameters        {self.parameters / 1e9:10.2f} B  ({(self.parameters - self.mtp_parameters) / 1e9:.2f} B "
            f"without the MTP block, {self.active_parameters / 1e9:.2f} B active per token)",
            f"weights ({self.weights}{', exact' if self.exact else ', from config.json'})"
            f"  {self.weight_bytes / gib:10.2f} GiB",
        ]
        lines += [f"  {dtype:<16} {nbytes / gib:10.2f} GiB" for dtype, nbytes in self.bytes_by_dtype().items()]
        lines += [
            f"KV cache ({self.kv_dtype})  {self.kv_bytes_per_token:10.1f} bytes/token at {self.context} tokens"
            f"  ({self.kv_bytes_per_request / gib:.3f} GiB per request)",
            f"layout            tp={self.tp} ep={self.ep}: {self.tp * self.ep} device(s) "
            f"({cfg.n_routed_experts // self.ep} routed experts each)",
            f"per device        {self.weight_bytes_per_device() / gib:10.2f} GiB weights + "
            f"{self.batch * self.kv_bytes_per_request / gib:.2f} GiB KV ({self.batch} x {self.context} tokens) = "
            f"{self.memory_per_device() / gib:.2f} GiB",
        ]
        return "\n".join(lines)


def plan_deployment(
    model: str | Path,
    *,
    weights: str = "stored",
    dtype: str = "bfloat16",
    kv_dtype: str = "bfloat16",
    tp: int = 1,
    ep: int = 1,
    context: int = 4096,
    batch: int = 1,
) -> DeploymentPlan:
    """The :class:`DeploymentPlan` of the checkpoint directory or ``config.json`` at ``model``."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weights format {weights!r}; valid: {', '.join(WEIGHT_FORMATS)}")
    fmt: WeightFormat = weights  # type: ignore[assignment]  # checked just above
    for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype)):
        if value not in ("float32", "bfloat16", "float16", "float8_e4m3fn"):
            raise ValueError(f"{name} {value!r} is not one of float32, bfloat16, float16, float8_e4m3fn")
    for name, count in (("tp", tp), ("ep", ep), ("context", context), ("batch", batch)):
        if count < 1:
            raise ValueError(f"{name} must be >= 1, got {count}")
    path = Path(model)
    config = ModelConfig.from_pretrained(path)
    if config.n_routed_experts % ep:
        raise ValueError(f"ep={ep} does not divide n_routed_experts={config.n_routed_experts}")
    for what, n in (("num_attention_heads", config.num_attention_heads), ("o_groups", config.o_groups)):
        if n % tp:
            raise ValueError(f"tp={tp} does not divide {what}={n}")
    shapes = dict(_meta_shapes(config))
    headers = _safetensors_dtypes(path) if path.is_dir() and weights == "stored" else None
    tensors = []
    for name, shape in shapes.items():
        tensors += _stored(name, shape, config, weights, dtype, headers)
    kv = _kv_bytes_per_token(config, context, kv_dtype)
    return DeploymentPlan(config, fmt, tensors, tp, ep, context, batch, kv, kv_dtype, exact=headers is not None)


def _meta_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model (official names), from a model built on the meta device."""
    from dsv4.checkpoint.io import official_name
    from dsv4.model.loading import build_plugins
    from dsv4.model.transformer import Transformer

    meta = torch.device("meta")
    backend, executor, kernels = build_plugins(config, meta)
    with meta:
        model = Transformer(config, attention_backend=backend, expert_executor=executor, kernels=kernels)
    for name, t in model.state_dict().items():
        yield official_name(name), tuple(t.shape)


def _split(name: str) -> Literal["replicated", "tp", "ep"]:
    if ".experts." in name:
        return "ep"
    tp_parts = (".attn.wq_a", ".attn.wq_b", ".attn.wkv", ".attn.wo_a", ".attn.wo_b", ".attn.attn_sink",
                ".shared_experts.", ".indexer.wq_b", ".indexer.weights_proj")
    if name in ("embed.weight", "head.weight") or any(p in name for p in tp_parts):
        return "tp"
    return "replicated"


def _is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A linear layer's weight (the router's and the embedding are not linears; the head stays dense)."""
    return (len(shape) == 2 and name.endswith(".weight") and name not in ("embed.weight", "head.weight")
            and not name.endswith("ffn.gate.weight") and not name.endswith("compressor.ape"))


def _stored(name: str, shape: tuple[int, ...], config: ModelConfig, weights: str, dtype: str,
            headers: dict[str, tuple[str, tuple[int, ...]]] | None) -> list[TensorPlan]:
    """The tensor (and its scale, for quantised weights) as the ``weights`` format stores it."""
    split = _split(name)
    if headers is not None:  # a real checkpoint: what its files say
        found = [(n, headers[n]) for n in (name, name.removesuffix("weight") + "scale") if n in headers]
        if not found:
            raise ValueError(f"{name} is not in the checkpoint's safetensors files")
        return [TensorPlan(n, shape, "fp4_e2m1", split) if _is_packed_fp4(n, d, s, shape) else TensorPlan(n, s, d, split)
                for n, (d, s) in found]
    if weights == "dequantized":
        return [TensorPlan(name, shape, dtype, split)]
    if name.endswith("tid2eid"):
        return [TensorPlan(name, shape, "int64", split)]
    quant = config.quantization
    if _is_linear(name, shape) and (weights != "stored" or quant is not None):
        out, inp = shape
        scale = name.removesuffix("weight") + "scale"
        if weights == "int8":
            return [TensorPlan(name, shape, "int8", split), TensorPlan(scale, (out,), "float32", split)]
        if ".experts." in name and weights == "stored" and quant is not None and quant.expert_dtype == "fp4":
            return [TensorPlan(name, shape, "fp4_e2m1", split),
                    TensorPlan(scale, (out, math.ceil(inp / 32)), "uint8", split)]
        b0, b1 = quant.weight_block_size if quant is not None else (128, 128)
        ue8m0 = quant is None or quant.scale_fmt == "ue8m0"
        return [TensorPlan(name, shape, "float8_e4m3fn", split),
                TensorPlan(scale, (math.ceil(out / b0), math.ceil(inp / b1)), "uint8" if ue8m0 else "float32", split)]
    dense = name in ("embed.weight", "head.weight") or name.endswith("ffn.gate.weight") or _is_linear(name, shape)
    return [TensorPlan(name, shape, dtype if dense else "float32", split)]


def _is_packed_fp4(name: str, dtype: str, stored: tuple[int, ...], logical: tuple[int, ...]) -> bool:
    """An int8 weight holding two e2m1 values per byte (its last dim half the model's)."""
    return dtype in ("int8", "uint8") and name.endswith(".weight") and len(stored) == 2 and stored[-1] * 2 == logical[-1]


def _is_scale(name: str) -> bool:
    return name.endswith(".scale") and not name.endswith("hc_attn_scale") and not name.endswith("hc_ffn_scale")


def _safetensors_dtypes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """``{official name: (dtype, shape)}`` from the safetensors headers of a checkpoint directory (the
    8-byte length and the JSON header only; no tensor is read), or ``None`` when it has none."""
    from dsv4.checkpoint.io import official_name

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for stored, info in header.items():
            if stored == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{file}: tensor {stored} has dtype {info['dtype']}, which dsv4 does not read")
            out[official_name(stored)] = (dtype, tuple(info["shape"]))
    return out


def _kv_bytes_per_token(config: ModelConfig, context: int, kv_dtype: str) -> float:
    """Bytes of every KV stream a request of ``context`` tokens keeps, per token (the paged pool's
    layout: window rows, open compression blocks, compressed entries, indexer keys)."""
    from dsv4.attention.reference import kv_streams

    size = _DTYPE_BYTES[kv_dtype]
    total = 0.0
    for s in kv_streams(config):
        rows = s.length(context) - s.keep_from(context)
        total += rows * s.bytes_per_row(1) * size
    return total / context

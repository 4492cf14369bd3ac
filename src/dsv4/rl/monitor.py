"""Training metrics: a JSON-lines log that survives resume, PNG curves, and bands that stop a bad run.

- :class:`MetricsLog` appends ``{"step": N, "time": t, **metrics}`` per step and, on resume, drops the
  lines a crashed run wrote after the checkpoint it resumes from, so the log never repeats a step.
- :func:`plot_curves` draws one panel per metric of one run; :func:`plot_runs` overlays one metric of
  several runs (seeds, a permuted-reward control). Both use matplotlib's Agg canvas directly (no
  pyplot, no display, no global backend switch) and replace the PNG atomically.
- :class:`MetricBands` raises :class:`MetricBandError` on a NaN/inf metric or one outside its band.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "DEFAULT_KEYS",
    "MetricBandError",
    "MetricBands",
    "MetricsLog",
    "plot_curves",
    "plot_expert_load",
    "plot_runs",
    "read_metrics",
    "replace_atomically",
]

# What plot_curves draws by default: the RL health signals, each only if the log has it.
DEFAULT_KEYS = (
    "reward_mean", "accuracy", "loss", "kl", "entropy", "grad_norm", "clip_fraction",
    "response_length_mean", "rollout_vs_train_logprob_abs_diff_max",
)
_RESERVED_KEYS = ("step", "time")


def _plain(value: Any) -> Any:
    """A JSON-able python value: one-element tensors and numpy scalars become python numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a metric must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar / 0-d array
        return value.item()
    return value


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics log; a torn last line (the process died mid-write) is dropped."""
    records: list[dict[str, Any]] = []
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # torn write at the end: everything before it is intact
            raise ValueError(f"{path}:{i + 1} is not a JSON object: {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{i + 1} has no integer 'step': {line[:80]!r}")
        records.append(record)
    return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a :class:`MetricsLog` file, in order."""
    return _parse_lines(Path(path))


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a crash or a full disk leaves the old content, never a
    torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class MetricsLog:
    """Append-only JSON-lines metrics, one line per :meth:`log` call, flushed as it is written.

    ``resume_step=N`` continues an existing log: lines with ``step > N`` (written after the checkpoint
    being resumed) are removed first. Without it an existing non-empty file is an error unless
    ``overwrite=True``, so a resume that forgot ``resume_step`` cannot silently clobber or duplicate a log.
    NaN and inf are written as python's JSON does (``NaN``, ``Infinity``).
    """

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_step: int | None = None
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if resume_step is not None:
            kept = [r for r in _parse_lines(self.path) if r["step"] <= resume_step] if exists else []
            # Rewrite even when nothing is dropped: it also removes a torn last line.
            replace_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            self.last_step = kept[-1]["step"] if kept else None
        elif exists and not overwrite:
            raise FileExistsError(f"{self.path} already holds metrics; pass resume_step=<checkpoint step> to "
                                  "continue that run, or overwrite=True to start it afresh")
        self._file: IO[str] = open(self.path, "a" if resume_step is not None else "w")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, "time": <unix time>, **metrics}``; steps must not decrease."""
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"{self.path}: step {step} logged after step {self.last_step}; steps must not decrease")
        clash = [k for k in _RESERVED_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by MetricsLog")
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.last_step = step

    def close(self) -> None:
        """Close the file (further :meth:`log` calls fail)."""
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    for r in records:
        v = r.get(key)
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _numeric_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in _RESERVED_KEYS and isinstance(v, numbers.Real) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def _save_png(fig: Figure, png_path: str | os.PathLike[str]) -> Path:
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: no pyplot, no display, no global backend
    fig.savefig(buf, format="png", dpi=100)
    replace_atomically(path, buf.getvalue())
    return path


def plot_curves(
    jsonl_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    keys: Sequence[str] | None = DEFAULT_KEYS,
    title: str | None = None,
) -> Path:
    """Draw one panel per metric in ``keys`` that the log has (``None``: every numeric metric), x =
    step, into ``png_path`` (replaced atomically). Raises ``ValueError`` when none of them is logged."""
    records = read_metrics(jsonl_path)
    present = _numeric_keys(records)
    wanted = present if keys is None else [k for k in keys if k in present]
    if not wanted:
        raise ValueError(f"{jsonl_path} has none of the metrics {list(keys or [])}; it has {present}")
    cols = min(len(wanted), 3)
    rows = math.ceil(len(wanted) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, wanted):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(wanted):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save_png(fig, png_path)


def plot_expert_load(jsonl_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> Path:
    """Heatmaps of the MoE load a training log records (``moe/load``, :func:`dsv4.rl.balance.load_metrics`):
    one panel per layer, x = step, y = expert, colour = the expert's share of the layer's routed tokens
    that step (``1/E`` everywhere is a perfect balance). Raises ``ValueError`` when the log has none."""
    records = [r for r in read_metrics(jsonl_path) if isinstance(r.get("moe/load"), dict)]
    if not records:
        raise ValueError(f"{jsonl_path} records no expert load (moe/load)")
    layers = sorted({layer for r in records for layer in r["moe/load"]}, key=int)
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        steps = [r for r in records if layer in r["moe/load"]]
        counts = torch.tensor([r["moe/load"][layer] for r in steps], dtype=torch.float64)  # [steps, E]
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        xs = [int(r["step"]) for r in steps]
        image = ax.imshow(share.t().numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                          extent=(xs[0] - 0.5, xs[-1] + 0.5, share.shape[1] - 0.5, -0.5))
        fig.colorbar(image, ax=ax, label="share of routed tokens")
        ax.set_title(f"layer {layer}: expert load (even = {1 / share.shape[1]:.2f})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    return _save_png(fig, png_path)


def plot_runs(
    runs: Mapping[str, str | os.PathLike[str]],
    png_path: str | os.PathLike[str],
    key: str,
    title: str | None = None,
) -> Path:
    """Overlay metric ``key`` of several runs (``{label: jsonl_path}``, e.g. three seeds and a
    permuted-reward control) in one panel, into ``png_path`` (replaced atomically)."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for label, path in runs.items():
        xs, ys = _series(read_metrics(path), key)
        if xs:
            ax.plot(xs, ys, label=label, linewidth=1.2)
            drawn += 1
    if not drawn:
        raise ValueError(f"none of the runs {list(runs)} logged {key!r}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or key)
    return _save_png(fig, png_path)


# ---------------------------------------------------------------------------------------------
# Bands
# ---------------------------------------------------------------------------------------------


class MetricBandError(ValueError):
    """A metric is NaN/inf or outside its configured band; ``violations`` lists (name, value, band)."""

    def __init__(self, violations: list[tuple[str, Any, tuple[float | None, float | None] | None]]) -> None:
        self.violations = violations
        lines = []
        for name, value, band in violations:
            where = "" if band is None else (f" (band [{'-inf' if band[0] is None else band[0]}, "
                                             f"{'inf' if band[1] is None else band[1]}])")
            if isinstance(value, float) and not math.isfinite(value):
                lines.append(f"{name} = {value} is not finite{where}")
            elif isinstance(value, bool) or not isinstance(value, numbers.Real):
                lines.append(f"{name} = {value!r} is not a number{where}")
            else:
                lines.append(f"{name} = {value!r} is outside its band{where}")
        super().__init__("metric check failed: " + "; ".join(lines))


class MetricBands:
    """Allowed ranges ``{name: (low, high)}`` (inclusive; ``None`` = unbounded on that side).

    :meth:`check` rejects every non-finite numeric metric, banded or not, and every banded metric
    outside its band; a banded metric absent from a step's metrics is not checked that step.
    """

    def __init__(self, bands: Mapping[str, Sequence[float | None]] | None = None) -> None:
        self.bands: dict[str, tuple[float | None, float | None]] = {}
        for name, band in (bands or {}).items():
            if len(band) != 2:
                raise ValueError(f"band for {name!r} must be (low, high) with None for unbounded, got {band!r}")
            lo, hi = band
            for bound in (lo, hi):
                if bound is not None and math.isnan(bound):
                    raise ValueError(f"band for {name!r} has a NaN bound: {band!r}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"band for {name!r} has low {lo} > high {hi}")
            self.bands[name] = (lo, hi)

    def check(self, metrics: Mapping[str, Any]) -> None:
        """Raise :class:`MetricBandError` naming each offending metric, its value and its band."""
        violations: list[tuple[str, Any, tuple[float | None, float | None] | None]] = []
        for name, raw in metrics.items():
            value = _plain(raw) if isinstance(raw, torch.Tensor) and raw.numel() == 1 else raw
            band = self.bands.get(name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                if band is not None:  # a banded metric must be a number to be checked at all
                    violations.append((name, value, band))
                continue
            v = float(value)
            if not math.isfinite(v):
                violations.append((name, v, band))
            elif band is not None:
                lo, hi = band
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    violations.append((name, v, band))
        if violations:
            raise MetricBandError(violations)

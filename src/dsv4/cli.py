"""The ``dsv4`` command line: one small function per subcommand, heavy imports inside them.

Adding a subcommand means writing ``_add_<name>(subparsers)``, which declares its arguments and sets
``run=_<name>``, and listing it in :data:`_SUBCOMMANDS`. Errors a user can fix from the message alone
(:class:`~dsv4.core.plugins.PluginError`, configuration ``ValueError``\\ s) print ``error: ...`` and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any

__all__ = ["main"]

_Subparsers = Any  # argparse's _SubParsersAction is private


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dsv4`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------------
# dsv4 plugins
# --------------------------------------------------------------------------------------------------
def _add_plugins(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser("plugins", help="list the loaded plugins and what each provides")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=_plugins)


def _plugins(args: argparse.Namespace) -> int:
    from dsv4.core.plugins import get_registry

    infos = get_registry().describe()
    if args.json:
        print(json.dumps([asdict(info) for info in infos], indent=2))
        return 0
    rows = [("plugin", "distribution", "version", "kind", "names")]
    for info in infos:
        provided = list(info.provides.items()) or [("-", ())]
        for i, (kind, names) in enumerate(provided):
            first = (info.name, info.distribution or "-", info.version or "-") if i == 0 else ("", "", "")
            rows.append((*first, kind, ", ".join(names)))
    widths = [max(len(row[col]) for row in rows) for col in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]).rstrip())
    return 0


# --------------------------------------------------------------------------------------------------
# dsv4 batch
# --------------------------------------------------------------------------------------------------
def _add_batch(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="run a jsonl file of prompts through the engine into a jsonl of results (resumable)",
        description="Run every line of --input not yet in --output; rerunning resumes an interrupted run.",
    )
    parser.add_argument("--model", help="checkpoint directory (wins over the config's model)")
    parser.add_argument("--input", help="jsonl of requests: id, prompt | prompt_token_ids | messages, sampling_params")
    parser.add_argument("--output", help="jsonl of results; when it exists, ids already in it are skipped")
    parser.add_argument("--config", help="YAML run config (see dsv4.serve.batch.BatchConfig)")
    parser.add_argument("--retry-errors", action="store_true", help="redo the ids whose earlier record is an error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. engine.max_num_seqs=8 sampling.temperature=0 chat=true")
    parser.set_defaults(run=_batch)


def _batch(args: argparse.Namespace) -> int:
    import signal

    from dsv4.core.runconfig import load_run_config
    from dsv4.core.runtime import tune_allocator
    from dsv4.serve.batch import BatchConfig, run_batch

    tune_allocator()  # inference: large prefill activations stay in the heap (see dsv4.core.runtime)

    config = load_run_config(BatchConfig, args.config, args.overrides)
    flags = {k: getattr(args, k) for k in ("model", "input", "output") if getattr(args, k) is not None}
    if args.retry_errors:
        flags["retry_errors"] = True
    # `kill` stops the run as Ctrl-C does: requests in flight are dropped, every written line is whole.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_batch(config.model_copy(update=flags), progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130  # run_batch has said how far it got
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------
# dsv4 serve
# --------------------------------------------------------------------------------------------------
def _add_serve(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (no --model: the bundled default model)",
        description="OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /generate, "
        "/tokenize, /detokenize, /health, /metrics. SIGTERM drains in-flight requests, then exits.",
    )
    parser.add_argument("--model", help="checkpoint directory (default: the bundled default model)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /generate routes")
    parser.add_argument("--config", help="YAML run config (see dsv4.serve.server.ServeConfig)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. engine.max_num_seqs=32 max_pending=128")
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from dsv4.core.runconfig import load_run_config
    from dsv4.core.runtime import tune_allocator
    from dsv4.serve.server import ServeConfig, serve

    tune_allocator()  # inference: large prefill activations stay in the heap (see dsv4.core.runtime)

    overrides = list(args.overrides)
    for flag in ("model", "host", "port", "api_key"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{flag}={value}")
    serve(load_run_config(ServeConfig, args.config, overrides))
    return 0


# --------------------------------------------------------------------------------------------------
# dsv4 train
# --------------------------------------------------------------------------------------------------
def _add_train(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run an RL recipe: SFT warm start, then GRPO with a verifier (resumable)",
        description="Train with a YAML recipe plus key=value overrides; rerunning the same command resumes.",
    )
    parser.add_argument("--recipe", default="addition",
                        help="a bundled recipe name (addition, jsonl_example) or a YAML file (default: addition)")
    parser.add_argument("--output", help="output directory (wins over the recipe's output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. seed=1 grpo.steps=200 sft.batch_size=128")
    parser.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsv4.core.runconfig import load_run_config
    from dsv4.rl.recipe import TrainConfig, run_recipe

    bundled = Path(__file__).parent / "recipes"
    recipe = Path(args.recipe)
    if not recipe.is_file():  # a file wins; otherwise a bundled recipe's name
        recipe = bundled / f"{args.recipe}.yaml"
    if not recipe.is_file():
        names = ", ".join(sorted(f.stem for f in bundled.glob("*.yaml")))
        raise ValueError(f"no recipe {args.recipe!r}: not a file, nor a bundled recipe ({names})")
    overrides = list(args.overrides) + ([f"output_dir={args.output}"] if args.output else [])
    config = load_run_config(TrainConfig, recipe, overrides)
    try:
        run_recipe(config)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume {config.output_dir} from its last checkpoint",
              file=sys.stderr)
        return 130
    except OSError as exc:  # a read-only or full disk, ...: the message names the file; the last checkpoint stands
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# dsv4 inspect
# --------------------------------------------------------------------------------------------------
def _add_inspect(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="plan a deployment from config.json alone: parameters, bytes by dtype, KV cache, memory per device",
        description="Builds the model on the meta device (no weights are read or needed); with a checkpoint "
                    "directory, --weights stored reads the dtypes from its safetensors headers.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory or config.json")
    parser.add_argument("--weights", default="stored", choices=("stored", "fp8", "int8", "dequantized"),
                        help="weight format (default: as stored)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of dense tensors (default bfloat16)")
    parser.add_argument("--kv-dtype", default="bfloat16", help="KV cache dtype (default bfloat16)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--context", type=int, default=4096, help="tokens per request")
    parser.add_argument("--batch", type=int, default=1, help="requests held at once")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from dsv4.checkpoint.plan import plan_deployment

    plan = plan_deployment(args.model, weights=args.weights, dtype=args.dtype, kv_dtype=args.kv_dtype, tp=args.tp,
                           ep=args.ep, context=args.context, batch=args.batch)
    if args.json:
        print(json.dumps({
            "parameters": plan.parameters, "mtp_parameters": plan.mtp_parameters,
            "active_parameters": plan.active_parameters, "weights": plan.weights, "exact": plan.exact,
            "weight_bytes": plan.weight_bytes, "bytes_by_dtype": plan.bytes_by_dtype(),
            "kv_dtype": plan.kv_dtype, "kv_bytes_per_token": plan.kv_bytes_per_token,
            "kv_bytes_per_request": plan.kv_bytes_per_request, "tp": plan.tp, "ep": plan.ep,
            "weight_bytes_per_device": plan.weight_bytes_per_device(), "memory_per_device": plan.memory_per_device(),
        }, indent=2))
    else:
        print(plan.report())
    return 0


_SUBCOMMANDS: tuple[Callable[[_Subparsers], None], ...] = (_add_plugins, _add_serve, _add_batch, _add_train,
                                                           _add_inspect)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4: model, inference engine, verified RL.")
    parser.add_argument("--version", action="version", version=f"dsv4 {_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv4")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, ValueError):  # pydantic's ValidationError and configuration errors
        return True
    # A PluginError implies its module is loaded; looking it up, not importing it, keeps the CLI's
    # start cheap (dsv4.core.plugins imports torch).
    plugins = sys.modules.get("dsv4.core.plugins")
    return plugins is not None and isinstance(exc, plugins.PluginError)


if __name__ == "__main__":
    raise SystemExit(main())

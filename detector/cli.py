"""The ``lie-detector`` command line.

Subcommands are declared as data (``COMMANDS``: name -> :class:`Command`) rather than wired by hand,
so new entry points (``serve``, ``sidecar``, ...) are added by registering one more entry with an
``add_arguments`` function and a handler, without touching the parser plumbing. Handlers receive
the parsed namespace and return an exit status; heavy imports belong inside handlers so that
``lie-detector --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("detector.cli")

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """One (sub)command: a handler, or a group of nested subcommands."""

    help: str
    handler: Handler | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    subcommands: dict[str, Command] = field(default_factory=dict)


# --- model ---------------------------------------------------------------------------------------


def _model_prepare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        metavar="DIR",
        default=None,
        help="folder to write the converted model to (default: the user cache, see `model path`)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")


def _model_prepare(args: argparse.Namespace) -> int:
    from detector.embedded_model import ensure_embedded_model

    path = ensure_embedded_model(args.target, progress=not args.no_progress)
    print(path)
    return 0


def _model_path(args: argparse.Namespace) -> int:
    from detector.embedded_model import default_model_dir, is_prepared

    path = default_model_dir()
    log.info("%s", "prepared" if is_prepared(path) else "not prepared yet: run `lie-detector model prepare`")
    print(path)
    return 0


# --- sidecar / serve -----------------------------------------------------------------------------


def _sidecar_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channel", help="channel endpoint (default: LIE_DETECTOR_CHANNEL or "
                        "a per-user IPC socket)")
    parser.add_argument("--grpc-address", help="host:port for gRPC (default 127.0.0.1:50051)")
    parser.add_argument("--grpc-port", type=int, help="port on 127.0.0.1 (shorthand)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464)")
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    parser.add_argument("--probe", action="append", default=None, metavar="DIR",
                        help="probe artifact directory to load (repeatable)")
    parser.add_argument("--model", metavar="DIR",
                        help="the served model's folder, to check probes before vLLM connects")
    parser.add_argument("--device", help="torch device for scoring (default: cuda if present)")
    parser.add_argument("--config", metavar="FILE", help="settings file (.toml, .yaml or .json); "
                        "flags and LIE_DETECTOR_* variables override it")


def _sidecar(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detector.sidecar.app import SettingsError, load_settings, run_sidecar

    overrides: dict = {}
    if args.channel:
        overrides["channel"] = args.channel
    if args.grpc_address:
        overrides["grpc_address"] = args.grpc_address
    elif args.grpc_port is not None:
        overrides["grpc_address"] = f"127.0.0.1:{args.grpc_port}"
    if args.no_metrics:
        overrides["metrics_port"] = None
    elif args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if args.probe:
        overrides["probes"] = args.probe
    if args.model:
        overrides["model_dir"] = args.model
    if args.device:
        overrides["device"] = args.device
    try:
        settings = load_settings(Path(args.config) if args.config else None, **overrides)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    return run_sidecar(settings)


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="OpenAI API host")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI API port")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, default=9464)
    parser.add_argument("--probe", action="append", default=[], metavar="DIR",
                        help="probe artifact directory (repeatable)")
    parser.add_argument("--layers", help="layers to capture, e.g. 8,15,22 (default: the probes' "
                        "layers plus a spread over the middle of the network)")
    parser.add_argument("--channel", help="channel endpoint")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="keep vLLM's prefix caching (cached prompt rows are not captured)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--log-dir", help="write each process's output to a file here")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="after --, extra arguments for vLLM")


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detector.config import parse_layers
    from detector.embedded_model import resolve_model
    from detector.model_identity import identify_model
    from detector.serve import ServeOptions, Supervisor

    model_dir = resolve_model(args.model)
    opts = ServeOptions(
        model_dir=model_dir, host=args.host, port=args.port,
        grpc_address=f"127.0.0.1:{args.grpc_port}", metrics_port=args.metrics_port,
        probes=[Path(p) for p in args.probe], layers=parse_layers(args.layers),
        prefix_caching=args.prefix_caching, enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        vllm_args=[a for a in args.vllm_args if a != "--"],
        log_dir=Path(args.log_dir) if args.log_dir else None,
    )
    if args.channel:
        opts.channel = args.channel
    return Supervisor(opts, identify_model(model_dir).num_layers).run()


COMMANDS: dict[str, Command] = {
    "serve": Command(
        help="run vLLM's OpenAI server with the plugin and the sidecar, supervised as a pair",
        handler=_serve,
        add_arguments=_serve_args,
    ),
    "sidecar": Command(
        help="run the sidecar alone, beside an existing vLLM deployment",
        handler=_sidecar,
        add_arguments=_sidecar_args,
    ),
    "model": Command(
        help="the embedded default model (SmolLM2-135M-Instruct)",
        subcommands={
            "prepare": Command(
                help="convert the packaged GGUF to a transformers folder (idempotent); prints the folder",
                handler=_model_prepare,
                add_arguments=_model_prepare_args,
            ),
            "path": Command(
                help="print where the converted model is or would be",
                handler=_model_path,
            ),
        },
    ),
}


# --- plumbing ------------------------------------------------------------------------------------


def _add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command], dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True)
    for name, command in commands.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        if command.add_arguments is not None:
            command.add_arguments(child)
        if command.subcommands:
            _add_commands(child, command.subcommands, dest=f"{dest}_{name}")
        elif command.handler is not None:
            child.set_defaults(handler=command.handler)


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The full argument parser (separate from ``main`` so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="lie-detector",
        description="Hallucination detection for vLLM from hidden states.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_commands(parser, COMMANDS if commands is None else commands, dest="command")
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:
        # Libraries that are chatty at INFO level.
        for name in ("transformers", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lie-detector`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    from detector.embedded_model import EmbeddedModelError

    try:
        return int(args.handler(args) or 0)
    except EmbeddedModelError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detector.model_identity import ModelIdentity

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
    from detector.models.embedded import ensure_embedded_model

    path = ensure_embedded_model(args.target, progress=not args.no_progress)
    print(path)
    return 0


def _model_path(args: argparse.Namespace) -> int:
    from detector.models.embedded import default_model_dir, is_prepared

    path = default_model_dir()
    log.info("%s", "prepared" if is_prepared(path) else "not prepared yet: run `lie-detector model prepare`")
    print(path)
    return 0


def _model_import_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="a .gguf file or a Hugging Face model folder")
    parser.add_argument("--out", metavar="DIR", required=True, help="the folder to write (served by vLLM)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the greedy-generation comparison (tokenizer checks still run)")


def _model_import(args: argparse.Namespace) -> int:
    from detector.models.importer import ModelImportError, VerificationError, import_model

    try:
        report = import_model(args.source, args.out, progress=not args.no_progress, verify=not args.no_verify)
    except VerificationError as exc:
        for check in exc.report.checks:
            print(f"{check.status:8} {check.name}: {check.message}")
        log.error("%s", exc)
        return 1
    except (ModelImportError, OSError) as exc:
        log.error("%s", exc)
        return 2
    if report.already_imported:
        print(f"already imported from {report.source}")
    for check in report.checks:
        print(f"{check.status:8} {check.name}: {check.message}")
    print(report.out)
    return 0


# --- sidecar / serve -----------------------------------------------------------------------------


def _sidecar_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channel", help="channel endpoint (default: LIE_DETECTOR_CHANNEL or "
                        "a per-user IPC socket)")
    parser.add_argument("--channel-key-file", metavar="FILE",
                        help="the channel key: only an engine presenting it may write steps "
                        "(give vLLM the same file as LIE_DETECTOR_CHANNEL_KEY_FILE)")
    parser.add_argument("--grpc-address", help="host:port for gRPC (default 127.0.0.1:50051)")
    parser.add_argument("--grpc-port", type=int, help="port on 127.0.0.1 (shorthand)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464)")
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    parser.add_argument("--probe", action="append", default=None, metavar="DIR",
                        help="probe artifact directory to load (repeatable; default: the probe "
                        "shipped for the embedded model)")
    parser.add_argument("--no-default-probe", action="store_true",
                        help="start with no probe (load them later with LoadProbe)")
    parser.add_argument("--probe-root", action="append", default=None, metavar="DIR",
                        help="a folder LoadProbe may load probes from (repeatable; default: "
                        "LIE_DETECTOR_PROBE_ROOTS, else the folders holding the --probe ones)")
    parser.add_argument("--model", metavar="DIR",
                        help="the served model's folder, to check probes before vLLM connects")
    parser.add_argument("--device", help="torch device for scoring (default: cuda if present)")
    parser.add_argument("--target-fpr", type=float, metavar="RATE",
                        help="false-flag rate to operate verdicts at, e.g. 0.05 (default: the "
                        "rate each probe shipped with; no retraining needed)")
    parser.add_argument("--config", metavar="FILE", help="settings file (.toml, .yaml or .json); "
                        "flags and LIE_DETECTOR_* variables override it")


def _sidecar(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detector.sidecar.app import SettingsError, load_settings, run_sidecar

    overrides: dict = {}
    if args.channel:
        overrides["channel"] = args.channel
    if args.channel_key_file:
        overrides["channel_key_file"] = args.channel_key_file
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
    elif args.no_default_probe:
        overrides["probes"] = []
    if args.probe_root:
        overrides["probe_roots"] = args.probe_root
    if args.model:
        overrides["model_dir"] = args.model
    if args.device:
        overrides["device"] = args.device
    if args.target_fpr is not None:
        overrides["target_fpr"] = args.target_fpr
    from detector.channel.auth import ChannelKeyError
    from detector.channel.subscriber import ChannelError
    from detector.serving.serve import EXIT_CONFIG

    try:
        settings = load_settings(Path(args.config) if args.config else None, **overrides)
        return run_sidecar(settings)
    except (SettingsError, ChannelError, ChannelKeyError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="OpenAI API host")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI API port")
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--metrics-port", type=int, default=9464)
    parser.add_argument("--probe", action="append", default=[], metavar="DIR",
                        help="probe artifact directory (repeatable; default: the probe shipped "
                        "for the embedded model)")
    parser.add_argument("--layers", help="layers to capture, e.g. 8,15,22 (default: the probes' "
                        "layers plus a spread over the middle of the network)")
    parser.add_argument("--channel", help="channel endpoint")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="keep vLLM's prefix caching (cached prompt rows are not captured)")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="run vLLM without torch.compile (default: only where the model "
                        "has no aux-hidden-state outputs and capture needs forward hooks)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", help="vLLM dtype (default: the one the probes were captured "
                        "in, recorded in their metadata)")
    parser.add_argument("--log-dir", help="write each process's output to a file here")
    parser.add_argument("--no-annotate", dest="annotate", action="store_false",
                        help="do not load the OpenAI middleware that puts verdicts in responses "
                        "sent with X-Lie-Detector: annotate")
    parser.add_argument("--target-fpr", type=float, metavar="RATE",
                        help="false-flag rate to operate verdicts at, e.g. 0.05 (default: the "
                        "rate each probe shipped with; no retraining needed)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="after --, extra arguments for vLLM")


def _serve(args: argparse.Namespace) -> int:
    from detector.config import parse_layers
    from detector.models.embedded import resolve_model
    from detector.serving.launch_checks import LaunchError, check_layers
    from detector.model_identity import identify_model
    from detector.serving.serve import EXIT_CONFIG, ServeOptions, Supervisor

    model_dir = resolve_model(args.model)
    model = identify_model(model_dir)
    try:
        probes = _serve_probes(model, [Path(p) for p in args.probe])
        layers = parse_layers(args.layers)
        check_layers(layers or [], model)
        if args.target_fpr is not None and not 0.0 < args.target_fpr < 1.0:
            raise ValueError(f"--target-fpr must be in (0, 1), got {args.target_fpr}")
    except (LaunchError, ValueError) as exc:  # before vLLM starts, in the terminal
        print(f"lie-detector serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    opts = ServeOptions(
        model_dir=model_dir, host=args.host, port=args.port,
        grpc_address=f"127.0.0.1:{args.grpc_port}", metrics_port=args.metrics_port,
        probes=probes,
        layers=layers,
        prefix_caching=args.prefix_caching, enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len, dtype=args.dtype,
        vllm_args=[a for a in args.vllm_args if a != "--"],
        log_dir=Path(args.log_dir) if args.log_dir else None,
        annotate=args.annotate, target_fpr=args.target_fpr,
    )
    if args.channel:
        opts.channel = args.channel
    return Supervisor(opts, model.num_layers).run()


def _serve_probes(model: ModelIdentity, given: list[Path]) -> list[Path]:
    """The probes to serve: every one given must fit the model (else LaunchError, before
    vLLM starts); with none given, the shipped probe where it fits, else none."""
    from detector.artifact import ProbeArtifactError, default_probe_dir
    from detector.serving.launch_checks import LaunchError, probe_misfit

    for path in given:
        try:
            why = probe_misfit(path, model)
        except (ProbeArtifactError, OSError) as exc:
            raise LaunchError(f"cannot read probe {path}: {exc}") from None
        if why:
            raise LaunchError(why)
    if given:
        return given
    shipped = default_probe_dir()
    if shipped is None:
        return []
    if probe_misfit(shipped, model):
        log.warning("the shipped probe is for the embedded model, not %s: serving with no "
                    "probe until one is loaded (train one: docs/your-model.md)", model.name)
        return []
    return [shipped]


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", action="append", default=None, metavar="TEXT",
                        help="ask your own question (repeatable) instead of the built-in mix")
    parser.add_argument("--short", action="store_true", help="three questions, short answers")
    parser.add_argument("--report", default="lie-detector-report.html", metavar="FILE",
                        help="where to write the HTML report")
    parser.add_argument("--probe", metavar="DIR", help="probe artifact (default: the shipped one)")
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the embedded model)")


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detector.cli.demo import run_demo

    return run_demo(model=args.model, questions=args.question, short=args.short,
                    report=Path(args.report), probe=Path(args.probe) if args.probe else None,
                    verbose=args.verbose)


# --- probe training (probes/) ----------------------------------------------------------------


def _quiet_http_logs() -> None:
    for name in ("httpx", "httpcore", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _dataset_list(args: argparse.Namespace) -> int:
    from probes.datasets.registry import TOPICS

    for topic in TOPICS.values():
        print(f"{topic.name:30} {topic.domain:10} {topic.description}")
    return 0


def _dataset_build_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="FILE", help="questions JSONL to write")
    parser.add_argument("--topics", help="comma-separated topics (default: all, see `dataset list`)")
    parser.add_argument("--limit-per-topic", type=int, help="subsample each topic to N questions")
    parser.add_argument("--invented-per-template", type=int, default=30,
                        help="questions per invented-entity template (default 30)")
    parser.add_argument("--seed", type=int, default=0)


def _dataset_build(args: argparse.Namespace) -> int:
    from collections import Counter

    from probes.datasets.registry import build_dataset, write_questions

    topics = [t for t in args.topics.split(",") if t] if args.topics else None
    questions = build_dataset(topics, limit_per_topic=args.limit_per_topic,
                              invented_per_template=args.invented_per_template, seed=args.seed)
    write_questions(questions, args.out)
    for topic, n in sorted(Counter(q.topic for q in questions).items()):
        print(f"{topic:30} {n}")
    print(f"{len(questions)} questions -> {args.out}")
    return 0


def _dataset_validate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a user JSONL file (see docs/training.md)")


def _dataset_validate(args: argparse.Namespace) -> int:
    from collections import Counter

    from probes.datasets.user import UserDataError, load_user_jsonl

    try:
        records = load_user_jsonl(args.file)
    except UserDataError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    labels = Counter(s.label for r in records for s in r.spans)
    print(f"{args.file}: {len(records)} records, "
          + ", ".join(f"{n} {k}" for k, n in sorted(labels.items())))
    return 0


def _refusals_in_one_line(command: str, run: Callable[[], Any]) -> Any:
    """``run()``, or the exit status after printing why capture cannot start: refused before
    vLLM starts (2), or the plugin's own reason, within seconds of start-up (1)."""
    from detector.serving.launch_checks import LaunchError
    from probes.tap import CaptureOffError

    try:
        return run()
    except (LaunchError, CaptureOffError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, LaunchError) else 1


def _capture_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--questions", metavar="FILE", help="questions JSONL from `dataset build`")
    src.add_argument("--user-data", metavar="FILE", help="labelled JSONL in the user format")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="capture directory (resumed if it exists)")
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the embedded model)")
    parser.add_argument("--layers", help="layers to capture (default: derived from the "
                        "model, up to 13 spread from an eighth of the way in to two before the "
                        "top; every 2nd from 4 to 28 on the embedded model)")
    parser.add_argument("--styles", default="plain,chat", help="prompt styles: plain,chat (chat "
                        "is skipped, with a note, for a model without a chat template)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--dtype", help="vLLM --dtype for the server we start (default: vLLM's)")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="start vLLM without torch.compile (default: only where the model "
                        "has no aux-hidden-state outputs and capture needs forward hooks)")
    parser.add_argument("--base-url", help="use a running vLLM server with the plugin instead "
                        "of starting one (also give --channel)")
    parser.add_argument("--channel", help="that server's LIE_DETECTOR_CHANNEL endpoint (this "
                        "command binds it: stop any sidecar on it first)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="after --, extra arguments for the vLLM server this command starts")


def _capture(args: argparse.Namespace) -> int:
    from detector.config import parse_layers
    from detector.models.embedded import resolve_model
    from probes.capture import CaptureSettings, capture_questions, capture_user_records

    _quiet_http_logs()
    model_dir = resolve_model(args.model)
    vllm_args = [a for a in args.vllm_args if a != "--"]
    if vllm_args and args.base_url:
        print("lie-detector capture: vLLM arguments after -- are for the server this command "
              "starts; with --base-url, give them to that server", file=sys.stderr)
        return 2
    settings = CaptureSettings(
        layers=parse_layers(args.layers) or [], styles=[s for s in args.styles.split(",") if s],
        max_tokens=args.max_tokens, concurrency=args.concurrency, dtype=args.dtype,
        enforce_eager=args.enforce_eager, vllm_args=vllm_args,
    )
    common = dict(model_dir=model_dir, settings=settings, base_url=args.base_url,
                  channel=args.channel, progress=not args.no_progress)
    if args.questions:
        from probes.datasets.registry import read_questions

        questions = read_questions(args.questions)
        summary = _refusals_in_one_line("lie-detector capture", lambda: capture_questions(
            questions, Path(args.out), **common))
    else:
        from probes.datasets.user import UserDataError, load_user_jsonl

        try:
            records = load_user_jsonl(args.user_data)
        except UserDataError as exc:
            print(f"{args.user_data}: {exc}", file=sys.stderr)
            return 1
        summary = _refusals_in_one_line("lie-detector capture", lambda: capture_user_records(
            records, Path(args.out), **common))
    if isinstance(summary, int):
        return summary
    print(summary.describe())
    return 0 if summary.incomplete == 0 else 3


def _train_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate-layers", help="layers to choose from (default: all captured)")
    parser.add_argument("--positions", default="producer,own",
                        help="score positions to compare: producer,own")
    parser.add_argument("--Cs", default="0.001,0.01,0.1,1", help="inverse regularisation grid")
    parser.add_argument("--concat-top", type=int, default=2,
                        help="also try the best K layers concatenated (0 = off)")
    parser.add_argument("--cv-scheme", choices=["topics", "domains", "entities"],
                        default="topics", help="selection folds: leave one topic out (default), "
                        "one domain out, or entity-grouped k-fold (the former protocol)")
    parser.add_argument("--cv-folds", type=int, default=5,
                        help="folds of --cv-scheme entities")
    parser.add_argument("--no-topic-balance", action="store_true",
                        help="balance the classes over all spans, not within every topic")
    parser.add_argument("--min-class-spans", type=int, default=20,
                        help="a topic with fewer spans of a class gets that fraction of the "
                        "weight of a full topic")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="fraction of entities held out for the test set")
    parser.add_argument("--calibration", choices=["platt", "isotonic", "none"], default="platt")
    parser.add_argument("--target-fpr", type=float, default=0.10,
                        help="the threshold flags at most this fraction of retrievals")
    parser.add_argument("--token-features", default="",
                        help="hybrid probe: also read the token's logprob,entropy (computed in "
                        "the engine when such a probe is served; default: rows only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cross-topic", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def _train_config(args: argparse.Namespace, name: str):
    from detector.config import parse_layers
    from probes.train import TrainConfig

    return TrainConfig(
        name=name, layers=parse_layers(args.candidate_layers),
        score_positions=[p for p in args.positions.split(",") if p],
        Cs=[float(c) for c in args.Cs.split(",") if c], concat_top=args.concat_top,
        cv_folds=args.cv_folds, cv_scheme=args.cv_scheme,
        topic_balance=not args.no_topic_balance, min_class_spans=args.min_class_spans,
        test_fraction=args.test_fraction, calibration=args.calibration,
        target_fpr=args.target_fpr, seed=args.seed, cross_topic=not args.no_cross_topic,
        token_features=[f for f in args.token_features.split(",") if f],
    )


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capture", required=True, metavar="DIR", help="a capture directory")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="probe directory to write (artifact + report; replaced)")
    parser.add_argument("--name", default="fabrication", help="probe name")
    _train_common_args(parser)


def _train(args: argparse.Namespace) -> int:
    from probes.pipeline import train_from_capture

    _quiet_http_logs()
    result = train_from_capture(args.capture, args.out, config=_train_config(args, args.name),
                                progress=not args.no_progress)
    print(result.summary())
    return 0


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe", required=True, metavar="DIR", help="probe artifact directory")
    parser.add_argument("--capture", required=True, metavar="DIR", help="a capture directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory")
    parser.add_argument("--topics", help="only these topics (comma-separated)")
    parser.add_argument("--fpr", type=float, default=0.10)


def _eval(args: argparse.Namespace) -> int:
    from probes.pipeline import evaluate_probe

    _quiet_http_logs()
    topics = [t for t in args.topics.split(",") if t] if args.topics else None
    metrics = evaluate_probe(args.probe, args.capture, args.out, fpr=args.fpr, topics=topics)
    for name, m in metrics["all"].items():
        if hasattr(m, "auroc"):
            print(f"{name:18} AUROC {m.auroc:.3f}  AUPRC {m.auprc:.3f}  "
                  f"recall@{args.fpr:.0%}FPR {m.recall_at_fpr:.3f}  (n={m.n})")
    print(f"report: {args.out}/report.html")
    return 0


def _evaluate_served_args(parser: argparse.ArgumentParser) -> None:
    from benchmarks.heldout_args import add_arguments

    add_arguments(parser)


def _evaluate_served(args: argparse.Namespace) -> int:
    import shlex

    from benchmarks.heldout_eval import config_from_args, run
    from benchmarks.heldout_report import markdown

    _quiet_http_logs()
    rest = sys.argv[sys.argv.index("evaluate-served") + 1:] if "evaluate-served" in sys.argv \
        else []
    result = run(config_from_args(args), command=" ".join(
        ["lie-detector evaluate-served", *map(shlex.quote, rest)]))
    print(markdown(result))
    print(f"results: {args.out}")
    return 0


def _train_questions_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", metavar="DIR", help="questions and capture (default: "
                        "$LIE_DETECTOR_CACHE or ~/.cache/vllm-lie-detector, /training/<name>)")
    parser.add_argument("--topics", help="comma-separated topics (default: all, see `dataset list`)")
    parser.add_argument("--limit-per-topic", type=int, help="subsample topics (quick runs)")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--styles", default="plain,chat",
                        help="prompt styles to capture: plain,chat,chat_zero_shot,mixed")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier capture")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="start vLLM without torch.compile (default: only where capture "
                        "needs forward hooks)")
    _train_common_args(parser)
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="after --, extra arguments for the vLLM server the capture starts")


def _train_probe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the model folder to train for (`lie-detector model import` makes one)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where the probe and its report go")
    parser.add_argument("--name", help="probe name (default: <model folder>-fabrication)")
    _train_questions_args(parser)


# The recipe of the shipped probe (issue 22): every breadth topic, up to 80 questions each,
# three prompt styles, chosen among four middle layers by leave-one-domain-out selection.
SHIPPED_RECIPE = {"limit_per_topic": 80, "styles": "plain,chat,chat_zero_shot",
                  "candidate_layers": "12,16,20,24", "Cs": "0.001,0.01", "positions": "own",
                  "cv_scheme": "domains"}


def _train_default_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", help="where the probe and its report go "
                        "(default: detector/default_probe/smollm2-135m-fabrication)")
    _train_questions_args(parser)
    parser.set_defaults(**SHIPPED_RECIPE)


def _train_questions(args: argparse.Namespace, model_dir: Path, out: Path, name: str) -> int:
    """Build the built-in dataset, capture the model's answers to it, label and train."""
    import shutil

    from probes.capture import CaptureSettings, capture_questions
    from probes.datasets.registry import build_dataset, write_questions
    from probes.pipeline import default_work_dir, train_from_capture

    _quiet_http_logs()
    work = Path(args.work) if args.work else default_work_dir(name)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    topics = [t for t in (args.topics or "").split(",") if t] or None
    questions = build_dataset(topics, limit_per_topic=args.limit_per_topic, seed=args.seed)
    write_questions(questions, work / "questions.jsonl")
    log.info("%d questions -> %s", len(questions), work / "questions.jsonl")
    settings = CaptureSettings(concurrency=args.concurrency, enforce_eager=args.enforce_eager,
                               styles=[x for x in args.styles.split(",") if x],
                               vllm_args=[a for a in args.vllm_args if a != "--"])
    summary = _refusals_in_one_line("lie-detector", lambda: capture_questions(
        questions, work / "capture", model_dir=model_dir, settings=settings,
        progress=not args.no_progress))
    if isinstance(summary, int):
        return summary
    print(summary.describe())
    result = train_from_capture(work / "capture", out, config=_train_config(args, name),
                                progress=not args.no_progress)
    print(result.summary())
    return 0


def _train_probe(args: argparse.Namespace) -> int:
    from detector.models.embedded import resolve_model

    model_dir = resolve_model(args.model)
    name = args.name or f"{model_dir.name.lower()}-fabrication"
    return _train_questions(args, model_dir, Path(args.out), name)


def _train_default(args: argparse.Namespace) -> int:
    from detector.models.embedded import ensure_embedded_model
    from probes.pipeline import DEFAULT_PROBE_DIR, DEFAULT_PROBE_NAME

    model_dir = ensure_embedded_model(progress=not args.no_progress)
    return _train_questions(args, model_dir, Path(args.out or DEFAULT_PROBE_DIR),
                            DEFAULT_PROBE_NAME)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="start vLLM and the sidecar on the embedded model, ask questions, show flagged "
        "spans live and write an HTML report",
        handler=_demo,
        add_arguments=_demo_args,
    ),
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
        help="models: the embedded default (SmolLM2-135M-Instruct) and imports of others",
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
            "import": Command(
                help="turn a GGUF file or a Hugging Face folder into a verified folder vLLM serves "
                "(idempotent); prints the checks and the folder",
                handler=_model_import,
                add_arguments=_model_import_args,
            ),
        },
    ),
    "dataset": Command(
        help="labelled questions for probe training (knowledge-base builders, user JSONL)",
        subcommands={
            "list": Command(help="list the built-in topics", handler=_dataset_list),
            "build": Command(help="write questions with ground truth to a JSONL file",
                             handler=_dataset_build, add_arguments=_dataset_build_args),
            "validate": Command(help="check a user JSONL file of labelled spans",
                                handler=_dataset_validate, add_arguments=_dataset_validate_args),
        },
    ),
    "capture": Command(
        help="run a dataset through vLLM with the plugin and store the labelled spans' rows",
        handler=_capture,
        add_arguments=_capture_args,
    ),
    "train": Command(
        help="train, evaluate and write a probe artifact with its report from a capture",
        handler=_train,
        add_arguments=_train_args,
    ),
    "eval": Command(
        help="evaluate a probe artifact on a capture against the baselines",
        handler=_eval,
        add_arguments=_eval_args,
    ),
    "evaluate-served": Command(
        help="held-out questions (topics, templates and entities training never sees) through "
        "`serve` in plain, chat and long-form styles; verdicts read back over gRPC; AUROC vs "
        "log-prob baselines and verdict rates (benchmarks/heldout.py)",
        handler=_evaluate_served,
        add_arguments=_evaluate_served_args,
    ),
    "train-probe": Command(
        help="train a fabrication probe for any model folder: build the built-in dataset, "
        "capture the model's answers through vLLM, label them and train (docs/your-model.md)",
        handler=_train_probe,
        add_arguments=_train_probe_args,
    ),
    "train-default": Command(
        help="build the built-in dataset, capture it and train the embedded model's default probe",
        handler=_train_default,
        add_arguments=_train_default_args,
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
    from detector.models.embedded import EmbeddedModelError

    try:
        return int(args.handler(args) or 0)
    except EmbeddedModelError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

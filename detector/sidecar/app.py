"""The sidecar process: channel receiver, fused scoring, result store, gRPC and metrics."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from grpc_health.v1 import health_pb2
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from detector.artifact import ProbeArtifactError, default_probe_dir
from detector.channel.auth import read_key
from detector.channel.subscriber import ChannelSubscriber
from detector.config import default_channel
from detector.model_identity import identify_model
from detector.sidecar.analysis import Analyzer
from detector.sidecar.metrics import SidecarMetrics
from detector.sidecar.pipeline import ScoringPipeline
from detector.sidecar.registry import ProbeRegistry
from detector.sidecar.security import AdminGuard, server_credentials
from detector.sidecar.server import GrpcServer
from detector.sidecar.service import HOOK_HEALTH_NAME, SERVICE_NAME, DetectorService
from detector.sidecar.spans import SPAN_KINDS
from detector.sidecar.streams import RequestStore
from detector.sidecar.telemetry import EvaluationEvents, start_evaluation_events
from detector.sidecar.text import TextDecoder

logger = logging.getLogger(__name__)


class SidecarSettings(BaseSettings):
    """Sidecar configuration.

    Sources, strongest first: command-line flags, ``LIE_DETECTOR_<NAME>`` environment
    variables, a TOML/YAML/JSON file given with ``--config``, defaults.
    """

    model_config = SettingsConfigDict(env_prefix="LIE_DETECTOR_", extra="ignore",
                                      protected_namespaces=())

    channel: str = Field(default_factory=default_channel)
    # With a key file, only an engine presenting the same key may write to the channel
    # (``detector.channel.auth``); without one, any process that can reach the socket may.
    channel_key_file: Path | None = None
    grpc_address: str = "127.0.0.1:50051"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(9464, ge=0, le=65535)
    # Default: the probe shipped for the embedded model; it stays inactive, with the
    # reason, if the engine serves another model.
    probes: list[Path] = Field(default_factory=lambda: [p for p in [default_probe_dir()] if p])
    # LoadProbe reads probes only under these folders (symlinks and ".." resolved first).
    # None: the folders holding the probes above; [] refuses every LoadProbe.
    probe_roots: list[Path] | None = None
    model_dir: Path | None = None  # identifies the served model before vLLM connects
    device: str | None = None
    # Scoring a step is a small GEMM; on the CPU extra threads mostly spin-wait on the cores
    # vLLM needs (benchmarks/overhead.py measures what the sidecar's CPU costs vLLM).
    cpu_threads: int = Field(1, ge=1)
    max_requests: int = Field(10_000, ge=1)
    max_store_bytes: int = Field(512 << 20, ge=1 << 20)
    finished_ttl_s: float = Field(600.0, gt=0)
    # The hook counts as disconnected after this long without a message. It heartbeats
    # every second, but vLLM's start-up compilation can hold the GIL for several seconds.
    hook_timeout_s: float = Field(10.0, gt=0)
    # Requests still running once the engine has run no step for this long have ended
    # (vLLM ends aborted requests, and ones a stop string ended, in a step without tokens,
    # which the hook does not see when the engine goes idle after it); so have requests
    # that lost steps and got no new step for this long (their end was in a lost step).
    engine_idle_s: float = Field(30.0, gt=0)
    span_kinds: list[str] = Field(default_factory=lambda: list(SPAN_KINDS))
    # False-flag rate to operate probes with a verdict model at (each probe's table of
    # operating points gives the threshold); unset: the rate each probe shipped with.
    target_fpr: float | None = Field(None, gt=0.0, lt=1.0)
    max_streams: int = Field(256, ge=1)
    # The most often one stream sends an update; steps in between are batched into it.
    stream_interval_s: float = Field(0.05, ge=0, le=5)
    # How long a stream waits for a request the sidecar has not heard of yet (within the
    # client's deadline): a request can wait in vLLM's queue, and steps behind a backlog.
    stream_appear_wait_s: float = Field(60.0, ge=0, le=3600)
    shutdown_grace_s: float = Field(5.0, ge=0)
    # A gRPC worker thread (a call's CPU work: re-judging an answer, loading a probe) idle
    # this long ends. Open streams hold no thread (detector.sidecar.server); after a burst
    # of calls the workers shrink back to none.
    grpc_idle_thread_s: float = Field(30.0, gt=0, le=3600)
    # TLS for gRPC; with a client CA, mutual TLS (clients must present a cert it signed).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # LoadProbe/UnloadProbe are refused unless one of these allows the caller.
    admin_token: SecretStr | None = None
    admin_identities: list[str] = Field(default_factory=list)
    # OpenTelemetry gen_ai.evaluation.result events, one per finished request per probe
    # (detector.sidecar.telemetry). None: on when an OTLP endpoint is configured
    # (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_LOGS_ENDPOINT); the exporter reads
    # the standard OTEL_* variables for everything else.
    otel_events: bool | None = None
    # At stop, how long queued events may take to export before they are dropped.
    otel_shutdown_timeout_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _tls_complete(self) -> SidecarSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        for path in (self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file/tls_key_file")
        if self.admin_identities and self.tls_client_ca_file is None:
            raise ValueError("admin_identities need mutual TLS (tls_client_ca_file)")
        return self

    @field_validator("grpc_address")
    @classmethod
    def _address(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @field_validator("probes")
    @classmethod
    def _probes_exist(cls, value: list[Path]) -> list[Path]:
        missing = [str(p) for p in value if not p.is_dir()]
        if missing:
            raise ValueError(f"probe directories not found: {', '.join(missing)}")
        return value

    @property
    def load_probe_roots(self) -> list[Path]:
        """The folders LoadProbe may read: ``probe_roots``, else those holding ``probes``."""
        if self.probe_roots is not None:
            return list(self.probe_roots)
        return list(dict.fromkeys(p.resolve().parent for p in self.probes))

    @field_validator("model_dir")
    @classmethod
    def _model_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a model folder (no config.json)")
        return value

    @field_validator("span_kinds")
    @classmethod
    def _span_kinds(cls, value: list[str]) -> list[str]:
        # "word" and "entity" spans were judged before claim spans (detector.claims) replaced
        # them: an older config keeps working, judged on claims.
        old = [k for k in value if k in ("word", "entity")]
        if old:
            logger.warning("span kinds %s are no longer judged; using \"claim\" spans instead "
                           "(docs/design/claims.md)", old)
            value = list(dict.fromkeys("claim" if k in old else k for k in value))
        unknown = sorted(set(value) - set(SPAN_KINDS))
        if unknown:
            raise ValueError(f"unknown span kinds {unknown}; choose from {list(SPAN_KINDS)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        device = torch.device(value)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA device is available")
        return value


class SettingsError(ValueError):
    """Start-up configuration a user must fix; the message says what and where."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> SidecarSettings:
    """Settings from flags (``overrides``), environment and an optional file, validated."""
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {config_file} does not exist")

    class _Settings(SidecarSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                       dotenv_settings, file_secret_settings):  # type: ignore[override]
            sources = [init_settings, env_settings]
            if config_file is not None:
                sources.append(_file_source(settings_cls, config_file))
            return tuple(sources)

    try:
        return _Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            env = f"LIE_DETECTOR_{field.upper()}" if field else ""
            lines.append(f"  {field} ({env}): {err['msg']}")
        raise SettingsError("invalid sidecar settings:\n" + "\n".join(lines)) from None


def _file_source(settings_cls: type[BaseSettings], path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    raise SettingsError(f"config file {path}: use .toml, .yaml or .json")


class Sidecar:
    """Owns every part; ``start`` then ``wait``; ``stop`` is safe from a signal handler."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        # First: a setting to fix is reported before anything binds a socket.
        self.events = _evaluation_events(settings)
        served = identify_model(settings.model_dir) if settings.model_dir else None
        device = torch.device(settings.device) if settings.device else None
        torch.set_num_threads(settings.cpu_threads)
        self.metrics = SidecarMetrics()
        self.registry = ProbeRegistry(served=served, device=device,
                                      target_fpr=settings.target_fpr)
        self.store = RequestStore(max_requests=settings.max_requests,
                                  max_bytes=settings.max_store_bytes,
                                  finished_ttl_s=settings.finished_ttl_s)
        self.registry.on_change.append(self.store.set_columns)
        self.registry.on_change.append(
            lambda columns: self.metrics.init_probe_labels(
                columns.names if columns else (), settings.span_kinds))
        for path in settings.probes:
            try:
                self.registry.load(path)
            except ProbeArtifactError as exc:
                logger.error("probe %s refused: %s", path, exc)
        key = read_key(settings.channel_key_file) if settings.channel_key_file else None
        self.subscriber = ChannelSubscriber(settings.channel, key=key)
        if key is None:
            logger.warning("channel %s has no key (channel_key_file): any process of this "
                           "user that can reach the socket can write steps", settings.channel)
        decoder = TextDecoder.from_model_dir(settings.model_dir) if settings.model_dir else None
        self.analyzer = Analyzer(decoder, settings.span_kinds)
        self.pipeline = ScoringPipeline(self.subscriber, self.registry, self.store, self.metrics,
                                        self.analyzer, hook_timeout_s=settings.hook_timeout_s,
                                        engine_idle_s=settings.engine_idle_s,
                                        events=self.events)
        admin = AdminGuard(
            token=settings.admin_token.get_secret_value() if settings.admin_token else None,
            identities=settings.admin_identities)
        if admin.enabled:
            logger.info("LoadProbe reads probes only under %s (probe_roots)",
                        [str(r) for r in settings.load_probe_roots] or "no folder")
        self.service = DetectorService(self.store, self.registry, self.analyzer,
                                       max_streams=settings.max_streams,
                                       stream_interval_s=settings.stream_interval_s,
                                       appear_wait_s=settings.stream_appear_wait_s,
                                       admin=admin, probe_roots=settings.load_probe_roots)
        credentials = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file,
                                             settings.tls_client_ca_file)
        self.server = GrpcServer(self.service, settings.grpc_address, credentials=credentials,
                                 idle_thread_s=settings.grpc_idle_thread_s)
        self.grpc_port = self.server.port
        self.pipeline.on_hook_state.append(self._hook_health)
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    def _hook_health(self, connected: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if connected
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.set_health(HOOK_HEALTH_NAME, status)

    def start(self) -> None:
        _freeze_start_up_objects()
        self.pipeline.start()
        self.server.start()
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        logger.info("sidecar ready: channel %s, gRPC %s (port %d), metrics %s",
                    self.settings.channel, self.settings.grpc_address, self.grpc_port,
                    self.settings.metrics_port)

    def stop(self) -> None:
        """Graceful: report NOT_SERVING, let streams drain, then stop receiving."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for name in ("", SERVICE_NAME, HOOK_HEALTH_NAME):
            self.server.set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(self.settings.shutdown_grace_s)
        self.pipeline.stop()
        if self.events is not None:  # after scoring stopped: nothing is emitted any more
            self.events.shutdown(self.settings.otel_shutdown_timeout_s)
        self.subscriber.close()
        self._stopped.set()
        logger.info("sidecar stopped")

    def wait(self) -> None:
        self._stopped.wait()


def _freeze_start_up_objects() -> None:
    """What start-up loaded (torch, tokenizer, probes: hundreds of thousands of objects)
    lives as long as the process; frozen, full garbage collections no longer scan it. Under
    256 streams those collections stopped every thread for 0.2-0.4 s, the tail of both the
    health-check latency and the score delay (benchmarks/grpc_threads.py; 0.03-0.06 s
    frozen). Garbage is collected first: nothing collectable is frozen."""
    gc.collect()
    gc.freeze()


def _evaluation_events(settings: SidecarSettings) -> EvaluationEvents | None:
    """OpenTelemetry events if configured. An OTLP protocol with no exporter is a setting to
    fix; any other failure to set up leaves events off and scoring running (fail open)."""
    try:
        return start_evaluation_events(settings.otel_events)
    except ValueError as exc:
        raise SettingsError(f"OpenTelemetry: {exc}") from None
    except Exception:
        logger.exception("OpenTelemetry: could not set up the OTLP log exporter; "
                         "evaluation events are off")
        return None


def run_sidecar(settings: SidecarSettings) -> int:
    sidecar = Sidecar(settings)
    sidecar.start()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: shutting down", signum)
        threading.Thread(target=sidecar.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sidecar.wait()
    return 0

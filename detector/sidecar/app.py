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
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from detector.artifact import ProbeArtifactError
from detector.channel.auth import read_key
from detector.channel.subscriber import ChannelSubscriber
from detector.model_identity import identify_model
from detector.settings import ENV_PREFIX, SidecarSettings
from detector.sidecar.analysis import Analyzer
from detector.sidecar.metrics import SidecarMetrics
from detector.sidecar.pipeline import ScoringPipeline
from detector.sidecar.registry import ProbeRegistry
from detector.sidecar.security import AdminGuard, server_credentials
from detector.sidecar.server import GrpcServer
from detector.sidecar.service import HOOK_HEALTH_NAME, SERVICE_NAME, DetectorService
from detector.sidecar.store import RequestStore
from detector.sidecar.telemetry import EvaluationEvents, start_evaluation_events
from detector.sidecar.text import TextDecoder

logger = logging.getLogger(__name__)


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
            env = f"{ENV_PREFIX}{field.upper()}" if field else ""
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

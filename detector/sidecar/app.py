"""The sidecar process: channel receiver, fused scoring, result store, gRPC and metrics."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from detector.artifact import ProbeArtifactError
from detector.channel.subscriber import ChannelSubscriber
from detector.config import default_channel
from detector.model_identity import identify_model
from detector.sidecar.metrics import SidecarMetrics
from detector.sidecar.pipeline import ScoringPipeline
from detector.sidecar.registry import ProbeRegistry
from detector.sidecar.service import SERVICE_NAME, DetectorService, build_server
from detector.sidecar.streams import RequestStore

logger = logging.getLogger(__name__)


class SidecarSettings(BaseSettings):
    """Sidecar configuration; every field can also be set as ``LIE_DETECTOR_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LIE_DETECTOR_", extra="ignore",
                                      protected_namespaces=())

    channel: str = Field(default_factory=default_channel)
    grpc_address: str = "127.0.0.1:50051"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(9464, ge=0, le=65535)
    probes: list[Path] = Field(default_factory=list)
    model_dir: Path | None = None  # identifies the served model before vLLM connects
    device: str | None = None
    max_requests: int = Field(10_000, ge=1)
    max_store_bytes: int = Field(512 << 20, ge=1 << 20)
    finished_ttl_s: float = Field(600.0, gt=0)
    heartbeat_s: float = Field(1.0, gt=0)
    shutdown_grace_s: float = Field(5.0, ge=0)


class Sidecar:
    """Owns every part; ``start`` then ``wait``; ``stop`` is safe from a signal handler."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        served = identify_model(settings.model_dir) if settings.model_dir else None
        device = torch.device(settings.device) if settings.device else None
        self.metrics = SidecarMetrics()
        self.registry = ProbeRegistry(served=served, device=device)
        self.store = RequestStore(max_requests=settings.max_requests,
                                  max_bytes=settings.max_store_bytes,
                                  finished_ttl_s=settings.finished_ttl_s)
        self.registry.on_change.append(self.store.set_columns)
        for path in settings.probes:
            try:
                self.registry.load(path)
            except ProbeArtifactError as exc:
                self.metrics.probe_load_failures.inc()
                logger.error("probe %s refused: %s", path, exc)
        self.subscriber = ChannelSubscriber(settings.channel)
        self.pipeline = ScoringPipeline(self.subscriber, self.registry, self.store, self.metrics,
                                        heartbeat_s=settings.heartbeat_s)
        self.service = DetectorService(self.store, self.registry)
        self.server, self.health, self.grpc_port = build_server(self.service,
                                                                settings.grpc_address)
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    def start(self) -> None:
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
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(self.settings.shutdown_grace_s).wait()
        self.pipeline.stop()
        self.subscriber.close()
        self._stopped.set()
        logger.info("sidecar stopped")

    def wait(self) -> None:
        self._stopped.wait()


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

"""Every environment variable the project reads, declared and documented in one place.

The engine hook runs inside vLLM's processes, where the only way in is the environment;
the sidecar, the OpenAI middleware, training and the test suite read a few variables
too. Each variable is a typed field of one class here (its description is its only
documentation, its default is the field's), so a reader finds them all in one file and
``variables()`` lists them; ``tests/unit/test_settings_module.py`` fails if a module
anywhere else reads a ``LIE_DETECTOR_*`` variable itself.

A few defaults and checks need heavy modules (torch, the probe artifact, the sidecar's
span kinds); they are imported where used, because cheap callers (the embedded model's
folder, ``lie-detector serve`` resolving its model) import this module too.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from detector.serving.client import TLSConfig

logger = logging.getLogger(__name__)

ENV_PREFIX = "LIE_DETECTOR_"
ANNOTATE_ENV_PREFIX = "LIE_DETECTOR_ANNOTATE_"
DEFAULT_CACHE = Path("~/.cache/vllm-lie-detector")


def runtime_dir() -> Path:
    """Where per-user sockets and keys go: ``$XDG_RUNTIME_DIR``, else the temp folder."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


def default_channel() -> str:
    """An IPC endpoint in a per-user directory that only its owner can enter."""
    return f"ipc://{runtime_dir() / f'lie-detector-{os.getuid()}' / 'channel.sock'}"


def parse_layers(value: str | list[int] | None) -> list[int] | None:
    """``"8,15,22"`` -> ``[8, 15, 22]`` (sorted, unique); empty -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(" ", ",").split(",") if p.strip()]
        if not parts:
            return None
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"layers must be integers separated by commas, got {value!r}")
    return sorted(set(int(v) for v in value))


# ---------------------------------------------------------------------------- shared


class ChannelSettings(BaseSettings):
    """The channel between hook and sidecar: one ``LIE_DETECTOR_CHANNEL`` wires the two
    together, so both read these two variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    channel: str = Field(default_factory=default_channel, description=(
        "ZeroMQ endpoint of the step channel; default "
        "ipc://$XDG_RUNTIME_DIR/lie-detector-<uid>/channel.sock (the temp folder without "
        "XDG_RUNTIME_DIR)."))
    channel_key_file: Path | None = Field(default=None, description=(
        "The deployment's channel key (detector.channel.auth): the hook presents it, the "
        "sidecar accepts only an engine presenting it. Unset: any process that can reach "
        "the socket may write steps."))


# ---------------------------------------------------------------------------- the hook


class HookSettings(ChannelSettings):
    """What the in-engine hook does. Every field is ``LIE_DETECTOR_<NAME>``."""

    disable: bool = Field(default=False, description="Turn the plugin off completely.")
    layers: str | None = Field(default=None, description=(
        "Layers to capture, e.g. \"8,15,22\"; unset: a default spread of layers chosen for "
        "the model at load time."))
    queue_steps: int = Field(default=1024, ge=1, le=65536, description=(
        "Steps the hook's queue holds before it drops steps (and says so)."))
    queue_bytes: int = Field(default=256 << 20, ge=1 << 16, description=(
        "Bytes the hook's queue holds before it drops steps."))
    heartbeat_s: float = Field(default=1.0, gt=0, le=60, description=(
        "Seconds between the hook's heartbeats to the sidecar."))
    token_features: str | None = Field(default=None, description=(
        "Per-token features computed from each step's logits for hybrid probes, e.g. "
        "\"logprob,entropy\" (lie-detector serve sets it from the probes' declarations); "
        "unset computes nothing."))

    @field_validator("channel_key_file", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        # In the engine an empty value has always meant "no key" (the sidecar refuses it).
        return None if value == "" else value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: str | None) -> str | None:
        parse_layers(value)
        return value

    @field_validator("token_features")
    @classmethod
    def _check_token_features(cls, value: str | None) -> str | None:
        from detector.engine.token_features import parse_token_features

        parse_token_features(value)
        return value

    @property
    def token_feature_list(self) -> list[str]:
        from detector.engine.token_features import parse_token_features

        return parse_token_features(self.token_features)

    @property
    def layer_list(self) -> list[int] | None:
        return parse_layers(self.layers)


# ---------------------------------------------------------------------------- the sidecar


def _default_probes() -> list[Path]:
    from detector.artifact import default_probe_dir

    return [p for p in [default_probe_dir()] if p]


def _default_span_kinds() -> list[str]:
    from detector.sidecar.spans import SPAN_KINDS

    return list(SPAN_KINDS)


class SidecarSettings(ChannelSettings):
    """Sidecar configuration.

    Sources, strongest first: command-line flags, ``LIE_DETECTOR_<NAME>`` environment
    variables, a TOML/YAML/JSON file given with ``--config`` (``detector.sidecar.app.
    load_settings``), defaults.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      protected_namespaces=())

    grpc_address: str = Field(default="127.0.0.1:50051", description="gRPC listen address, host:port.")
    metrics_host: str = Field(default="127.0.0.1", description="Prometheus metrics listen host.")
    metrics_port: int | None = Field(default=9464, ge=0, le=65535, description=(
        "Prometheus metrics port; null serves no metrics."))
    probes: list[Path] = Field(default_factory=_default_probes, description=(
        "Probe folders loaded at start; default: the probe shipped for the embedded model "
        "(it stays inactive, with the reason, if the engine serves another model)."))
    probe_roots: list[Path] | None = Field(default=None, description=(
        "LoadProbe reads probes only under these folders (symlinks and \"..\" resolved "
        "first); unset: the folders holding the probes above; [] refuses every LoadProbe."))
    model_dir: Path | None = Field(default=None, description=(
        "The served model's folder: identifies the model before vLLM connects and decodes "
        "text for claim spans."))
    device: str | None = Field(default=None, description=(
        "Torch device the probes score on; unset: CUDA when available, else CPU."))
    cpu_threads: int = Field(default=1, ge=1, description=(
        "Torch threads. Scoring a step is a small GEMM; on the CPU extra threads mostly "
        "spin-wait on the cores vLLM needs (benchmarks/overhead.py measures the cost)."))
    max_requests: int = Field(default=10_000, ge=1, description="Requests the result store keeps.")
    max_store_bytes: int = Field(default=512 << 20, ge=1 << 20, description=(
        "Bytes the result store keeps."))
    finished_ttl_s: float = Field(default=600.0, gt=0, description=(
        "Seconds a finished request's scores are kept."))
    hook_timeout_s: float = Field(default=10.0, gt=0, description=(
        "The hook counts as disconnected after this long without a message. It heartbeats "
        "every second, but vLLM's start-up compilation can hold the GIL for seconds."))
    engine_idle_s: float = Field(default=30.0, gt=0, description=(
        "Requests still running once the engine has run no step for this long have ended "
        "(vLLM ends aborted and stop-string requests in a step without tokens, which the "
        "hook does not see when the engine goes idle after it); so have requests that lost "
        "steps and got no new step for this long."))
    span_kinds: list[str] = Field(default_factory=_default_span_kinds, description=(
        "Span kinds judged: \"claim\" and \"sentence\" (default both)."))
    target_fpr: float | None = Field(default=None, gt=0.0, lt=1.0, description=(
        "False-flag rate to operate probes with a verdict model at (each probe's table of "
        "operating points gives the threshold); unset: the rate each probe shipped with."))
    max_streams: int = Field(default=256, ge=1, description=(
        "Open streams at most, and as many calls waiting for a request's end: bounds the "
        "re-judging work and memory open calls can ask for (they hold no thread)."))
    stream_interval_s: float = Field(default=0.05, ge=0, le=5, description=(
        "The most often one stream sends an update; steps in between are batched into it."))
    stream_appear_wait_s: float = Field(default=60.0, ge=0, le=3600, description=(
        "How long a stream waits for a request the sidecar has not heard of yet (within "
        "the client's deadline): a request can wait in vLLM's queue, and steps behind a "
        "backlog."))
    shutdown_grace_s: float = Field(default=5.0, ge=0, description=(
        "At stop, seconds running gRPC calls get to finish before they are cancelled."))
    grpc_idle_thread_s: float = Field(default=30.0, gt=0, le=3600, description=(
        "A gRPC worker thread (a call's CPU work: re-judging an answer, loading a probe) idle "
        "this long ends. Open streams hold no thread (detector.sidecar.server); after a burst "
        "of calls the workers shrink back to none."))
    tls_cert_file: Path | None = Field(default=None, description=(
        "gRPC TLS certificate (PEM); with tls_key_file."))
    tls_key_file: Path | None = Field(default=None, description="gRPC TLS private key (PEM).")
    tls_client_ca_file: Path | None = Field(default=None, description=(
        "Mutual TLS: clients must present a certificate this CA signed."))
    admin_token: SecretStr | None = Field(default=None, description=(
        "Bearer token that allows LoadProbe/UnloadProbe (refused unless this or "
        "admin_identities allows the caller)."))
    admin_identities: list[str] = Field(default_factory=list, description=(
        "mTLS client identities allowed LoadProbe/UnloadProbe (needs tls_client_ca_file); "
        "default none."))
    otel_events: bool | None = Field(default=None, description=(
        "OpenTelemetry gen_ai.evaluation.result events, one per finished request per probe "
        "(detector.sidecar.telemetry); unset: on when an OTLP endpoint is configured "
        "(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_LOGS_ENDPOINT). The exporter "
        "reads the standard OTEL_* variables for everything else."))
    otel_shutdown_timeout_s: float = Field(default=5.0, ge=0, description=(
        "At stop, how long queued events may take to export before they are dropped."))

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
        from detector.sidecar.spans import SPAN_KINDS

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
        import torch

        device = torch.device(value)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA device is available")
        return value


# ---------------------------------------------------------------------------- the middleware


class AnnotateSettings(BaseSettings):
    """The OpenAI middleware (``detector.serving.openai_middleware``). Every field is
    ``LIE_DETECTOR_ANNOTATE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ANNOTATE_ENV_PREFIX, extra="ignore")

    grpc_address: str = Field(default="127.0.0.1:50051", description=(
        "The sidecar's gRPC address (lie-detector serve sets it)."))
    timeout_s: float = Field(default=2.0, gt=0, le=60, description=(
        "The longest an annotated response waits for final scores after vLLM finished it."))
    disable: bool = Field(default=False, description=(
        "Annotate nothing (every request passes straight through)."))
    tls: bool = Field(default=False, description=(
        "TLS to the sidecar (its default is plaintext on loopback) with the system's roots; "
        "the tls_* files below turn it on too."))
    tls_root_certificates: Path | None = Field(default=None, description=(
        "PEM roots that verify the sidecar's certificate."))
    tls_client_cert: Path | None = Field(default=None, description=(
        "PEM client certificate, for a sidecar that asks for mutual TLS."))
    tls_client_key: Path | None = Field(default=None, description="PEM key of tls_client_cert.")
    tls_server_name: str | None = Field(default=None, description=(
        "Name the sidecar's certificate is checked against, where it is not the address's."))

    def tls_config(self) -> TLSConfig | None:
        if not (self.tls or self.tls_root_certificates or self.tls_client_cert):
            return None
        from detector.serving.client import TLSConfig

        return TLSConfig(root_certificates=self.tls_root_certificates,
                         client_cert=self.tls_client_cert, client_key=self.tls_client_key,
                         server_name=self.tls_server_name)


# ---------------------------------------------------------------------------- storage


class StorageSettings(BaseSettings):
    """Where the project keeps what it builds for the user."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      env_ignore_empty=True)

    cache: Path | None = Field(default=None, description=(
        "Folder for the converted embedded model (models/), training work (training/) and "
        "cached launch checks; default ~/.cache/vllm-lie-detector."))


def cache_dir() -> Path:
    """``$LIE_DETECTOR_CACHE`` (``~`` expanded), else ``~/.cache/vllm-lie-detector``."""
    return (StorageSettings().cache or DEFAULT_CACHE).expanduser()


# ---------------------------------------------------------------------------- the test suite


class SuiteSettings(BaseSettings):
    """Knobs of the long-running tests (tests/reliability): how long and how hard."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    soak_s: float = Field(default=90.0, gt=0, description="Seconds the soak test generates for.")
    soak_concurrency: int = Field(default=12, ge=1, description=(
        "Concurrent generations in the soak test."))
    soak_streams: int = Field(default=3, ge=0, description=(
        "Concurrent StreamScores clients in the soak test."))
    soak_results: Path | None = Field(default=None, description=(
        "Where the soak test writes its measurements (JSON); unset: a temporary file."))
    channel_fuzz: int = Field(default=10_000, ge=1, description=(
        "Hostile messages the channel fuzz test sends."))
    fuzz_examples: int = Field(default=200, ge=1, description=(
        "Hypothesis examples per gRPC fuzz test."))


# ---------------------------------------------------------------------------- the table


SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (
    HookSettings, SidecarSettings, AnnotateSettings, StorageSettings, SuiteSettings)


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, the class that reads it, its type, default
    (in words for a computed one) and description."""

    name: str
    owner: str
    type: str
    default: str
    description: str


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` of ``cls``."""
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def variables() -> Iterator[Variable]:
    """Every variable once, in declaration order (a field shared through a base class is
    listed under the class that declares it)."""
    seen: set[str] = set()
    for cls in SETTINGS_CLASSES:
        for field, info in cls.model_fields.items():
            name = env_name(cls, field)
            if name in seen:
                continue
            seen.add(name)
            owner = next(c for c in reversed(cls.__mro__)
                         if field in c.__dict__.get("__annotations__", {}))
            default = ("computed" if info.default_factory is not None
                       else "unset" if info.default is None else repr(info.default))
            kind = info.annotation
            yield Variable(name=name, owner=owner.__name__,
                           type=kind.__name__ if isinstance(kind, type) else str(kind),
                           default=default, description=info.description or "")


__all__ = ["ANNOTATE_ENV_PREFIX", "AnnotateSettings", "ChannelSettings", "DEFAULT_CACHE",
           "ENV_PREFIX", "HookSettings", "SETTINGS_CLASSES", "SidecarSettings",
           "StorageSettings", "SuiteSettings", "Variable", "cache_dir", "default_channel",
           "env_name", "parse_layers", "runtime_dir", "variables"]

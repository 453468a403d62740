"""OpenTelemetry ``gen_ai.evaluation.result`` events: one per finished request per probe.

Off unless an OTLP endpoint is configured with the standard variables
(``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``), or the sidecar
setting ``otel_events`` says otherwise. While off, nothing of OpenTelemetry is imported and
nothing is started. While on, events go through the OpenTelemetry SDK's logs API to its
OTLP exporter behind a ``BatchLogRecordProcessor``: emitting one only appends it to the
processor's bounded queue; a worker thread exports, so a slow or absent collector never
holds up scoring (the queue drops its oldest records when full).

Each event follows the GenAI semantic conventions' ``gen_ai.evaluation.result`` event (the
sidecar has no span of the generation to parent it to, so it names the response by
``gen_ai.response.id``), with the probe as the evaluation:

=====================================  =================================================
``gen_ai.evaluation.name``             probe name
``gen_ai.evaluation.score.value``      the response verdict's score: the highest claim
                                       score (absent when no claim was judged)
``gen_ai.evaluation.score.label``      ``flagged`` (a claim reached the probe's
                                       threshold) or ``not_flagged``
``gen_ai.evaluation.explanation``      how many claims reached the threshold (counts only)
``gen_ai.response.id``                 the response id the API client got (``cmpl-X``,
                                       ``chatcmpl-X``)
``error.type``                         ``no_verdict`` when there is none (the sidecar has
                                       no tokenizer to find claims with); else absent
``lie_detector.request.x_request_id``  ``X``: the X-Request-Id the response id was built
                                       from (vLLM's random id when the client sent none)
``lie_detector.request.engine_id``     the engine's unique id of the request
``lie_detector.request.prompt_index``  /v1/completions: which prompt of the request
``lie_detector.request.state``         ``FINISHED`` or ``INCOMPLETE`` (rows were lost)
``lie_detector.request.incomplete_reason``  why, when incomplete
``lie_detector.probe.threshold``       the probe's threshold
``lie_detector.claims``                claims judged
``lie_detector.flagged_claims``        claims that reached the threshold
=====================================  =================================================

The values are the ones ``GetScores`` returns for the request. No prompt or generated text
is ever part of an event: only ids, the probe's name, numbers and fixed words.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from detector import __version__
from detector.log_throttle import LogThrottle
from detector.channel.ids import client_ids

if TYPE_CHECKING:
    from detector.claims import ResponseVerdict
    from detector.sidecar.views import RequestAnalysis

logger = logging.getLogger(__name__)

EVENT_NAME = "gen_ai.evaluation.result"
SCOPE_NAME = "detector.sidecar"
DEFAULT_SERVICE_NAME = "lie-detector-sidecar"
LABEL_FLAGGED = "flagged"
LABEL_NOT_FLAGGED = "not_flagged"
PROTOCOLS = ("grpc", "http/protobuf")

def evaluation_attributes(analysis: RequestAnalysis, probe: str, threshold: float,
                          verdict: ResponseVerdict | None) -> dict[str, Any]:
    """The attributes of one probe's event for a finished request (no text of it)."""
    record = analysis.record
    ids = client_ids(record.req_id)
    attrs: dict[str, Any] = {
        "gen_ai.evaluation.name": probe,
        "gen_ai.response.id": ids.response_id,
        "lie_detector.request.engine_id": record.req_id,
        "lie_detector.request.state": "INCOMPLETE" if record.incomplete else "FINISHED",
        "lie_detector.probe.threshold": float(threshold),
    }
    if ids.x_request_id is not None:
        attrs["lie_detector.request.x_request_id"] = ids.x_request_id
    if ids.prompt_index is not None:
        attrs["lie_detector.request.prompt_index"] = ids.prompt_index
    if record.incomplete:
        attrs["lie_detector.request.incomplete_reason"] = record.incomplete
    if verdict is None:
        attrs["error.type"] = "no_verdict"
        attrs["gen_ai.evaluation.explanation"] = (
            "no verdict: the sidecar has no tokenizer to find claims with"
            if analysis.decoded is None else "no verdict")
        return attrs
    attrs["gen_ai.evaluation.score.label"] = LABEL_FLAGGED if verdict.flagged else LABEL_NOT_FLAGGED
    if not math.isnan(verdict.score):
        attrs["gen_ai.evaluation.score.value"] = float(verdict.score)
    attrs["lie_detector.claims"] = verdict.claims
    attrs["lie_detector.flagged_claims"] = verdict.flagged_claims
    attrs["gen_ai.evaluation.explanation"] = (
        f"{verdict.flagged_claims} of {verdict.claims} claims reached the threshold "
        f"{verdict.threshold:.4g}" if verdict.claims else "no claim was found to judge")
    return attrs


# ----------------------------------------------------------------------- configuration
def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def endpoint_configured(environ: Mapping[str, str]) -> bool:
    return bool(_env(environ, "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
                or _env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT"))


def events_wanted(setting: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to emit: ``setting`` (``otel_events``) if given, else when an OTLP endpoint
    is configured and ``OTEL_LOGS_EXPORTER`` is not ``none``; never with
    ``OTEL_SDK_DISABLED=true``."""
    env = os.environ if environ is None else environ
    if _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return False
    if setting is not None:
        return setting
    if _env(env, "OTEL_LOGS_EXPORTER").lower() == "none":
        return False
    return endpoint_configured(env)


def otlp_protocol(environ: Mapping[str, str] | None = None) -> str:
    """``OTEL_EXPORTER_OTLP_LOGS_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else
    ``grpc``; ValueError for one the sidecar has no exporter for."""
    env = os.environ if environ is None else environ
    protocol = (_env(env, "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL")
                or _env(env, "OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported; use one of "
                         f"{', '.join(PROTOCOLS)}")
    return protocol


def otlp_log_exporter(protocol: str) -> Any:
    """The SDK's OTLP log exporter for ``protocol``; it reads endpoint, headers, TLS,
    compression and timeout from the ``OTEL_EXPORTER_OTLP_*`` variables itself."""
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (
            OTLPLogExporter as HttpLogExporter,
        )
        return HttpLogExporter()
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    return OTLPLogExporter()


# ----------------------------------------------------------------------------- events
class EvaluationEvents:
    """Emits the events; ``shutdown`` exports what is queued (bounded in time)."""

    def __init__(self, exporter: Any, *, resource: Any = None,
                 schedule_delay_millis: float | None = None) -> None:
        from opentelemetry._logs import SeverityNumber
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource

        if resource is None:
            resource = Resource.create()
            # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; the SDK's fallback does not.
            if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
                resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        # Not the global provider: the sidecar owns this one and shuts it down at stop.
        self._provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_log_record_processor(
            BatchLogRecordProcessor(exporter, schedule_delay_millis=schedule_delay_millis))
        self._logger = self._provider.get_logger(SCOPE_NAME, __version__)
        self._severity = SeverityNumber.INFO
        self._errors = LogThrottle()
        self.emitted = 0
        self.failed = 0
        self._closed = False

    def request_finished(self, analysis: RequestAnalysis, probes: Sequence[str],
                         thresholds: Sequence[float]) -> int:
        """One event per probe for a finished request; returns how many were emitted.
        Never raises: a failure is counted and logged (at most every few seconds)."""
        if self._closed:
            return 0
        sent = 0
        try:
            verdicts = {v.probe: v for v in analysis.responses}
            for probe, threshold in zip(probes, thresholds):
                attrs = evaluation_attributes(analysis, probe, threshold, verdicts.get(probe))
                self._logger.emit(event_name=EVENT_NAME, attributes=attrs,
                                  severity_number=self._severity)
                sent += 1
        except Exception:  # telemetry must never disturb scoring
            self.failed += 1
            if self._errors.ready():
                logger.exception("OpenTelemetry: could not emit evaluation events "
                                 "(%d failures so far)", self.failed)
        self.emitted += sent
        return sent

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued and stop; gives up after ``timeout_s`` (a collector that
        does not answer must not hold up the sidecar's exit). True if it finished."""
        if self._closed:
            return True
        self._closed = True
        done = threading.Event()

        def run() -> None:
            try:
                self._provider.shutdown()
            except Exception:
                logger.exception("OpenTelemetry: shutdown failed")
            finally:
                done.set()

        threading.Thread(target=run, name="otel-shutdown", daemon=True).start()
        if not done.wait(timeout_s):
            logger.warning("OpenTelemetry: events still queued after %.1f s at shutdown "
                           "were dropped", timeout_s)
            return False
        return True


def start_evaluation_events(setting: bool | None,
                            environ: Mapping[str, str] | None = None) -> EvaluationEvents | None:
    """The events emitter if wanted (:func:`events_wanted`), else None, importing nothing
    of OpenTelemetry. ValueError for an OTLP protocol the sidecar cannot export with."""
    env = os.environ if environ is None else environ
    if not events_wanted(setting, env):
        return None
    protocol = otlp_protocol(env)
    events = EvaluationEvents(otlp_log_exporter(protocol))
    endpoint = (_env(env, "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
                or _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT") or "the exporter's default")
    logger.info("OpenTelemetry: %s events go to %s over OTLP/%s", EVENT_NAME, endpoint,
                protocol)
    return events

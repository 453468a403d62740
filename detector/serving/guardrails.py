"""A NeMo Guardrails output rail over the typed client: fail a response whose claims the probes flag.

    from nemoguardrails import LLMRails, RailsConfig
    from detector.serving.guardrails import COLANG_FLOW, FLOW_NAME, register

    config = RailsConfig.from_content(colang_content=COLANG_FLOW,
                                      yaml_content=f"rails:\\n  output:\\n    flows: [{FLOW_NAME}]")
    rails = register(LLMRails(config), "127.0.0.1:50051")
    # The response id (vLLM's X-Request-Id or chatcmpl id) reaches the action as a context variable:
    rails.generate(messages=[{"role": "context", "content": {"response_id": "chatcmpl-123"}}, ...])

The action asks the sidecar for the response's scores (waiting for it to finish), and maps each
flagged claim span onto the text being checked (``bot_message``) as an :class:`ErrorSpan`.
Only :mod:`register` needs ``nemoguardrails`` (``pip install -e .[guardrails]`` plus
``nemoguardrails --no-deps``, see scripts/setup.sh); the rest imports without it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import grpc

from detector.serving.client import AsyncDetectorClient, DetectorError, Scores, TLSConfig
from detector.serving.openai_middleware import place_spans

__all__ = ["ACTION_NAME", "COLANG_FLOW", "FLOW_NAME", "ErrorSpan", "RailResult",
           "error_spans", "make_action", "register"]

log = logging.getLogger(__name__)

ACTION_NAME = "lie_detector_check"
FLOW_NAME = "lie detector check"
# Colang 1.0: stop the response (with a refusal) when the action does not pass it.
COLANG_FLOW = f"""
define bot inform possible hallucination
  "I am not confident in parts of that answer, so I will not state it."

define flow {FLOW_NAME}
  $lie_detector = execute {ACTION_NAME}
  if not $lie_detector.passed
    bot inform possible hallucination
    stop
"""


@dataclass(frozen=True)
class ErrorSpan:
    """A flagged claim, as character offsets [start, end) into the checked text."""

    start: int
    end: int
    reason: str


@dataclass(frozen=True)
class RailResult:
    passed: bool
    error_spans: tuple[ErrorSpan, ...] = ()
    # Set when the sidecar could not answer (the pass/fail then follows ``fail_closed``).
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ScoresSource(Protocol):
    async def get_scores(self, request_id: str, *, wait_until_finished: bool = False,
                         timeout: float | None = None) -> Scores: ...


def error_spans(value: str, scores: Scores) -> tuple[ErrorSpan, ...]:
    """The flagged claim spans placed on ``value`` as the OpenAI middleware places them
    (:func:`detector.serving.openai_middleware.place_spans`): at the sidecar's offsets when the
    text there is the span's, else at the occurrence of the span's text nearest them; dropped
    otherwise."""
    flagged = [s for s in scores.flagged_spans if s.kind == "claim" and s.text]
    placed, dropped = place_spans(flagged, scores.text, value)
    if dropped:
        log.warning("%d flagged span(s) not found in the checked text; dropped", dropped)
    return tuple(ErrorSpan(s.char_start, s.char_end,
                           f"{s.probe}: score {s.score:.2f} >= threshold {s.threshold:.2f}")
                 for s in placed)


def make_action(address: str, *, tls: TLSConfig | bool | None = None,
                admin_token: str | None = None, timeout: float = 300.0,
                fail_closed: bool = False, client: ScoresSource | None = None,
                ) -> Callable[..., Awaitable[dict[str, Any]]]:
    """The output-rail action. ``fail_closed`` decides a response the sidecar cannot score
    (down, unknown id, timeout, no ``response_id``): False (default) passes it with a warning,
    as the detector is an advisory check beside the server and its outage must not take
    generation down with it; True fails it. ``client`` replaces the per-call client (tests)."""

    async def check(context: dict[str, Any] | None = None) -> dict[str, Any]:
        context = context or {}
        text = str(context.get("bot_message") or "")
        response_id = str(context.get("response_id") or "")
        try:
            if not response_id:
                raise DetectorError(grpc.StatusCode.INVALID_ARGUMENT, "no response_id in the rail's context")
            if client is not None:
                scores = await client.get_scores(response_id, wait_until_finished=True,
                                                 timeout=timeout)
            else:
                async with AsyncDetectorClient(address, tls=tls, admin_token=admin_token,
                                               timeout=timeout) as own:
                    scores = await own.get_scores(response_id, wait_until_finished=True,
                                                  timeout=timeout)
        except DetectorError as exc:
            log.warning("lie detector could not score %r (%s): %s", response_id,
                        "failing it" if fail_closed else "passing it", exc)
            return RailResult(passed=not fail_closed, error=str(exc)).as_dict()
        spans = error_spans(text, scores)
        return RailResult(passed=not spans, error_spans=spans).as_dict()

    return check


def register(rails: Any, address: str, **options: Any) -> Any:
    """Registers the action (``make_action(address, **options)``) on an ``LLMRails``."""
    from nemoguardrails.actions import action  # the optional dependency

    fn = make_action(address, **options)
    action(name=ACTION_NAME)(fn)
    rails.register_action(fn, name=ACTION_NAME)
    return rails

"""Channel -> fused probes -> result store, in one receiver thread.

One step is one matrix product: the rows worth scoring (last prompt row and generated
rows) of every request in the step, through every active probe at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import CaptureStatus, Heartbeat, Message, StepHeader
from detector.log_throttle import LogThrottle
from detector.sidecar.accounting import FinishAccounting
from detector.sidecar.analysis import Analyzer
from detector.sidecar.metrics import SidecarMetrics
from detector.sidecar.registry import ProbeRegistry
from detector.sidecar.scores import rows_to_score
from detector.sidecar.store import RequestStore
from detector.sidecar.telemetry import EvaluationEvents

logger = logging.getLogger(__name__)

RECV_S = 0.25  # one receive's wait: the loop's pace while no message comes


class ScoringPipeline:
    def __init__(
        self,
        subscriber: ChannelSubscriber,
        registry: ProbeRegistry,
        store: RequestStore,
        metrics: SidecarMetrics,
        analyzer: Analyzer,
        *,
        hook_timeout_s: float = 10.0,
        engine_idle_s: float = 30.0,
        events: EvaluationEvents | None = None,
    ) -> None:
        self.subscriber = subscriber
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.analyzer = analyzer
        # OpenTelemetry gen_ai.evaluation.result events per finished request (None: off).
        self.events = events
        self.hook_timeout_s = hook_timeout_s
        # Running requests are taken as ended once the engine has run no step for this long
        # (by the engine's clock: see RequestStore.engine_quiet_s).
        self.engine_idle_s = engine_idle_s
        self.heard = False  # any message from the hook yet
        # Time spent listening since the last message. Wall time since it would also count
        # a stall of the sidecar itself, after which the hook's messages are waiting unread.
        self.silent_s = 0.0
        self._rejected_seen = 0
        self._refused_seen = 0
        self._without_info_seen = 0
        self._shares_refused_seen = 0
        self._hook_state: bool | None = None
        # Called with True/False when the hook is first heard from / falls silent.
        self.on_hook_state: list[Callable[[bool], None]] = []
        self._load_failures_seen = 0
        self._stale_refused = 0
        self._stale_log = LogThrottle()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scoring-pipeline", daemon=True)
        # Finished requests are judged and counted on a thread of their own.
        self.accounting = FinishAccounting(self._account)

    def start(self) -> None:
        self.accounting.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.accounting.stop()

    @property
    def hook_connected(self) -> bool:
        return self.heard and self.silent_s < self.hook_timeout_s

    def listened(self, seconds: float) -> None:
        """The receive loop waited ``seconds`` for a message and none came."""
        self.silent_s += seconds

    def _run(self) -> None:
        last_housekeeping = time.monotonic()
        while not self._stop.is_set():
            t0 = time.monotonic()
            message = self.subscriber.recv(timeout_s=RECV_S)
            if message is None:
                # A receive that took far longer than its wait was itself stalled: count
                # only what it could have listened for.
                self.listened(min(time.monotonic() - t0, 2 * RECV_S))
            else:
                try:
                    self.handle(message)
                except Exception:  # a bad step must not stop scoring
                    logger.exception("failed to score a step; continuing")
            now = time.monotonic()
            if now - last_housekeeping > 1.0:
                self._housekeeping()
                last_housekeeping = now

    def handle(self, message: Message) -> None:
        header, rows = message
        if isinstance(header, CaptureStatus):
            self._capture_status(header)
            return
        self.heard = True
        self.silent_s = 0.0
        engine = header.engine
        # A decoded step always has its engine's info (carried, or the one its id refers to).
        assert engine is not None
        self.registry.attach_engine(engine)
        self.analyzer.ensure_decoder(engine.model_path)
        self.metrics.engine_dropped(engine.engine_id, header.dropped_total)
        self.metrics.hook_queue_depth.set(header.queue_depth)
        if isinstance(header, Heartbeat):
            self.store.note_engine(engine.engine_id, header.next_seq, header.time_ns)
            return
        assert isinstance(header, StepHeader) and rows is not None
        self.metrics.steps_received.inc()
        if self.store.is_stale(header.engine_id, header.seq):
            self._refuse_stale(header)
            return
        self.metrics.hook_step_seconds.observe(header.hook_ns / 1e9)
        index = rows_to_score(header)
        active = self.registry.active()
        probs = None
        columns = None
        if active is not None and active.columns.names and index.size:
            scorer = active.scorer
            selected = rows[:, torch.from_numpy(index)]
            features: dict[str, torch.Tensor] = {}
            if scorer.has_hybrid:  # hybrid probes: the scored tokens' features too
                own, producer = self.store.token_feature_inputs(header, index,
                                                                scorer.token_features)
                features = {"own_features": torch.from_numpy(own),
                            "producer_features": torch.from_numpy(producer)}
            logits, outside = scorer.logits_and_drift(selected, **features)
            probs = scorer.probabilities(logits).cpu().numpy()
            # Drift flags ride after the probabilities (detector.sidecar.scores.token_scores).
            if outside is not None:
                probs = np.concatenate([probs, outside.cpu().numpy()], axis=1)
            columns = active.columns
            self.metrics.rows_scored.inc(int(index.size))
        if not self.store.ingest(header, index, probs, columns):
            self._refuse_stale(header)
            return
        self.metrics.score_delay_seconds.observe(max(0.0, (time.time_ns() - header.time_ns) / 1e9))
        for req_id in header.finished:
            self._account_finished(req_id)

    def _capture_status(self, status: CaptureStatus) -> None:
        """An engine's plugin says whether it captures. One that captures says so in every
        step and heartbeat too, so only "off" changes anything: no rows will come, so the
        hook counts as not connected, and requests of an engine that captured before end."""
        if status.enabled:
            return
        self.heard = False
        previous = self.registry.capture_off(status)
        if previous is not None:
            self._ended(self.store.end_running(
                previous.engine_id, reason=f"capture was switched off in vLLM: {status.reason}"))

    def _ended(self, req_ids: list[str]) -> None:
        if req_ids:
            logger.info("%d running request(s) ended without a finish from the engine",
                        len(req_ids))
        for req_id in req_ids:
            self._account_finished(req_id)

    def _refuse_stale(self, header: StepHeader) -> None:
        """A replayed or out-of-order step: counted as a rejected message, logged rarely."""
        self.metrics.messages_rejected.inc()
        self._stale_refused += 1
        if self._stale_log.ready():
            logger.warning("channel: refused a stale step (seq %d of engine %s arrived out of "
                           "order or twice; %d so far)", header.seq, header.engine_id[:8],
                           self._stale_refused)

    def _account_finished(self, req_id: str) -> None:
        """Queue a finished request's accounting (:mod:`detector.sidecar.accounting`)."""
        self.accounting.submit(req_id)

    def _account(self, req_id: str) -> None:
        """Span verdicts of a finished request, counted once, for alerting (and, with
        OpenTelemetry on, sent once as one evaluation event per probe)."""
        if not self.store.claim_finished(req_id):
            return
        analysis = self.analyzer.current(self.store, req_id)
        if analysis is None:
            return
        columns = self.store.columns
        if analysis.record.incomplete:
            self.metrics.requests_incomplete.inc()
        if columns is None:
            return
        m = self.metrics
        for name in columns.names:
            m.tokens_scored.labels(name).inc(sum(name in t.scores for t in analysis.tokens))
            m.requests_scored.labels(name).inc()
        for v in analysis.verdicts:
            m.spans_scored.labels(v.probe, v.span.kind).inc()
            if v.span.kind == "claim":
                m.span_score.labels(v.probe).observe(v.score)
            if v.flagged:
                m.spans_flagged.labels(v.probe, v.span.kind).inc()
        for r in analysis.responses:  # the response verdict: any claim span flagged
            if r.flagged:
                m.requests_flagged.labels(r.probe).inc()
        for d in analysis.drift:
            m.drift_rows.labels(d.probe).inc(d.rows)
            m.drift_rows_outside.labels(d.probe).inc(d.rows_outside)
            if d.out_of_distribution:
                m.requests_out_of_distribution.labels(d.probe).inc()
        if self.events is not None:  # queued for export; never raises
            self.events.request_finished(analysis, columns.names, columns.claim_thresholds)

    def _housekeeping(self) -> None:
        """Gauges, hook state and request ends."""
        self.store.expire()
        stats = self.store.stats()
        self.metrics.requests_tracked.set(stats.requests)
        self.metrics.store_bytes.set(stats.bytes)
        connected = self.hook_connected
        self.metrics.hook_connected.set(1 if connected else 0)
        engine = self.registry.engine
        if connected != self._hook_state:
            self._hook_state = connected
            if not connected and self.heard:
                logger.warning("the in-engine hook fell silent (no message for %.0f s of "
                               "listening)", self.silent_s)
                if engine is not None:
                    self._ended(self.store.end_running(
                        engine.engine_id, reason="the in-engine hook fell silent "
                        "(vLLM stopped, crashed or hung)"))
            for callback in self.on_hook_state:
                callback(connected)
        if connected and engine is not None:
            # An idle engine runs nothing: requests still running ended in a step without
            # tokens. While it is busy, a request that lost steps and has been quiet since
            # most likely ended in a dropped step (revived by its next token if not).
            # Both are judged on the engine's clock, as far as its messages were read.
            idle = self.store.engine_quiet_s(engine.engine_id) > self.engine_idle_s
            self._ended(self.store.end_running(engine.engine_id, quiet_s=self.engine_idle_s,
                                               only_incomplete=not idle))
        self.registry.expire_capture_off(self.hook_timeout_s)
        active = self.registry.active()
        self.metrics.probes_active.set(len(active.columns.names) if active else 0)
        for probe in active.scorer.probes if active else ():
            if probe.metadata.drift is not None:
                self.metrics.drift_expected_outside.labels(probe.name).set(
                    probe.metadata.drift.expected_outside_rate)
        new_failures = self.registry.load_failures - self._load_failures_seen
        if new_failures > 0:
            self.metrics.probe_load_failures.inc(new_failures)
            self._load_failures_seen += new_failures
        new_rejects = self.subscriber.rejected - self._rejected_seen
        if new_rejects > 0:
            self.metrics.messages_rejected.inc(new_rejects)
            self._rejected_seen += new_rejects
        refused = self.subscriber.rejected_connections - self._refused_seen
        if refused > 0:
            self.metrics.connections_rejected.inc(refused)
            self._refused_seen += refused
        without_info = self.subscriber.without_engine_info - self._without_info_seen
        if without_info > 0:
            self.metrics.steps_without_engine_info.inc(without_info)
            self._without_info_seen += without_info
        shares = self.store.refused_rows - self._shares_refused_seen
        if shares > 0:
            self.metrics.request_shares_refused.inc(shares)
            self._shares_refused_seen += shares

"""Prometheus metrics of the sidecar: what on-call engineers alert on.

Names follow Prometheus conventions: ``lie_detector_`` prefix, base units, ``_total``
counters, histograms rather than summaries, and no request ids in labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_DELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_HOOK_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)
_SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99, 1.0)


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.steps_received = Counter(
            "lie_detector_steps_received", "Engine steps received over the channel.", registry=r)
        self.messages_rejected = Counter(
            "lie_detector_channel_rejected_messages",
            "Channel messages rejected as malformed.", registry=r)
        self.request_shares_refused = Counter(
            "lie_detector_channel_refused_request_shares",
            "Requests' shares of engine steps refused alone (a field that did not validate); "
            "their step-mates were kept.", registry=r)
        self.steps_without_engine_info = Counter(
            "lie_detector_channel_steps_without_engine_info",
            "Engine steps dropped because they refer to an engine whose info the sidecar has "
            "not received yet (it started mid-run; the info is re-sent every second).",
            registry=r)
        self.connections_rejected = Counter(
            "lie_detector_channel_rejected_connections",
            "Connections to the channel refused: the peer did not present the channel key.",
            registry=r)
        self.steps_dropped = Counter(
            "lie_detector_channel_dropped_steps",
            "Engine steps the hook dropped because the channel was full or unconnected.",
            registry=r)
        self.rows_scored = Counter(
            "lie_detector_rows_scored", "Residual-stream rows scored by the fused probes.",
            registry=r)
        self.hook_connected = Gauge(
            "lie_detector_hook_connected",
            "1 while the in-engine hook has been heard from within the heartbeat window.",
            registry=r)
        self.hook_step_seconds = Histogram(
            "lie_detector_hook_step_seconds",
            "Time the hook spent in the engine thread per step.", buckets=_HOOK_BUCKETS,
            registry=r)
        self.score_delay_seconds = Histogram(
            "lie_detector_score_delay_seconds",
            "Delay from the end of an engine step to its scores being available.",
            buckets=_DELAY_BUCKETS, registry=r)
        self.requests_tracked = Gauge(
            "lie_detector_requests_tracked", "Requests held in the result store.", registry=r)
        self.store_bytes = Gauge(
            "lie_detector_store_bytes", "Approximate memory held by the result store.",
            registry=r)
        self.probes_active = Gauge(
            "lie_detector_probes_active", "Probes currently scoring.", registry=r)
        self.probe_load_failures = Counter(
            "lie_detector_probe_load_failures", "Probe artifacts refused at load.", registry=r)
        self.hook_queue_depth = Gauge(
            "lie_detector_hook_queue_depth",
            "Steps waiting in the in-engine hook's queue at its last message.", registry=r)
        self.tokens_scored = Counter(
            "lie_detector_tokens_scored", "Generated tokens scored, per probe.", ["probe"],
            registry=r)
        self.spans_scored = Counter(
            "lie_detector_spans_scored", "Generated spans judged, per probe and span kind.",
            ["probe", "kind"], registry=r)
        self.spans_flagged = Counter(
            "lie_detector_spans_flagged",
            "Spans whose calibrated score reached the probe's threshold.", ["probe", "kind"],
            registry=r)
        self.requests_scored = Counter(
            "lie_detector_requests_scored", "Finished requests judged, per probe.", ["probe"],
            registry=r)
        self.requests_flagged = Counter(
            "lie_detector_requests_flagged",
            "Finished requests whose response verdict is flagged (a claim span reached the "
            "probe's threshold), per probe.", ["probe"],
            registry=r)
        self.requests_incomplete = Counter(
            "lie_detector_requests_incomplete",
            "Finished requests whose scores are incomplete (rows lost).", registry=r)
        self.span_score = Histogram(
            "lie_detector_span_score", "Calibrated claim-span scores, per probe.", ["probe"],
            buckets=_SCORE_BUCKETS, registry=r)
        # Drift (detector.drift): rows of finished responses scored by probes that ship a
        # training summary, those outside it, and responses mostly outside it.
        self.drift_rows = Counter(
            "lie_detector_drift_rows",
            "Scored generated rows of finished requests, per probe with a training summary.",
            ["probe"], registry=r)
        self.drift_rows_outside = Counter(
            "lie_detector_drift_rows_outside",
            "Of those rows, the ones outside the probe's training distribution.", ["probe"],
            registry=r)
        self.requests_out_of_distribution = Counter(
            "lie_detector_requests_out_of_distribution",
            "Finished requests most of whose scored rows lie outside the probe's training "
            "distribution, per probe.", ["probe"], registry=r)
        self.drift_expected_outside = Gauge(
            "lie_detector_drift_expected_outside_ratio",
            "Fraction of rows like the training ones that lie outside the probe's summary "
            "(compare with rate(drift_rows_outside) / rate(drift_rows)), per active probe.",
            ["probe"], registry=r)
        self._engine_dropped_seen: dict[str, int] = {}

    def init_probe_labels(self, probes: tuple[str, ...] | list[str], kinds: list[str]) -> None:
        """Create each probe's series at 0, so rate() sees the first increment."""
        for name in probes:
            for counter in (self.tokens_scored, self.requests_scored, self.requests_flagged):
                counter.labels(name)
            self.span_score.labels(name)
            for kind in kinds:
                self.spans_scored.labels(name, kind)
                self.spans_flagged.labels(name, kind)

    def engine_dropped(self, engine_id: str, dropped_total: int) -> None:
        """Turn the hook's running drop count into increments of our counter."""
        seen = self._engine_dropped_seen.get(engine_id, 0)
        if dropped_total > seen:
            self.steps_dropped.inc(dropped_total - seen)
            self._engine_dropped_seen[engine_id] = dropped_total

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

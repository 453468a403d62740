"""Drift served: a real sidecar (ZeroMQ channel, gRPC, Prometheus) scoring steps the
plugin's own publisher sends, read through detector.serving.client.

The probe's summary is fitted on rows of one distribution (a few latent directions plus
noise, like a residual stream). A response whose rows come from that distribution is in
distribution; one whose rows come from directions training never saw is reported out of
distribution per token, per response and in the metrics. A probe without a summary (an
old probe) scores beside it and reports no drift. No vLLM: the rows must be controlled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from support import free_port, scrape_metrics, wait_until

from detector.artifact import ProbeArtifact, ProbeMetadata
from detector.channel.publisher import ChannelPublisher, PendingStep
from detector.channel.wire import EngineInfo, RequestRows
from detector.serving.client import DetectorClient
from detector.model_identity import ModelIdentity
from detector.sidecar.app import Sidecar, SidecarSettings
from probes.drift_fit import fit_drift, with_drift

H, LAYERS, PROBE_LAYER = 16, [1, 3], 3
MODEL = ModelIdentity(name="tiny", fingerprint="00ff00ff00ff00ff", hidden_size=H, num_layers=6)
HOME = np.random.default_rng(1).normal(size=(4, H))  # the training rows' directions
ABROAD = np.random.default_rng(2).normal(size=(4, H))  # directions training never saw


def rows_along(directions: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 4)) @ directions * 2.0 + rng.normal(size=(n, H)) * 0.1
            + 1.0).astype(np.float32)


def engine() -> EngineInfo:
    return EngineInfo(engine_id="drift-e1", model="tiny", fingerprint=MODEL.fingerprint,
                      hidden_size=H, num_layers=6, layers=LAYERS, dtype="float32",
                      capture_method="forward_hook", pid=os.getpid(), started_at=0.0)


def save_probe(directory: Path, name: str, *, drift: bool) -> Path:
    meta = ProbeMetadata(name=name, model=MODEL, layers=[PROBE_LAYER], hidden_size=H,
                         score_position="producer", calibration="none", threshold=0.5)
    art = ProbeArtifact(metadata=meta, weight=torch.full((H,), 0.05), bias=torch.zeros(1))
    if drift:
        art = with_drift(art, fit_drift(rows_along(HOME, 1500, 0), components=4))
    return art.save(directory / name)


def send_request(pub: ChannelPublisher, req_id: str, directions: np.ndarray, seed: int,
                 *, prompt: int = 3, generated: int = 16) -> None:
    """A prefill that samples the first token, then one decode step per token; every
    row of the probe's layer drawn along ``directions`` (the other layer is noise)."""
    probe_rows = rows_along(directions, prompt + generated, seed)
    history = list(range(10, 10 + prompt)) + list(range(100, 100 + generated))

    def step(first: int, n: int, finished: bool) -> None:
        rows = torch.randn(len(LAYERS), n, H)
        rows[LAYERS.index(PROBE_LAYER)] = torch.from_numpy(probe_rows[first:first + n])
        req = RequestRows(req_id=req_id, row_offset=0, num_rows=n, first_position=first,
                          num_prompt_tokens=prompt, input_token_ids=history[first:first + n],
                          sampled_token_ids=[history[first + n]])
        assert pub.offer(PendingStep(seq=pub.take_seq(), time_ns=time.time_ns(), rows=rows,
                                     requests=[req], finished=[req_id] if finished else [],
                                     hook_ns=1))

    step(0, prompt, False)
    for g in range(1, generated):
        step(prompt + g - 1, 1, g == generated - 1)


def test_a_response_of_unseen_rows_is_reported_out_of_distribution(tmp_path) -> None:
    probes = [save_probe(tmp_path, "summarised", drift=True),
              save_probe(tmp_path, "old", drift=False)]
    settings = SidecarSettings(channel=f"ipc://{tmp_path}/ch.sock", probes=probes,
                               grpc_address=f"127.0.0.1:{free_port()}",
                               metrics_port=free_port(), shutdown_grace_s=0)
    sidecar = Sidecar(settings)
    sidecar.start()
    pub = ChannelPublisher(settings.channel, engine(), heartbeat_s=0.05)
    try:
        with DetectorClient(settings.grpc_address, timeout=10) as client:
            wait_until(lambda: all(p.active for p in client.list_probes().probes), 20,
                       what="both probes active")
            for i in range(3):
                send_request(pub, f"home-{i}", HOME, seed=10 + i)
                send_request(pub, f"abroad-{i}", ABROAD, seed=20 + i)
            seen_abroad = []
            for i in range(3):
                home = client.get_scores(f"home-{i}", wait_until_finished=True)
                abroad = client.get_scores(f"abroad-{i}", wait_until_finished=True)
                seen_abroad.append(abroad)
                for reply in (home, abroad):
                    assert [d.probe for d in reply.drift] == ["summarised"]  # not "old"
                    assert reply.drift[0].rows == 16  # every generated token was scored
                    for t in reply.tokens:
                        assert t.score("old").outside is None
                        assert t.score("summarised").outside is not None
                h, a = home.drift_of("summarised"), abroad.drift_of("summarised")
                assert not home.out_of_distribution and h.outside_fraction < 0.2, h
                assert abroad.out_of_distribution and a.outside_fraction > 0.9, a
                assert a.rows_outside == sum(t.score("summarised").outside
                                             for t in abroad.tokens)
            # A stream carries the per-token flags as tokens settle and the drift at the end.
            abroad_0 = seen_abroad[0]
            updates = list(client.stream_scores("abroad-0", timeout=10))
            assert updates[-1].final and updates[-1].drift == (abroad_0.drift_of("summarised"),)
            assert [t.score("summarised").outside for u in updates for t in u.tokens] == [
                t.score("summarised").outside for t in abroad_0.tokens]
            # Scores themselves are unchanged by drift: both probes have the same weights.
            assert all(t.score("old").probability == t.score("summarised").probability
                       for t in abroad.tokens)

            def counted() -> dict[str, float]:
                return scrape_metrics(settings.metrics_port)

            label = '{"probe": "summarised"}'
            wait_until(lambda: counted().get(
                f"lie_detector_requests_out_of_distribution_total{label}") == 3, 10,
                what="3 responses counted out of distribution")
            metrics = counted()
            assert metrics[f"lie_detector_drift_rows_total{label}"] == 6 * 16
            assert 3 * 16 * 0.9 < metrics[f"lie_detector_drift_rows_outside_total{label}"] \
                < 3 * 16 * 1.2
            assert not any('"old"' in k and "drift" in k for k in metrics)
            gauge = f"lie_detector_drift_expected_outside_ratio{label}"  # set by housekeeping
            wait_until(lambda: gauge in counted(), 10, what="the expected outside ratio")
            assert 0.0 < counted()[gauge] < 0.05
    finally:
        pub.close()
        sidecar.stop()

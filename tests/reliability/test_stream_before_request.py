"""A stream opened before its request reaches the sidecar, without vLLM.

A client opens ``StreamScores`` as it sends the completion; under load the request can sit
in vLLM's queue (and its first step behind the hook's backlog) for longer than a few
seconds. The stream waits for it up to ``stream_appear_wait_s`` within the client's
deadline, and an id that never appears ends NOT_FOUND once that wait is over.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from support import free_port
from tiny_engine import GENERATED, probe, schedule

from detector.serving.client import DetectorClient, DetectorError
from detector.sidecar.app import Sidecar, SidecarSettings

# Longer than the fixed 10 s the sidecar used to wait before answering NOT_FOUND.
LATE_S = 11.0


def _sidecar(tmp_path, appear_wait_s: float) -> Sidecar:
    probe_path = probe("p", [1, 3], "producer", 1).save(tmp_path / "p")
    sc = Sidecar(SidecarSettings(channel=f"ipc://{tmp_path}/ch.sock",
                                 grpc_address=f"127.0.0.1:{free_port()}", metrics_port=None,
                                 probes=[probe_path], shutdown_grace_s=0,
                                 stream_appear_wait_s=appear_wait_s))
    sc.start()
    return sc


def test_stream_waits_for_a_request_that_arrives_late(tmp_path) -> None:
    sc = _sidecar(tmp_path, appear_wait_s=60.0)
    try:
        with DetectorClient(sc.settings.grpc_address) as client:
            got: dict = {}

            def read() -> None:
                try:
                    updates = list(client.stream_scores("A", timeout=120))
                    got["tokens"] = [t.token_id for u in updates for t in u.tokens]
                    got["final"] = updates[-1].final if updates else False
                except DetectorError as exc:
                    got["error"] = str(exc)

            reader = threading.Thread(target=read)
            reader.start()
            time.sleep(LATE_S)
            assert reader.is_alive(), f"the stream ended before its request appeared: {got}"
            for message in schedule():  # requests "A" and "B"
                sc.pipeline.handle(message)
            reader.join(60)
            assert not reader.is_alive()
            assert "error" not in got, got["error"]
            assert got["tokens"] == GENERATED["A"] and got["final"]
    finally:
        sc.stop()


def test_stream_for_an_id_that_never_appears_ends_not_found(tmp_path) -> None:
    """NOT_FOUND after ``stream_appear_wait_s``, not the client's (longer) deadline."""
    sc = _sidecar(tmp_path, appear_wait_s=0.5)
    try:
        with DetectorClient(sc.settings.grpc_address) as client:
            with pytest.raises(DetectorError) as err:
                list(client.stream_scores("never", timeout=120))
            assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value.details
            assert "not known" in err.value.details
    finally:
        sc.stop()

"""Why capture is off travels over the channel: the plugin's publisher sends a
``CaptureStatus`` in place of heartbeats, and the sidecar says it in ListProbes, the probes'
inactive reason and GetScores' NOT_FOUND, over a real keyed socket and real gRPC."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
import zmq
from support import free_port, health_status, wait_until
from test_channel import engine, make_step, recv_until

from detector.artifact import ProbeArtifact, ProbeMetadata
from detector.channel.auth import client_options, read_key, write_key
from detector.channel.publisher import ChannelPublisher
from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import CaptureStatus, EngineInfo, Heartbeat, encode_heartbeat
from detector.serving.client import CaptureState, DetectorClient, DetectorError, ProbeList
from detector.model_identity import ModelIdentity
from detector.sidecar.app import Sidecar, SidecarSettings
from detector.sidecar.registry import NO_ENGINE_YET
from detector.sidecar.service import HOOK_HEALTH_NAME

REASON = "LIE_DETECTOR_LAYERS=999 outside 1..29 (the model has 30 layers)"


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/ch/s.sock"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key(tmp_path / "channel.key")


def off(reason: str = REASON, engine_id: str = "off-1") -> CaptureStatus:
    return CaptureStatus(enabled=False, reason=reason, engine_id=engine_id, model="tiny",
                         model_path="/models/tiny", pid=4242, num_layers=30, hidden_size=4,
                         time_ns=time.time_ns())


def is_status(message) -> bool:
    return isinstance(message[0], CaptureStatus)


# ------------------------------------------------------------------ the engine's side
def test_an_engine_that_is_off_says_why_in_place_of_heartbeats(endpoint, key_file) -> None:
    key = read_key(key_file)
    sub = ChannelSubscriber(endpoint, key=key)
    pub = ChannelPublisher(endpoint, None, status=off(), heartbeat_s=0.02, key=key)
    try:
        got = [recv_until(sub, lambda m: True, timeout_s=10.0) for _ in range(3)]
        assert all(m is not None and is_status(m) for m in got), got  # repeated, nothing else
        assert got[0][0] == pub.status and got[0][1] is None
        assert got[0][0].summary() == f"capture is OFF in vLLM (pid 4242): {REASON}"
    finally:
        pub.close()
        sub.close()


def test_switching_off_mid_run_drops_steps_and_reports_why(endpoint) -> None:
    sub = ChannelSubscriber(endpoint)
    pub = ChannelPublisher(endpoint, engine(8), heartbeat_s=0.02)
    try:
        assert recv_until(sub, lambda m: isinstance(m[0], Heartbeat), timeout_s=10.0)
        status = off("capture failed mid-run: reading the step failed: boom")
        pub.switch_off(status)
        assert not pub.offer(make_step(pub, 2, 1.0))  # dropped, counted, never blocks
        assert pub.dropped == 1
        message = recv_until(sub, is_status, timeout_s=10.0)
        assert message is not None and message[0] == status
        # From then on only the status: no heartbeat says the hook captures.
        later = [recv_until(sub, lambda m: True, timeout_s=10.0) for _ in range(3)]
        assert all(m is not None and is_status(m) for m in later)
    finally:
        pub.close()
        sub.close()


def test_a_publisher_needs_an_engine_or_a_status(endpoint) -> None:
    with pytest.raises(ValueError):
        ChannelPublisher(endpoint, None)


# ------------------------------------------------------------------ the sidecar's side
MODEL = ModelIdentity(name="tiny", fingerprint="00ff00ff00ff00ff", hidden_size=4, num_layers=6)


def tiny_engine() -> EngineInfo:
    return EngineInfo(engine_id="on-1", model="tiny", fingerprint=MODEL.fingerprint,
                      hidden_size=4, num_layers=6, layers=[1, 3], dtype="float32",
                      capture_method="forward_hook", pid=os.getpid(), started_at=0.0)


def tiny_probe(out: Path) -> Path:
    meta = ProbeMetadata(name="tiny-probe", model=MODEL, layers=[1], hidden_size=4,
                         score_position="producer", calibration="none", threshold=0.5)
    return ProbeArtifact(metadata=meta, weight=torch.ones(4), bias=torch.zeros(1)).save(out)


def push_socket(endpoint: str, key: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    client_options(sock, key)
    sock.connect(endpoint)
    return sock


def test_sidecar_says_why_capture_is_off(endpoint, key_file, tmp_path) -> None:
    """ListProbes, the probe's inactive reason and GetScores' NOT_FOUND name the reason the
    engine gave; an engine that captures later replaces it."""
    settings = SidecarSettings(channel=endpoint, channel_key_file=key_file,
                               grpc_address=f"127.0.0.1:{free_port()}", metrics_port=None,
                               probes=[tiny_probe(tmp_path / "probe")], shutdown_grace_s=0)
    sidecar = Sidecar(settings)
    sidecar.start()
    pub = None
    try:
        with DetectorClient(settings.grpc_address, timeout=5) as client:
            reply = client.list_probes()
            assert reply.capture_status.state is CaptureState.UNSPECIFIED
            assert reply.probes[0].inactive_reason == NO_ENGINE_YET

            # The plugin's own publisher, presenting the key, as in vLLM.
            pub = ChannelPublisher(endpoint, None, status=off(), heartbeat_s=0.05,
                                   key=read_key(key_file))

            def listed() -> ProbeList:
                return client.list_probes()

            wait_until(lambda: listed().capture_status.state is CaptureState.OFF, 10,
                       what="capture OFF in ListProbes")
            reply = listed()
            status = reply.capture_status
            assert status.summary == f"capture is OFF in vLLM (pid 4242): {REASON}"
            assert status.reason == REASON and status.pid == 4242 and status.model == "tiny"
            assert reply.probes[0].inactive_reason == status.summary
            with pytest.raises(DetectorError) as info:
                client.get_scores("nope")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert status.summary in info.value.details
            # Nothing is captured, so the hook is not serving.
            assert health_status(settings.grpc_address, HOOK_HEALTH_NAME) == 2  # NOT_SERVING
            pub.close()
            pub = None

            # vLLM restarted with capture on: its heartbeat replaces the status.
            sock = push_socket(endpoint, read_key(key_file))
            try:
                def beat() -> bool:
                    sock.send_multipart(encode_heartbeat(
                        Heartbeat(engine=tiny_engine(), time_ns=time.time_ns())))
                    return listed().capture_status.state is CaptureState.ON
                wait_until(beat, 10, what="capture ON in ListProbes")
            finally:
                sock.close(linger=0)
            reply = listed()
            assert reply.capture_status.layers == (1, 3)
            assert reply.probes[0].inactive_reason == ""
    finally:
        if pub is not None:
            pub.close()
        sidecar.stop()


def test_a_silent_engine_that_was_off_is_reported_as_gone(endpoint, tmp_path) -> None:
    """vLLM stopped after saying capture is off: the reason stays, marked as the last
    engine's, once the hook timeout passes."""
    settings = SidecarSettings(channel=endpoint, grpc_address=f"127.0.0.1:{free_port()}",
                               metrics_port=None, probes=[tiny_probe(tmp_path / "probe")],
                               hook_timeout_s=0.5, shutdown_grace_s=0)
    sidecar = Sidecar(settings)
    try:
        sidecar.pipeline.handle((off(), None))
        probe = sidecar.registry.probes()[0]
        assert probe.inactive_reason == f"capture is OFF in vLLM (pid 4242): {REASON}"
        time.sleep(0.6)
        sidecar.pipeline._housekeeping()
        assert probe.inactive_reason.startswith("no vLLM engine heard from since one said: "
                                                "capture is OFF in vLLM (pid 4242)")
        # The same engine speaking again makes it current.
        sidecar.pipeline.handle((off(), None))
        assert probe.inactive_reason == f"capture is OFF in vLLM (pid 4242): {REASON}"
    finally:
        sidecar.subscriber.close()


# ------------------------------------------------------------------ the plugin's report
def fake_runner(num_layers: int = 30) -> SimpleNamespace:
    text = SimpleNamespace(num_hidden_layers=num_layers, hidden_size=576)
    return SimpleNamespace(model_config=SimpleNamespace(
        served_model_name="tiny", model="/models/tiny", hf_text_config=text))


def test_the_plugin_reports_why_with_what_it_knows_of_the_engine(endpoint, key_file) -> None:
    from detector.config import HookSettings
    from detector.engine import vllm_adapter

    sub = ChannelSubscriber(endpoint, key=read_key(key_file))
    settings = HookSettings(channel=endpoint, channel_key_file=str(key_file), heartbeat_s=0.05)
    runner = fake_runner()
    try:
        vllm_adapter._report_off(runner, settings, "boom:\n  Traceback \x1b[2J here")
        message = recv_until(sub, is_status, timeout_s=10.0)
        assert message is not None
        status = message[0]
        assert status.reason == "boom: Traceback [2J here"  # one printable line
        assert (status.model, status.model_path, status.num_layers, status.hidden_size,
                status.pid) == ("tiny", "/models/tiny", 30, 576, os.getpid())
        # Reported once per runner: a second load_model hook does nothing.
        before = len(vllm_adapter._off_publishers)
        vllm_adapter._after_load_model(runner, settings)
        assert len(vllm_adapter._off_publishers) == before
    finally:
        while vllm_adapter._off_publishers:
            vllm_adapter._off_publishers.pop().close()
        sub.close()


def test_a_config_past_the_wire_bounds_still_sends_the_reason(endpoint) -> None:
    from detector.config import HookSettings
    from detector.engine import vllm_adapter

    sub = ChannelSubscriber(endpoint)
    try:
        vllm_adapter._report_off(fake_runner(num_layers=10**6),
                                 HookSettings(channel=endpoint, heartbeat_s=0.05), "why")
        message = recv_until(sub, is_status, timeout_s=10.0)
        assert message is not None and message[0].reason == "why"
        assert message[0].num_layers is None and message[0].pid == os.getpid()
    finally:
        while vllm_adapter._off_publishers:
            vllm_adapter._off_publishers.pop().close()
        sub.close()


def test_an_unreadable_key_leaves_only_the_log(endpoint, key_file, caplog) -> None:
    from detector.config import HookSettings
    from detector.engine import vllm_adapter

    key_file.chmod(0o644)  # readable by others: refused, so the sidecar cannot be reached
    settings = HookSettings(channel=endpoint, channel_key_file=str(key_file))
    vllm_adapter._report_off(fake_runner(), settings, "some reason")
    assert vllm_adapter._off_publishers == []
    text = caplog.text
    assert "capture is OFF, vLLM continues unaffected: some reason" in text
    assert "cannot tell the sidecar why capture is off" in text and "0644" in text

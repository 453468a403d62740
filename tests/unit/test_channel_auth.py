"""The channel key over a real ZeroMQ IPC socket: only an engine that presents the
deployment's key can write steps; everyone else is refused at the handshake and counted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq
from test_channel import engine, is_heartbeat, is_step, make_step, recv_until, wait_for

from detector.channel.auth import ChannelKeyError, read_key, write_key
from detector.channel.publisher import ChannelPublisher
from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import Heartbeat, encode_heartbeat


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/ch/s.sock"


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    return read_key(write_key(tmp_path / "channel.key"))




def test_an_engine_with_the_key_is_heard(endpoint: str, key: bytes) -> None:
    sub = ChannelSubscriber(endpoint, key=key)
    pub = ChannelPublisher(endpoint, engine(8), heartbeat_s=0.02, key=key)
    try:
        assert sub.authenticated
        assert recv_until(sub, is_heartbeat, timeout_s=10.0) is not None
        assert pub.offer(make_step(pub, 2, 1.5))
        step = recv_until(sub, is_step, timeout_s=10.0)
        assert step is not None and float(step[1][0, 0, 0]) == 1.5
        assert sub.rejected_connections == 0
    finally:
        pub.close()
        sub.close()


@pytest.mark.parametrize("presented", [None, b"x" * 64], ids=["no key", "wrong key"])
def test_an_engine_without_the_key_is_refused_and_counted(endpoint: str, key: bytes,
                                                          presented: bytes | None) -> None:
    sub = ChannelSubscriber(endpoint, key=key)
    pub = ChannelPublisher(endpoint, engine(8), heartbeat_s=0.02, key=presented)
    try:
        assert recv_until(sub, lambda m: True, timeout_s=3.0) is None  # nothing gets through
        assert wait_for(lambda: (sub.recv(0.05), sub.rejected_connections)[1] > 0, 10.0)
        assert not pub.sidecar_connected
        pub.offer(make_step(pub, 1, 0.0))
        assert wait_for(lambda: pub.dropped >= 1, 10.0), "a refused engine drops (and counts) its steps"
        assert sub.received == 0
    finally:
        pub.close()
        sub.close()


def test_a_forged_message_from_a_raw_socket_never_arrives(endpoint: str, key: bytes) -> None:
    """An attacker's own ZeroMQ client on the real socket, speaking the wire format."""
    beat = Heartbeat(engine=engine(8), time_ns=time.time_ns(), steps_published=0,
                     dropped_total=5, queue_depth=0, next_seq=1_000_000)
    sub = ChannelSubscriber(endpoint, key=key)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.connect(endpoint)
        for _ in range(20):
            try:
                push.send_multipart(encode_heartbeat(beat), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(0.05)
        assert recv_until(sub, lambda m: True, timeout_s=2.0) is None
        assert wait_for(lambda: (sub.recv(0.05), sub.rejected_connections)[1] > 0, 10.0)
        assert sub.received == 0
    finally:
        push.close(linger=0)
        ctx.term()
        sub.close()


def test_a_keyed_sidecar_restarts_on_the_same_path(endpoint: str, key: bytes) -> None:
    """Its ZAP handler lives in a context of its own, freed on close."""
    for _ in range(2):
        sub = ChannelSubscriber(endpoint, key=key)
        pub = ChannelPublisher(endpoint, engine(8), heartbeat_s=0.02, key=key)
        try:
            assert recv_until(sub, is_heartbeat, timeout_s=10.0) is not None
        finally:
            pub.close()
            sub.close()


# ------------------------------------------------------------------ the key file
def test_write_key_is_owner_only_and_readable(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(read_key(path)) == 64


@pytest.mark.parametrize(("content", "mode", "reason"), [
    (b"a" * 64, 0o644, "lets group or others read it"),
    (b"a" * 64, 0o640, "lets group or others read it"),
    (b"short", 0o600, "must be 32-255 bytes, got 5"),
    (b"a" * 300, 0o600, "must be 32-255 bytes"),
])
def test_bad_key_files_are_refused_with_the_reason(tmp_path: Path, content: bytes, mode: int,
                                                    reason: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    os.chmod(path, mode)
    with pytest.raises(ChannelKeyError, match=reason):
        read_key(path)


def test_a_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ChannelKeyError, match="cannot be read"):
        read_key(tmp_path / "nope")

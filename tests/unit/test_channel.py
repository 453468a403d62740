"""The channel over a real ZeroMQ ipc socket: never blocks the engine, bounded, recovers."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from detector.channel.publisher import ChannelPublisher, PendingStep
from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import (
    EngineInfo,
    Heartbeat,
    RequestRows,
    StepHeader,
    encode_heartbeat,
    encode_step,
)

LAYERS = [1, 2]
MIB = 1 << 20


def engine(hidden: int) -> EngineInfo:
    return EngineInfo(
        engine_id="engine-a", model="tiny", hidden_size=hidden, num_layers=4, layers=LAYERS,
        dtype="float32", capture_method="forward_hook", pid=os.getpid(), started_at=0.0,
    )


def make_step(pub: ChannelPublisher, num_rows: int, value: float, *, ready=None,
              rows: torch.Tensor | None = None) -> PendingStep:
    hidden = pub.engine.hidden_size
    if rows is None:
        rows = torch.full((len(LAYERS), num_rows, hidden), value, dtype=torch.float32)
    seq = pub.take_seq()
    req = RequestRows(req_id=f"req-{seq}", row_offset=0, num_rows=num_rows, first_position=seq,
                      num_prompt_tokens=1, input_token_ids=[seq] * num_rows,
                      sampled_token_ids=[seq + 1])
    return PendingStep(seq=seq, time_ns=time.time_ns(), rows=rows, requests=[req], finished=[],
                       hook_ns=1, ready=ready)


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "ch" / "s.sock"
    short = None
    if len(str(path)) > 100:  # AF_UNIX paths are limited to ~107 bytes
        short = Path(tempfile.mkdtemp(prefix="ldt-", dir="/tmp"))
        path = short / "ch" / "s.sock"
    yield f"ipc://{path}"
    if short is not None:
        shutil.rmtree(short, ignore_errors=True)


def path_of(endpoint: str) -> Path:
    return Path(endpoint[len("ipc://"):])


def recv_until(sub: ChannelSubscriber, predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = sub.recv(timeout_s=max(0.0, deadline - time.monotonic()))
        if message is not None and predicate(message):
            return message
    return None


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def is_heartbeat(message) -> bool:
    return isinstance(message[0], Heartbeat)


def is_step(message) -> bool:
    return isinstance(message[0], StepHeader)


# ------------------------------------------------------------------ no subscriber
def test_publisher_without_subscriber_never_blocks_and_stays_bounded(endpoint: str) -> None:
    hidden = 1024
    num_rows = MIB // (len(LAYERS) * hidden * 4)  # exactly 1 MiB of rows per step
    max_steps, max_bytes = 8, int(3.5 * MIB)  # the byte bound binds before the step bound
    pub = ChannelPublisher(endpoint, engine(hidden), max_steps=max_steps, max_bytes=max_bytes,
                           heartbeat_s=0.05)
    # A slow device->host copy on the sender thread, so the queue really fills up.
    slow = lambda: time.sleep(0.02)  # noqa: E731
    sub = None
    try:
        accepted = refused = 0
        worst = 0.0
        shared = torch.zeros(len(LAYERS), num_rows, hidden)  # 1 MiB, counted once per step
        for i in range(200):
            step = make_step(pub, num_rows, float(i), ready=slow, rows=shared)
            assert step.nbytes == MIB
            t0 = time.perf_counter()
            ok = pub.offer(step)
            worst = max(worst, time.perf_counter() - t0)
            accepted += ok
            refused += not ok
            with pub._cond:
                assert len(pub._queue) <= max_steps
                assert pub._queued_bytes <= max_bytes
                assert pub._queued_bytes == sum(s.nbytes for s in pub._queue)
        assert worst < 0.05, f"offer blocked for {worst * 1000:.1f} ms"
        assert refused > 0, "the queue bound never applied"
        # Every accepted step ends as a drop too: there is nobody to send it to.
        assert wait_for(lambda: pub.dropped == 200, 5.0), pub.dropped
        assert pub.published == 0
        assert pub.next_seq == 200

        # A sidecar appears: the publisher reconnects and its heartbeats report the drops.
        sub = ChannelSubscriber(endpoint)
        message = recv_until(sub, is_heartbeat, timeout_s=5.0)
        assert message is not None, "no heartbeat after the subscriber bound"
        beat = message[0]
        assert beat.dropped_total == 200
        assert beat.next_seq == 200
        assert beat.engine == pub.engine

        # The sidecar restarts: a new one on the same path hears the same engine again.
        sub.close()
        sub = ChannelSubscriber(endpoint)
        message = recv_until(sub, is_heartbeat, timeout_s=5.0)
        assert message is not None, "no heartbeat after the subscriber re-bound"
        assert message[0].dropped_total >= 200
    finally:
        pub.close()
        if sub is not None:
            sub.close()


def test_offer_after_close_drops(endpoint: str) -> None:
    pub = ChannelPublisher(endpoint, engine(8))
    pub.close()
    assert pub.offer(make_step(pub, 1, 0.0)) is False
    assert pub.dropped == 1


# ------------------------------------------------------------------ with a subscriber
def connected_pair(endpoint: str, *, hidden: int = 16, rcvhwm: int = 64, **pub_kwargs):
    sub = ChannelSubscriber(endpoint, rcvhwm=rcvhwm)
    pub = ChannelPublisher(endpoint, engine(hidden), heartbeat_s=0.02, **pub_kwargs)
    # A heartbeat proves the connection is up; before that, IMMEDIATE drops steps.
    if recv_until(sub, is_heartbeat, timeout_s=5.0) is None:
        pub.close()
        sub.close()
        pytest.fail("publisher never connected")
    return pub, sub


def test_steps_arrive_in_order_with_their_rows(endpoint: str) -> None:
    pub, sub = connected_pair(endpoint, sndhwm=1000)
    try:
        sent = []
        for i in range(30):
            step = make_step(pub, num_rows=1 + i % 4, value=float(i) + 0.25)
            step.rows[1] = -step.rows[1]  # layers must not be swapped either
            sent.append(step)
            assert pub.offer(step)
        got = []
        while len(got) < len(sent):
            message = recv_until(sub, is_step, timeout_s=5.0)
            assert message is not None, f"only {len(got)} of {len(sent)} steps arrived"
            got.append(message)
        assert [h.seq for h, _ in got] == list(range(30))
        for (header, rows), step in zip(got, sent):
            assert header.num_rows == step.rows.shape[1]
            assert torch.equal(rows, step.rows)
            assert header.requests == step.requests
            assert header.engine == pub.engine
            assert header.dropped_total == 0
        assert pub.dropped == 0
        # The sender thread counts a step just after handing it to ZeroMQ.
        deadline = time.monotonic() + 5
        while pub.published < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.published == 30
    finally:
        pub.close()
        sub.close()


def test_full_queue_drops_instead_of_blocking(endpoint: str) -> None:
    # The subscriber does not read yet; every buffer on the way is tiny.
    pub, sub = connected_pair(endpoint, hidden=1024, rcvhwm=1, sndhwm=1, max_steps=2)
    try:
        n = 200
        worst = 0.0
        accepted = 0
        steps = [make_step(pub, num_rows=8, value=float(i)) for i in range(n)]  # 64 KiB each
        for step in steps:
            t0 = time.perf_counter()
            accepted += pub.offer(step)
            worst = max(worst, time.perf_counter() - t0)
            with pub._cond:
                assert len(pub._queue) <= 2
        assert worst < 0.05, f"offer blocked for {worst * 1000:.1f} ms"
        # Only the full queue drops; the sender holds its step until there is room.
        assert pub.dropped == n - accepted
        assert pub.dropped > n // 2
        # Once the sidecar reads, every accepted step arrives intact and in order; seq gaps
        # show where the drops were.
        seqs = []
        while len(seqs) < accepted:  # heartbeats come too: stop on steps
            message = recv_until(sub, is_step, timeout_s=5.0)
            assert message is not None, f"{len(seqs)} of {accepted} accepted steps arrived"
            header, rows = message
            seqs.append(header.seq)
            assert torch.all(rows == float(header.seq))
        assert recv_until(sub, is_step, timeout_s=0.2) is None  # and nothing more
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert wait_for(lambda: pub.published == accepted, 5.0), pub.published
        assert pub.dropped == n - accepted
    finally:
        pub.close()
        sub.close()


# ------------------------------------------------------------------ the subscriber
def test_ipc_socket_is_owner_only_in_an_existing_private_directory(endpoint: str) -> None:
    path = path_of(endpoint)
    path.parent.mkdir(mode=0o700, parents=True)
    os.chmod(path.parent, 0o700)
    with ChannelSubscriber(endpoint):
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o1777, 0o710])
def test_a_directory_others_can_enter_is_refused_and_left_alone(endpoint: str,
                                                                  mode: int) -> None:
    from detector.channel.subscriber import ChannelError

    path = path_of(endpoint)
    path.parent.mkdir(parents=True)
    os.chmod(path.parent, mode)
    with pytest.raises(ChannelError, match=f"has mode {mode & 0o7777:04o}.*must be 0700"):
        ChannelSubscriber(endpoint)
    assert stat.S_IMODE(path.parent.stat().st_mode) == mode  # never repaired
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_a_directory_another_user_made_is_refused(endpoint: str) -> None:
    """``/tmp/lie-detector-<uid>`` created first by someone else: they could swap the socket."""
    from detector.channel.subscriber import ChannelError

    path = path_of(endpoint)
    path.parent.mkdir(mode=0o700, parents=True)
    os.chown(path.parent, 54321, 54321)
    with pytest.raises(ChannelError, match="belongs to uid 54321"):
        ChannelSubscriber(endpoint)


def test_a_symlinked_directory_is_refused(endpoint: str, tmp_path: Path) -> None:
    from detector.channel.subscriber import ChannelError

    path = path_of(endpoint)
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    path.parent.symlink_to(real)
    with pytest.raises(ChannelError, match="symbolic link"):
        ChannelSubscriber(endpoint)


def test_a_live_socket_or_a_regular_file_is_never_replaced(endpoint: str) -> None:
    from detector.channel.subscriber import ChannelError

    path = path_of(endpoint)
    with ChannelSubscriber(endpoint):
        with pytest.raises(ChannelError, match="another process is listening"):
            ChannelSubscriber(endpoint)
        assert stat.S_ISSOCK(path.stat().st_mode)
    path.write_text("not a socket")
    with pytest.raises(ChannelError, match="not a socket"):
        ChannelSubscriber(endpoint)
    assert path.read_text() == "not a socket"


def _wait_not_listening(path: Path, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return
        finally:
            probe.close()
        time.sleep(0.01)
    raise AssertionError(f"{path} still accepts connections after {timeout_s} s")


def test_close_leaves_a_newer_sidecars_socket(endpoint: str) -> None:
    path = path_of(endpoint)
    old = ChannelSubscriber(endpoint)
    old._sock.close(linger=0)  # the old one stops listening without removing its file
    _wait_not_listening(path)  # ZeroMQ closes the listener on its I/O thread, a moment later
    new = ChannelSubscriber(endpoint)  # a stale socket is replaced
    try:
        old.close()
        assert stat.S_ISSOCK(path.stat().st_mode), "closing the old one removed the new socket"
    finally:
        new.close()
    assert not path.exists()


def test_ipc_directory_is_created_owner_only(endpoint: str) -> None:
    path = path_of(endpoint)
    assert not path.parent.exists()
    with ChannelSubscriber(endpoint):
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_malformed_messages_are_rejected_and_the_next_one_received(endpoint: str) -> None:
    sub = ChannelSubscriber(endpoint)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    try:
        eng = engine(8)
        good_header = StepHeader(engine=eng, seq=5, time_ns=1, num_rows=1, requests=[
            RequestRows(req_id="r", row_offset=0, num_rows=1, first_position=0,
                        num_prompt_tokens=1, input_token_ids=[3])])
        good = encode_step(good_header, torch.ones(len(LAYERS), 1, 8))
        bad = [
            [b"garbage"],                                   # one frame
            [b"{not json", b""],                            # header garbage
            [bytes(good[0]), bytes(good[1])[:-4]],          # truncated rows
            [bytes(good[0]), b"", b""],                     # three frames
        ]
        for frames in bad:
            push.send_multipart(frames)
        push.send_multipart([bytes(f) for f in good])
        message = sub.recv(timeout_s=5.0)
        assert message is not None
        header, rows = message
        assert header == good_header
        assert torch.equal(rows, torch.ones(len(LAYERS), 1, 8))
        assert sub.rejected == len(bad)
        assert sub.received == 1
        # Only bad messages and a timeout: None, and the rejects are still counted.
        push.send_multipart([b"x", b"y"])
        assert sub.recv(timeout_s=0.2) is None
        assert sub.rejected == len(bad) + 1
        # A heartbeat after all that is still fine.
        push.send_multipart(encode_heartbeat(Heartbeat(engine=eng, time_ns=2)))
        message = sub.recv(timeout_s=5.0)
        assert message is not None and isinstance(message[0], Heartbeat)
    finally:
        push.close(linger=0)
        sub.close()


def test_recv_times_out_without_messages(endpoint: str) -> None:
    with ChannelSubscriber(endpoint) as sub:
        t0 = time.monotonic()
        assert sub.recv(timeout_s=0.1) is None
        assert 0.08 <= time.monotonic() - t0 < 1.0


def test_close_removes_the_socket_file(endpoint: str) -> None:
    path = path_of(endpoint)
    sub = ChannelSubscriber(endpoint)
    assert path.exists()
    sub.close()
    assert not path.exists()


def test_stale_socket_file_is_replaced_on_bind(endpoint: str) -> None:
    path = path_of(endpoint)
    path.parent.mkdir(mode=0o700, parents=True)
    # A socket file left behind by a process that died without cleaning up.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert stat.S_ISSOCK(path.stat().st_mode)
    stale_inode = path.stat().st_ino
    os.link(path, path.parent / "keep")  # so the stale inode cannot be reused by the bind
    pub, sub = connected_pair(endpoint)  # fails unless the new socket really works
    try:
        assert path.stat().st_ino != stale_inode
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert pub.offer(make_step(pub, 2, 1.5))
        message = recv_until(sub, is_step, timeout_s=5.0)
        assert message is not None and torch.all(message[1] == 1.5)
    finally:
        pub.close()
        sub.close()


def test_idle_publisher_follows_sidecar_connections(endpoint: str) -> None:
    """While idle, the sender thread notices a sidecar arrive and leave within a heartbeat
    or two, rather than only when a send fails."""
    pub = ChannelPublisher(endpoint, engine(8), heartbeat_s=0.05)
    try:
        time.sleep(0.2)
        assert not pub.sidecar_connected
        sub = ChannelSubscriber(endpoint)
        try:
            assert recv_until(sub, is_heartbeat) is not None
            assert wait_for(lambda: pub.sidecar_connected, timeout_s=3.0)
        finally:
            sub.close()
        assert wait_for(lambda: not pub.sidecar_connected, timeout_s=3.0)
    finally:
        pub.close()

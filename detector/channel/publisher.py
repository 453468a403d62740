"""The engine side of the channel: hand a step over without ever waiting for the sidecar.

The engine thread only appends to a bounded queue (``offer``); a daemon thread encodes each
message and sends it, waiting for room while a connected sidecar is slow or stalled.
Whatever goes wrong downstream ends as a counted drop, never as a wait in the engine: once
the queue is full ``offer`` drops, and with no sidecar connected the sender drops. The
queue is bounded in steps and bytes, ZeroMQ's send queue by its high-water mark, and
``IMMEDIATE`` keeps ZeroMQ from queueing for a peer that is not connected.

A step carries the engine's full info only when the sidecar may not have it yet (the
wire's module docstring says when); the others name the engine by id.

An engine whose capture is off (from the start, or switched off mid-run) keeps a publisher
that sends a ``CaptureStatus`` saying why in place of each heartbeat: the sidecar, or
``lie-detector capture``, hears the reason within a heartbeat of connecting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from detector.channel.auth import HANDSHAKE_REFUSED, client_options
from detector.channel.socket_dir import ipc_path, private_dir_problem
from detector.channel.wire import (
    ENGINE_INFO_EVERY_S,
    WIRE_VERSION,
    CaptureStatus,
    EngineInfo,
    Heartbeat,
    RequestRows,
    StepHeader,
    encode_heartbeat,
    encode_status,
    encode_step,
    now_ns,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingStep:
    """A step as the engine thread leaves it: plain lists and one CPU tensor."""

    seq: int
    time_ns: int
    rows: torch.Tensor  # (layers, num_rows, hidden), CPU
    requests: list[RequestRows]
    finished: list[str]
    hook_ns: int
    ready: Callable[[], None] | None = None  # waits for a device->host copy, if any
    # Work left to the sender thread (token features from the step's logits), and the
    # bytes it keeps alive until then.
    prepare: Callable[[PendingStep], None] | None = None
    held_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + self.held_bytes


def _leave_engine_cores() -> None:
    """Move the calling (sender) thread off the cores the engine is pinned to.

    vLLM's CPU worker binds its threads to some cores and keeps the others for the API
    server; a thread started from the worker inherits that binding, so without this the
    sender (encoding, token features) would take turns with the model on its own cores.
    Where nothing is pinned (a GPU worker, an unbound CPU one) this changes nothing."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        mine = os.sched_getaffinity(0)
        others = set(range(os.cpu_count() or 1)) - mine
        if others:
            os.sched_setaffinity(0, others)  # 0: this thread only, on Linux
    except OSError:
        pass  # cores outside this process's cpuset: stay where we are


class ChannelPublisher:
    """Bounded, non-blocking, fail-open sender of steps to the sidecar."""

    def __init__(
        self,
        endpoint: str,
        engine: EngineInfo | None,
        *,
        status: CaptureStatus | None = None,
        max_steps: int = 1024,
        max_bytes: int = 256 << 20,
        heartbeat_s: float = 1.0,
        engine_info_s: float = ENGINE_INFO_EVERY_S,
        sndhwm: int = 8,
        key: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self._key = key  # the channel key, presented when connecting (``channel.auth``)
        if engine is None and status is None:
            raise ValueError("a publisher needs an engine, or the status of one that is off")
        self.engine = engine
        # Set once capture is off: sent in place of heartbeats, and steps are dropped.
        self._status = status
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self.heartbeat_s = heartbeat_s
        # The engine's info rides on a step when one is due (sender thread only): the
        # epoch's first step, the first after a sidecar connected or after a step that
        # carried it was dropped, and then one at least every ``engine_info_s``.
        self.engine_info_s = engine_info_s
        self._clock = clock
        self._info_due = True
        self._info_sent_at = 0.0
        self.info_steps = 0  # steps sent with the engine's info
        self._sndhwm = sndhwm
        self._queue: deque[PendingStep] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self.next_seq = 0
        # Highest seq handed to ``offer`` (queued or dropped). Heartbeats report the seq after
        # it, not ``next_seq``: a step whose seq is taken but whose tokens are not sampled yet
        # (asynchronous scheduling) is still to come, and must not look like a gap.
        self._offered_seq = -1
        self.published = 0
        self.dropped = 0
        self.prepare_failures = 0
        self._peer_connected = False  # sender thread only
        self._refusals_logged = False  # sender thread only
        self._poller = zmq.Poller()
        self._thread = threading.Thread(
            target=self._run, name="lie-detector-publisher", daemon=True
        )
        self._thread.start()

    @property
    def sidecar_connected(self) -> bool:
        """Whether a sidecar is connected, as of the sender thread's last look (at most a
        heartbeat period old while idle)."""
        return self._peer_connected

    # -- engine thread -------------------------------------------------------------
    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def offer(self, step: PendingStep) -> bool:
        """Queue a step if there is room; otherwise drop it. Never blocks for long."""
        with self._cond:
            self._offered_seq = max(self._offered_seq, step.seq)
            if (
                self._closed
                or self._status is not None
                or len(self._queue) >= self.max_steps
                or self._queued_bytes + step.nbytes > self.max_bytes
            ):
                self.dropped += 1
                return False
            self._queue.append(step)
            self._queued_bytes += step.nbytes
            self._cond.notify()
        return True

    def switch_off(self, status: CaptureStatus) -> None:
        """Capture is off from now on: drop what is queued and send ``status`` (why) in
        place of every heartbeat. Never blocks for long."""
        with self._cond:
            self._status = status
            while self._queue:
                step = self._queue.popleft()
                self._queued_bytes -= step.nbytes
                self.dropped += 1
            self._cond.notify()

    @property
    def status(self) -> CaptureStatus | None:
        """The capture-off status being sent, if capture is off."""
        return self._status

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=2)

    # -- sender thread -------------------------------------------------------------
    def _run(self) -> None:
        _leave_engine_cores()
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._key is not None:
            client_options(sock, self._key)
        # Connection events tell a slow sidecar (hold the step) from none (drop it). A peer
        # counts once its handshake succeeds: a sidecar that refuses the key is none.
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_REFUSED)
        self._poller.register(sock, zmq.POLLOUT)
        self._poller.register(monitor, zmq.POLLIN)
        if not self._wait_for_private_dir():
            self._close_sockets(sock, monitor)
            return
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            logger.error("lie-detector: cannot connect to %s (%s); capture is off",
                         self.endpoint, exc)
            with self._cond:
                self._closed = True
            self._close_sockets(sock, monitor)
            return
        if self._status is None:
            logger.info("lie-detector: publishing steps to %s", self.endpoint)
        else:
            logger.info("lie-detector: reporting why capture is off to %s", self.endpoint)
        try:
            while True:
                with self._cond:
                    if not self._queue and not self._closed:
                        self._cond.wait(self.heartbeat_s)
                    if self._closed:
                        return
                    step = self._queue.popleft() if self._queue else None
                    if step is not None:
                        self._queued_bytes -= step.nbytes
                    else:
                        # Taken with the queue seen empty: a step offered from now on has
                        # a seq at least this, and is sent after this heartbeat.
                        beat_seq = self._offered_seq + 1
                    status = self._status
                if step is None:
                    # Idle: catch up on connection events, so the state (and its log line)
                    # follows a sidecar within a heartbeat, not at the next failed send.
                    self._read_connection_events(monitor)
                    self._send(sock, encode_status(status) if status is not None
                               else encode_heartbeat(self._heartbeat(beat_seq)))
                    continue
                self._publish(sock, monitor, step)
        except Exception:  # fail-open: the engine must never notice
            logger.exception("lie-detector: publisher stopped; capture is off")
            with self._cond:
                self._closed = True
        finally:
            self._close_sockets(sock, monitor)

    def _wait_for_private_dir(self) -> bool:
        """Connect only into a directory that is this user's alone: whoever else could
        enter it could put their own socket there and receive the steps (and the channel
        key, sent in the handshake). Until it exists and is private, steps are dropped
        (counted) as with no sidecar. False once closed meanwhile."""
        path = ipc_path(self.endpoint)
        if path is None:
            return True
        said = None
        while True:
            problem = private_dir_problem(path.parent)
            if problem is None:
                return True
            if problem != said:
                log = logger.info if not path.parent.exists() else logger.error
                log("lie-detector: not connecting to %s yet: %s; steps are dropped until it "
                    "is a directory only this user can enter", self.endpoint, problem)
                said = problem
            with self._cond:
                if not self._closed:
                    self._cond.wait(self.heartbeat_s)
                if self._closed:
                    return False
                while self._queue:
                    step = self._queue.popleft()
                    self._queued_bytes -= step.nbytes
                    self.dropped += 1

    @staticmethod
    def _close_sockets(sock: zmq.Socket, monitor: zmq.Socket) -> None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)
        sock.close(linger=0)

    def _publish(self, sock: zmq.Socket, monitor: zmq.Socket, step: PendingStep) -> None:
        if step.ready is not None:
            step.ready()
        if step.prepare is not None:
            try:
                step.prepare(step)
            except Exception as exc:  # the step still goes out, its tokens unscored
                self.prepare_failures += 1
                if self.prepare_failures == 1 or self.prepare_failures % 1000 == 0:
                    logger.warning("lie-detector: token features failed (%d steps so far): "
                                   "%r", self.prepare_failures, exc)
            step.prepare = None
        assert self.engine is not None
        # A sidecar that connected since the last look needs the info: catch up first.
        self._read_connection_events(monitor)
        now = self._clock()
        carry = self._info_due or now - self._info_sent_at >= self.engine_info_s
        header = StepHeader.model_construct(
            kind="step",
            version=WIRE_VERSION,
            engine_id=self.engine.engine_id,
            engine=self.engine if carry else None,
            seq=step.seq,
            time_ns=step.time_ns,
            num_rows=int(step.rows.shape[1]),
            requests=step.requests,
            finished=step.finished,
            hook_ns=step.hook_ns,
            dropped_total=self.dropped,
            queue_depth=len(self._queue),
        )
        sent = self._send_waiting(sock, monitor, encode_step(header, step.rows, self.engine))
        if carry and sent:
            self._info_due, self._info_sent_at = False, now
            self.info_steps += 1
        with self._cond:
            if sent:
                self.published += 1
            else:
                self.dropped += 1

    def _send_waiting(self, sock: zmq.Socket, monitor: zmq.Socket, frames: list) -> bool:
        """Send a step, waiting for room while a sidecar is connected; False (a drop) when
        none is, or when closed meanwhile.

        Waiting here is what lets the queue absorb a slow or stalled sidecar: the engine
        thread keeps offering (the queue drops once full) while this thread holds the oldest
        step. Dropping on ZeroMQ's small high-water mark instead loses steps whenever the
        sidecar pauses for a fraction of a second. With no sidecar at all, holding would
        only hand a later one a backlog of old steps, so the step is dropped."""
        while True:
            if self._send(sock, frames):
                return True
            self._read_connection_events(monitor)
            with self._cond:
                if self._closed or not self._peer_connected:
                    return False
            self._poller.poll(100)

    def _read_connection_events(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._peer_connected = True
                self._info_due = True  # a new sidecar knows nothing of this engine yet
                self._refusals_logged = False
                logger.info("lie-detector: a sidecar connected to %s", self.endpoint)
            elif event & HANDSHAKE_REFUSED:
                self._peer_connected = False
                if not self._refusals_logged:  # ZeroMQ retries every second: say it once
                    logger.error("lie-detector: the sidecar at %s refused the handshake (%s); "
                                 "steps are dropped: give both the same channel key "
                                 "(LIE_DETECTOR_CHANNEL_KEY_FILE)", self.endpoint,
                                 "wrong channel key" if self._key is not None
                                 else "it requires a channel key")
                    self._refusals_logged = True
            elif event == zmq.EVENT_DISCONNECTED:
                self._peer_connected = False
                logger.info("lie-detector: the sidecar went away; steps are dropped (counted) "
                            "until one connects")

    def _send(self, sock: zmq.Socket, frames: list) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _heartbeat(self, next_seq: int) -> Heartbeat:
        assert self.engine is not None
        return Heartbeat(
            engine=self.engine,
            time_ns=now_ns(),
            steps_published=self.published,
            dropped_total=self.dropped,
            queue_depth=len(self._queue),
            next_seq=next_seq,
        )


"""The sidecar side of the channel: bind, receive, reject what cannot be trusted.

The sidecar binds and the engine connects, so either side can restart on its own: ZeroMQ
reconnects the engine's socket when a new sidecar binds the same address. An IPC socket
lives in a directory only its owner can enter (one that is not is refused, see
``socket_dir``), and the socket file itself is owner-only.

The subscriber keeps the info of the engines it hears from (``wire.EngineInfoCache``): most
steps only name their engine. A step of an engine whose info it has not got yet (this
sidecar started mid-run) is dropped and counted in ``without_engine_info``, not as a
malformed message; the info comes again within ``wire.ENGINE_INFO_EVERY_S``.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from detector.channel.auth import HANDSHAKE_REFUSED, KeyAuthenticator
from detector.channel.socket_dir import ipc_path, make_private_dir
from detector.channel.wire import EngineInfoCache, Message, UnknownEngine, WireError, decode
from detector.log_throttle import LogThrottle

logger = logging.getLogger(__name__)


MAX_MESSAGE_BYTES = 1 << 30  # ZeroMQ drops larger messages before we allocate them


class ChannelError(RuntimeError):
    """The channel cannot be bound (another sidecar holds it, or the path is not ours)."""


def _prepare_socket_path(path: Path) -> None:
    """Make sure the socket's directory is private; clear a stale socket, never a live one."""
    try:
        make_private_dir(path.parent)
    except PermissionError as exc:
        raise ChannelError(f"{exc}; use a directory of your own, for example "
                           f"ipc://{path.parent / 'lie-detector' / path.name}") from None
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ChannelError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: left by a sidecar that died
        return
    finally:
        probe.close()
    raise ChannelError(f"another process is listening on {path}; is a sidecar already running?")


class ChannelSubscriber:
    """Receives and decodes steps; malformed messages are counted and skipped."""

    def __init__(self, endpoint: str, *, rcvhwm: int = 64, key: bytes | None = None) -> None:
        self.endpoint = endpoint
        self.rejected = 0
        self.rejected_connections = 0  # handshakes refused: no key, or the wrong one
        self.received = 0
        # Steps dropped because their engine's info had not been received (see above).
        self.without_engine_info = 0
        self.engines = EngineInfoCache()
        self._reject_log = LogThrottle()
        self._unknown_log = LogThrottle()
        self._refusal_log = LogThrottle()
        path = ipc_path(endpoint)
        if path is not None:
            _prepare_socket_path(path)
        # With a key, a context of its own: its ZAP handler judges this socket only.
        self._ctx = zmq.Context() if key is not None else zmq.Context.instance()
        self._auth = KeyAuthenticator(self._ctx, key) if key is not None else None
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._monitor = None
        if key is not None:
            self._sock.setsockopt(zmq.PLAIN_SERVER, 1)
            self._monitor = self._sock.get_monitor_socket(HANDSHAKE_REFUSED)
        self._sock.bind(endpoint)
        self._inode = None
        if path is not None:
            os.chmod(path, 0o600)
            st = path.stat()
            self._inode = (st.st_ino, st.st_ctime_ns)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)

    @property
    def authenticated(self) -> bool:
        """Whether only peers holding the channel key are admitted."""
        return self._auth is not None

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next valid message, or None when ``timeout_s`` passes without one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = dict(self._poller.poll(None if wait is None else int(wait * 1000)))
            if not ready:
                return None
            if self._monitor is not None and self._monitor in ready:
                self._read_refusals()
            if self._sock in ready:
                frames = self._sock.recv_multipart(copy=False)
                try:
                    message = decode([f.buffer for f in frames], self.engines)
                except UnknownEngine as exc:
                    self._without_info(str(exc))
                except WireError as exc:
                    self._reject(str(exc))
                except Exception as exc:  # never let a bad message take the sidecar down
                    self._reject(f"undecodable message: {type(exc).__name__}: {exc}")
                else:
                    self.received += 1
                    return message
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _read_refusals(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.rejected_connections += 1
            if self._refusal_log.ready():
                logger.warning("channel: refused a connection without the channel key (%d so "
                               "far)", self.rejected_connections)

    def _without_info(self, reason: str) -> None:
        self.without_engine_info += 1
        if self._unknown_log.ready():
            logger.info("channel: dropped a step whose engine is not known yet (%d so far): %s",
                        self.without_engine_info, reason)

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        if self._reject_log.ready():
            logger.warning("channel: rejected a message (%d so far): %s", self.rejected, reason)

    def close(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.close()
            self._ctx.term()
        path = ipc_path(self.endpoint)
        # Remove our socket file only: a newer sidecar may have bound the path since.
        try:
            st = path.stat() if path is not None else None
            if st is not None and (st.st_ino, st.st_ctime_ns) == self._inode:
                path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> ChannelSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

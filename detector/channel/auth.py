"""Who may write to the channel: an engine that holds the deployment's channel key.

The key is a secret file both ends read (``lie-detector serve`` writes one per instance; in
Kubernetes a mounted Secret). The engine presents it in ZeroMQ's PLAIN handshake and the
sidecar checks it in a ZAP handler, once per connection: no per-message cost on the
engine's hot path. The transport is a local IPC socket in an owner-only directory, so the
key is never on a network. Without a key the channel is open to any process of this user
that can reach the socket (the sidecar says so at start-up).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import threading
from pathlib import Path

import zmq

logger = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
USERNAME = b"lie-detector-engine"
MIN_KEY_CHARS = 32
MAX_KEY_BYTES = 255  # PLAIN's limit
# Monitor events of a handshake a keyed channel refuses: a wrong key (AUTH), no key at all
# (PROTOCOL), or neither said.
HANDSHAKE_REFUSED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class ChannelKeyError(ValueError):
    """The channel key file is missing, readable by others, or not a usable key."""


def read_key(path: str | Path) -> bytes:
    """The key in ``path``: refused if group or others can read it, or if it is too short."""
    path = Path(path)
    try:
        st = path.stat()
        raw = path.read_bytes()[: MAX_KEY_BYTES + 2]
    except OSError as exc:
        raise ChannelKeyError(f"channel key {path}: cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ChannelKeyError(f"channel key {path}: not a regular file")
    if st.st_mode & 0o077:
        raise ChannelKeyError(f"channel key {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                              "group or others read it (it must be 0600 or 0400)")
    key = raw.strip()
    if len(key) < MIN_KEY_CHARS or len(key) > MAX_KEY_BYTES:
        raise ChannelKeyError(f"channel key {path}: must be {MIN_KEY_CHARS}-{MAX_KEY_BYTES} "
                              f"bytes, got {len(key)}")
    return key


def write_key(path: str | Path) -> Path:
    """Write a fresh random key to ``path`` (mode 0600)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path


def client_options(sock: zmq.Socket, key: bytes) -> None:
    """Make ``sock`` present ``key`` when it connects."""
    sock.setsockopt(zmq.PLAIN_USERNAME, USERNAME)
    sock.setsockopt(zmq.PLAIN_PASSWORD, key)


class KeyAuthenticator:
    """A ZAP handler in ``ctx`` that admits PLAIN peers presenting ``key``; every other
    handshake on a ``plain_server`` socket of that context fails."""

    def __init__(self, ctx: zmq.Context, key: bytes) -> None:
        self._key = key
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name="lie-detector-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(200):
                    continue
                frames = self._sock.recv_multipart()
            except zmq.ZMQError:
                return
            self._sock.send_multipart(self._reply(frames))

    def _reply(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, _address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        ok = (mechanism == b"PLAIN" and len(creds) == 2 and creds[0] == USERNAME
              and hmac.compare_digest(creds[1], self._key))
        if ok:
            return [version, request_id, b"200", b"OK", USERNAME, b""]
        self.refused += 1
        return [version, request_id, b"400", b"wrong or missing channel key", b"", b""]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)

"""Transport security and who may change the probe registry.

Reads (scores, probes list, health) are open to whoever can reach the port, which is
loopback unless configured otherwise. The admin calls (``LoadProbe``, ``UnloadProbe``)
change what every request is judged by, so they are refused unless a bearer token or an
mTLS client identity explicitly allows them.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)


def server_credentials(cert_file: Path, key_file: Path,
                       client_ca_file: Path | None = None) -> grpc.ServerCredentials:
    """TLS, or mutual TLS when a client CA is given (clients must present a cert it signed)."""
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=client_ca_file.read_bytes() if client_ca_file else None,
        require_client_auth=client_ca_file is not None,
    )


class AdminGuard:
    """Allows an admin call for a matching bearer token or an allowed mTLS identity."""

    def __init__(self, *, token: str | None = None, identities: Sequence[str] = ()) -> None:
        self._token = token.encode() if token else None
        self._identities = {i.encode() for i in identities}

    @property
    def enabled(self) -> bool:
        return self._token is not None or bool(self._identities)

    def check(self, context: grpc.ServicerContext, call: str) -> None:
        """Return if allowed; otherwise abort with UNAUTHENTICATED or PERMISSION_DENIED."""
        if not self.enabled:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{call} is disabled: start the sidecar with an admin token "
                          "(LIE_DETECTOR_ADMIN_TOKEN) or admin mTLS identities")
        if self._identities:
            peer = context.auth_context()
            names = set(peer.get("x509_common_name", [])) | set(
                peer.get("x509_subject_alternative_name", []))
            if names & self._identities:
                return
        if self._token is not None:
            metadata = dict(context.invocation_metadata())
            presented = metadata.get("authorization", "")
            if presented.startswith("Bearer ") and hmac.compare_digest(
                    presented[len("Bearer "):].encode(), self._token):
                return
            if not presented:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"{call} needs 'authorization: Bearer <admin token>' metadata")
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{call} is not allowed for this caller")


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")

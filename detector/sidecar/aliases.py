"""Which stored requests an id a client asks by names.

Requests are found by their engine id (``cmpl-X-0-1a2b3c4d``), by the response id the API
client sees (``cmpl-X`` / ``chatcmpl-X``) and by the ``X-Request-Id`` they were sent with
(``X``); long or odd ids by the bounded form the hook sends. The id grammar itself is
:mod:`detector.channel.ids`, shared with the engine and the middleware; this is the
sidecar's index over it. Not thread-safe: the store calls it under its lock.
"""

from __future__ import annotations

from detector.channel.ids import lookup_forms, request_aliases


class RequestAliases:
    """Every id a client may ask by -> the engine ids known by it, oldest first. An id can
    be shared (a reused X-Request-Id, a retry): a lookup's newest is the request meant."""

    def __init__(self) -> None:
        self._ids: dict[str, list[str]] = {}

    def add(self, req_id: str) -> None:
        """Index a new request (``req_id``: its engine id) under every id it is known by."""
        for alias in request_aliases(req_id):
            self._ids.setdefault(alias, []).append(req_id)

    def remove(self, req_id: str) -> None:
        """Forget a dropped request."""
        for alias in request_aliases(req_id):
            ids = self._ids.get(alias)
            if ids is not None and req_id in ids:
                ids.remove(req_id)
                if not ids:
                    del self._ids[alias]

    def known_by(self, request_id: str) -> list[str]:
        """The engine ids of the requests known by ``request_id`` (its own engine id, an
        X-Request-Id or a response id, long or odd ones in the hook's bounded form),
        oldest first."""
        for form in lookup_forms(request_id):
            ids = self._ids.get(form)
            if ids:
                return ids
        return []

    def __len__(self) -> int:
        return len(self._ids)


__all__ = ["RequestAliases"]

"""A gRPC call's context as the detector's handlers see it, on the asyncio server.

The handlers (``detector.sidecar.service``) and their helpers refuse a call with
``context.abort(code, message)`` from wherever they find the problem, often several calls
deep and sometimes on a worker thread (``AdminGuard.check``, id checks, id resolution).
grpc.aio's ``abort`` is a coroutine, which a plain function cannot await. Here ``abort``
raises :class:`Aborted` instead, and :func:`adapt` wraps each handler so the status is
sent where it can be awaited: the helpers stay plain functions, and statuses and messages
stay exactly what they were on the thread-per-call server.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, NoReturn

import grpc
import grpc.aio


class Aborted(Exception):
    """A handler refused its call: the status to send."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class CallContext:
    """The call's aio context with a synchronous ``abort`` and the sync server's
    ``is_active``; the rest is the aio context's."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise Aborted(code, details)

    def is_active(self) -> bool:
        # A cancelled call or a passed deadline also cancels the handler's task; this is
        # for loops that check between awaits.
        return not (self._context.done() or self._context.cancelled())

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def invocation_metadata(self) -> Iterable[tuple[str, str | bytes]] | None:
        return self._context.invocation_metadata()

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._context.auth_context()

    def peer(self) -> str:
        return self._context.peer()


def adapt(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """``behaviour`` (a coroutine or async-generator handler taking ``(request,
    CallContext)``) as the aio server calls it: with the aio context, an abort sent."""
    if inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[Any]:
            try:
                async for reply in behaviour(request, CallContext(context)):
                    yield reply
            except Aborted as refused:
                await context.abort(refused.code, refused.details)
        return stream
    if inspect.iscoroutinefunction(behaviour):
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behaviour(request, CallContext(context))
            except Aborted as refused:
                await context.abort(refused.code, refused.details)
        return unary
    raise TypeError(f"{behaviour!r} is not a coroutine or async generator function: on the "
                    "asyncio server a plain handler would hold the event loop")


class AdaptedServicer:
    """A servicer whose methods are ``servicer``'s, adapted: what ``add_*_to_server``
    registers."""

    def __init__(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return adapt(getattr(self._servicer, name))


__all__ = ["AdaptedServicer", "Aborted", "CallContext", "adapt"]

"""The sidecar's gRPC server: grpc.aio on an event loop of its own thread.

The thread-per-call server held a thread for every open ``StreamScores`` (and every
``GetScores`` that waits for the end): at 256 watched streams the process ran ~270 threads
that all woke on every step, and health checks queued behind them (benchmarks/watchers.py).
Here every call is a coroutine on one loop: a waiting stream holds a future and a timer
(``detector.sidecar.changes``), not a thread. The CPU work of an update (snapshot,
re-judging the answer, building the message) runs on a small worker pool (``WORKERS``
threads, each ending after ``idle_thread_s`` idle), so the loop stays free to answer health
checks and a burst of streams leaves nothing behind.

Other threads talk to the server through :class:`GrpcServer`, whose methods block until the
loop has done what they ask.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.sidecar.calls import AdaptedServicer
from detector.sidecar.pool import ElasticThreadPool
from detector.sidecar.security import is_loopback
from detector.sidecar.service import HOOK_HEALTH_NAME, SERVICE_NAME, DetectorService

logger = logging.getLogger(__name__)

# Threads for the calls' CPU work and blocking reads (re-judging answers, loading probes).
# The work is Python under the GIL: more threads would not run more of it at once, and each
# one more takes the GIL from the loop, which answers health checks (benchmarks/grpc_threads.py,
# 256 streams on a loaded 2-core machine: health-check p50 6 ms with 2 workers, 29-92 ms
# with 8).
WORKERS = 2
# How long ``GrpcServer`` waits for the loop's thread to end.
_LOOP_TIMEOUT_S = 30.0

T = TypeVar("T")


class GrpcServer:
    """The detector service, the standard health service and reflection on one port.

    Built (and the port bound) on construction; ``start`` serves; ``stop`` drains."""

    def __init__(self, service: DetectorService, address: str, *,
                 credentials: grpc.ServerCredentials | None = None,
                 idle_thread_s: float = 30.0, workers: int = WORKERS) -> None:
        self.service = service
        service.workers = ElasticThreadPool(workers, idle_s=idle_thread_s,
                                            thread_name_prefix="grpc-work")
        self._loop = asyncio.new_event_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._thread.start()
        try:
            self._server, self._health, self.port = self._call(
                self._build(address, credentials))
        except BaseException:
            self._end_loop()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _build(self, address: str, credentials: grpc.ServerCredentials | None
                     ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        self.service.changes.bind(asyncio.get_running_loop())
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 1 << 20)],
            interceptors=[MalformedRequestInterceptor()],
        )
        pb_grpc.add_DetectorServicer_to_server(AdaptedServicer(self.service), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            if not is_loopback(address):
                logger.warning("gRPC listens on %s without TLS: anyone who can reach it can "
                               "read scores; set tls_cert_file/tls_key_file", address)
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(HOOK_HEALTH_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        return server, health_servicer, port

    def start(self) -> None:
        self._call(self._server.start())

    def set_health(self, name: str, status: int) -> None:
        """Set a health entry from any thread, without waiting: the scoring thread reports
        the hook and must not wait for a busy loop. Scheduled in call order, so a status set
        before ``stop`` is in place before the server stops. Once the server is stopping,
        statuses no longer change."""
        if self._stopping:
            return
        if threading.current_thread() is self._thread:
            self._loop.create_task(self._health.set(name, status))
        else:
            asyncio.run_coroutine_threadsafe(self._health.set(name, status), self._loop)

    def stop(self, grace_s: float | None) -> None:
        """Refuse new calls, let open ones finish for ``grace_s``, cancel the rest, end the
        loop's thread and the workers."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._call(self._stop(grace_s))
        finally:
            self._end_loop()

    async def _stop(self, grace_s: float | None) -> None:
        await self._server.stop(grace_s)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def _end_loop(self) -> None:
        self.service.changes.unbind()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_LOOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        if self.service.workers is not None:
            self.service.workers.shutdown(wait=False)


class _Malformed:
    """What a request that is not a valid protobuf message deserialises to."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _refusal(bad: _Malformed) -> str:
    return f"malformed request message ({bad.reason})"


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answer INVALID_ARGUMENT, not INTERNAL, to bytes that do not parse as the request.

    grpcio turns a deserializer's exception into INTERNAL ("Exception deserializing
    request!"), which tells a client the server is broken. Every method (ours, health,
    reflection) gets a deserializer that never raises and a check that refuses the result.
    """

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def safe_parse(raw: bytes) -> object:
            try:
                return parse(raw)
            except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
                return _Malformed(f"{type(exc).__name__}: {exc}"[:200])

        changes: dict[str, Any] = {"request_deserializer": safe_parse}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                changes[kind] = _checked(behaviour, kind.startswith("stream_"))
        return handler._replace(**changes)


def _checked(behaviour: Callable[..., Any], streamed_requests: bool) -> Callable[..., Any]:
    """``behaviour`` refusing malformed requests (aio handlers: coroutine or async generator,
    the same kind as ``behaviour``: the server calls each kind differently)."""

    async def requests_checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
            yield request

    async def first(request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The request the behaviour is given: checked (unary) or the checked stream."""
        if streamed_requests:
            return requests_checked(request, context)
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
        return request

    if inspect.isasyncgenfunction(behaviour):
        async def replies(request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
            async for reply in behaviour(await first(request, context), context):
                yield reply
        return replies
    if inspect.iscoroutinefunction(behaviour):
        async def reply(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(await first(request, context), context)
        return reply
    raise TypeError(f"{behaviour!r} is not a coroutine or async generator function")


__all__ = ["WORKERS", "GrpcServer", "MalformedRequestInterceptor"]

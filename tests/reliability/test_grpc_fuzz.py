"""The gRPC API under hostile input (hypothesis): every call gets a status a client can act
on, never UNKNOWN or INTERNAL; the server keeps serving and its memory stays bounded.

One in-process sidecar (no vLLM) with an admin token, one probe, and a few requests fed
through its real pipeline, so random ids sometimes hit real requests and random probe names
sometimes hit a real probe.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import free_port
from tiny_engine import engine, make_step, probe, schedule

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.settings import SuiteSettings
from detector.sidecar.app import Sidecar, SidecarSettings
from detector.sidecar.service import MAX_ID_LENGTH

TOKEN = "fuzz-admin-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
PROBE_NAME = "prod"
MAX_RECEIVE = 1 << 20  # the server's grpc.max_receive_message_length

# Statuses a client can act on. DEADLINE_EXCEEDED is the client's own deadline running out
# on a call that may wait (wait_until_finished, streams); UNIMPLEMENTED only for unknown paths.
ACTIONABLE = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED,
}

FUZZ = settings(max_examples=SuiteSettings().fuzz_examples,
                deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Every method the server has: (path, request streaming, response streaming).
METHODS = [
    ("/liedetector.v1.Detector/GetScores", False, False),
    ("/liedetector.v1.Detector/StreamScores", False, True),
    ("/liedetector.v1.Detector/ListProbes", False, False),
    ("/liedetector.v1.Detector/LoadProbe", False, False),
    ("/liedetector.v1.Detector/UnloadProbe", False, False),
    ("/grpc.health.v1.Health/Check", False, False),
    ("/grpc.health.v1.Health/Watch", False, True),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, True),
]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    probe_path = probe(PROBE_NAME, [1, 3], "producer", 1).save(d / PROBE_NAME)
    settings_ = SidecarSettings(channel=f"ipc://{d}/ch.sock",
                                grpc_address=f"127.0.0.1:{free_port()}", metrics_port=None,
                                admin_token=TOKEN, probes=[probe_path], max_streams=8,
                                shutdown_grace_s=0)
    sc = Sidecar(settings_)
    sc.start()
    for message in schedule():  # requests "A" and "B", finished
        sc.pipeline.handle(message)
    sc.pipeline.handle(schedule()[0])  # a stale replay: refused, "A" stays finished
    sc.pipeline.handle(make_step(len(schedule()), [], [], engine()))  # an empty step
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def channel(sidecar):
    with grpc.insecure_channel(sidecar.settings.grpc_address,
                               options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        yield ch


def _code(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, bytearray)):
            for _ in result:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _assert_actionable(code: grpc.StatusCode, what: str) -> None:
    assert code in ACTIONABLE, f"{what}: {code}"


def _assert_serving(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "liedetector.v1.Detector"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _streams_released(sidecar, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sidecar.service.open_calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sidecar.service.open_calls == 0, "a stream or wait slot leaked"


# ------------------------------------------------------------------ request ids
_any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=700)


class Oversized(str):
    """A request id past the receive limit, with a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Oversized({len(self)} chars)"


_oversized = st.integers(MAX_RECEIVE + 1, MAX_RECEIVE + 4096).map(lambda n: Oversized("x" * n))
_known = st.sampled_from(["A", "B", "e1", "cmpl-A", "A-0", "a"])
# Oversized ids take gRPC a few hundred ms to refuse: one draw in 16.
request_ids = st.integers(0, 15).flatmap(
    lambda i: _oversized if i == 0 else st.one_of(_any_text, _known, st.just("y" * 513)))


@FUZZ
@given(request_id=request_ids, kind=st.sampled_from(["get", "wait", "stream"]))
@example(request_id=Oversized("z" * (2 << 20)), kind="get")  # 2 MiB: over the receive limit
@example(request_id="\x00", kind="stream")
@example(request_id="A", kind="wait")
def test_random_request_ids(channel, request_id: str, kind: str) -> None:
    stub = pb_grpc.DetectorStub(channel)
    oversized = len(request_id.encode()) > MAX_RECEIVE
    # Calls that may wait get a short deadline; uploading an oversized one may take longer.
    short = 10 if oversized else 0.25
    if kind == "get":
        code = _code(lambda: stub.GetScores(pb.GetScoresRequest(request_id=request_id),
                                            timeout=10))
    elif kind == "wait":
        code = _code(lambda: stub.GetScores(
            pb.GetScoresRequest(request_id=request_id, wait_until_finished=True), timeout=short))
    else:
        code = _code(lambda: stub.StreamScores(
            pb.StreamScoresRequest(request_id=request_id), timeout=short))
    _assert_actionable(code, f"{kind} {request_id[:40]!r}")
    if oversized:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    elif not request_id or len(request_id) > MAX_ID_LENGTH or not request_id.isprintable():
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    if request_id in ("A", "B") and kind != "stream":
        assert code == grpc.StatusCode.OK


def test_known_requests_still_read_correctly(channel) -> None:
    """The fixture's requests, including after a stale replay: finished, every token scored."""
    stub = pb_grpc.DetectorStub(channel)
    for req_id, n in (("A", 6), ("B", 4)):
        reply = stub.GetScores(pb.GetScoresRequest(request_id=req_id), timeout=5)
        assert reply.state == pb.REQUEST_STATE_FINISHED
        assert len(reply.tokens) == n and all(t.scored for t in reply.tokens)


# ------------------------------------------------------------------ raw bytes
def _valid_payloads() -> list[bytes]:
    return [
        pb.GetScoresRequest(request_id="A").SerializeToString(),
        pb.StreamScoresRequest(request_id="B").SerializeToString(),
        pb.LoadProbeRequest(path="/nonexistent", replace=True).SerializeToString(),
        pb.UnloadProbeRequest(name="nope").SerializeToString(),
        health_pb2.HealthCheckRequest(service="liedetector.v1.Hook").SerializeToString(),
        reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="liedetector.v1.Detector").SerializeToString(),
    ]


@st.composite
def payloads(draw) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=2048))
    base = bytearray(draw(st.sampled_from(_valid_payloads())))
    if choice == 1:  # flip bytes of a valid message
        for _ in range(draw(st.integers(1, 4))):
            if base:
                base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
        return bytes(base)
    if choice == 2:  # truncate a valid message
        return bytes(base[: draw(st.integers(0, max(0, len(base) - 1)))])
    # a length prefix claiming far more than the message holds
    return b"\x0a" + draw(st.sampled_from([b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x80\x01",
                                           b"\xff\xff\xff\x7f"])) + bytes(base)


def _identity(x: bytes) -> bytes:
    return x


def _raw_call(channel, method: tuple[str, bool, bool], payload: bytes, metadata) -> grpc.StatusCode:
    path, req_stream, resp_stream = method
    timeout = 0.5 if resp_stream and len(payload) < 65536 else 10
    kw = dict(request_serializer=_identity, response_deserializer=_identity)
    if req_stream:
        call = channel.stream_stream(path, **kw)
        return _code(lambda: call(iter([payload]), timeout=timeout, metadata=metadata))
    if resp_stream:
        call = channel.unary_stream(path, **kw)
        return _code(lambda: call(payload, timeout=timeout, metadata=metadata))
    call = channel.unary_unary(path, **kw)
    return _code(lambda: call(payload, timeout=timeout, metadata=metadata))


@FUZZ
@given(method=st.sampled_from(METHODS), payload=payloads(), admin=st.booleans())
@example(method=METHODS[0], payload=b"\x0a\x02\xff\xfe", admin=False)  # bad UTF-8 in a string
@example(method=METHODS[5], payload=b"\xff\xff\xff", admin=False)
@example(method=METHODS[7], payload=b"\x0a\x05ab", admin=False)
@example(method=METHODS[0], payload=b"\x0a" + b"\xff\xff\x7f" + b"x" * (MAX_RECEIVE + 8),
         admin=False)
def test_random_bytes_to_every_method(sidecar, channel, method, payload: bytes,
                                      admin: bool) -> None:
    code = _raw_call(channel, method, payload, ADMIN if admin else ())
    _assert_actionable(code, f"{method[0]} {payload[:40]!r}")
    assert [p.artifact.metadata.name for p in sidecar.registry.probes()] == [PROBE_NAME]


def test_malformed_message_is_invalid_argument_not_internal(channel) -> None:
    """grpcio's own answer to an undecodable request is INTERNAL; the sidecar's is not."""
    for path, *_ in METHODS[:6]:
        if path.endswith("/ListProbes"):
            continue  # no fields: any well-formed bytes are unknown fields, and valid
        code = _raw_call(channel, (path, False, "Stream" in path), b"\x0a\x02\xff\xfe", ADMIN)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, path
    code = _raw_call(channel, METHODS[7], b"\xff\xff\xff", ())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code = _raw_call(channel, ("/liedetector.v1.Detector/Nope", False, False), b"", ())
    assert code == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------ admin calls
_paths = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=300),
    st.text(max_size=5000, alphabet="/.a~$%{}\\"),
    st.sampled_from(["/", "/proc/self", "/proc/kcore", "/dev/zero", "/dev/urandom", "/etc/passwd",
                     ".", "..", "../../../../etc", "~", "probes", "\x00", "/tmp/\x00x",
                     "/proc/self/fd/0", "/sys/kernel"]),
)


@FUZZ
@given(path=_paths, replace=st.booleans())
@example(path="x" * 4097, replace=False)
@example(path="a" * 300, replace=False)  # a name the OS refuses: ENAMETOOLONG, not UNKNOWN
def test_load_probe_with_random_paths(sidecar, channel, path: str, replace: bool) -> None:
    stub = pb_grpc.DetectorStub(channel)
    code = _code(lambda: stub.LoadProbe(pb.LoadProbeRequest(path=path, replace=replace),
                                        timeout=10, metadata=ADMIN))
    _assert_actionable(code, f"LoadProbe {path[:60]!r}")
    assert code != grpc.StatusCode.OK, f"LoadProbe {path!r} loaded something"
    assert [p.artifact.metadata.name for p in sidecar.registry.probes()] == [PROBE_NAME]


@FUZZ
@given(name=st.text(st.characters(blacklist_categories=("Cs",)), max_size=600))
@example(name="")
def test_unload_probe_with_random_names(sidecar, channel, name: str) -> None:
    stub = pb_grpc.DetectorStub(channel)
    if name == PROBE_NAME:
        name += "-not"
    code = _code(lambda: stub.UnloadProbe(pb.UnloadProbeRequest(name=name), timeout=5,
                                          metadata=ADMIN))
    assert code in ({grpc.StatusCode.INVALID_ARGUMENT} if not name
                    else {grpc.StatusCode.NOT_FOUND}), code
    assert [p.artifact.metadata.name for p in sidecar.registry.probes()] == [PROBE_NAME]


_header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


@FUZZ
@given(value=st.one_of(_header_values, _header_values.map(lambda v: "Bearer " + v),
                       st.just("Bearer " + TOKEN + " "), st.just("bearer " + TOKEN),
                       st.just("Bearer " + TOKEN[:-1])),
       call=st.sampled_from(["load", "unload"]))
def test_admin_calls_refuse_every_wrong_credential(channel, value: str, call: str) -> None:
    stub = pb_grpc.DetectorStub(channel)
    if value.strip() == f"Bearer {TOKEN}":
        value = "Bearer wrong"
    md = (("authorization", value),) if value else ()
    if call == "load":
        code = _code(lambda: stub.LoadProbe(pb.LoadProbeRequest(path="/x"), timeout=5,
                                            metadata=md))
    else:
        code = _code(lambda: stub.UnloadProbe(pb.UnloadProbeRequest(name=PROBE_NAME),
                                              timeout=5, metadata=md))
    assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), \
        (value, code)


# ------------------------------------------------------------------ afterwards
def test_still_serving_with_memory_bounded(sidecar, channel) -> None:
    """After everything above, and while oversized and malformed calls keep coming, the
    server answers, holds no stream slot, and its memory does not grow with the calls
    (client and server share this process: neither may keep what it was sent)."""
    rng = random.Random(5)
    rss = psutil.Process().memory_info

    unary = [m for m in METHODS if not (m[1] or m[2])]

    def barrage(n: int) -> None:
        for i in range(n):
            payload = (b"\x0a" + b"\x81\x80\x40" + os.urandom(MAX_RECEIVE + 16) if i % 5 == 0
                       else rng.randbytes(rng.randrange(1, 512)))
            method = unary[i % len(unary)]
            _assert_actionable(_raw_call(channel, method, payload, ADMIN), method[0])

    barrage(40)  # warm up: allocator arenas, gRPC buffers, thread stacks
    _streams_released(sidecar)
    before = rss().rss
    barrage(200)
    _streams_released(sidecar)
    growth = rss().rss - before
    print(f"\nfuzz barrage: RSS {before / 2**20:.0f} MiB -> {(before + growth) / 2**20:.0f} MiB")
    # 40 oversized (1 MiB) requests went through; holding on to them would be >= 40 MiB.
    assert growth < 32 << 20, f"RSS grew {growth / 2**20:.0f} MiB over 200 hostile calls"
    _assert_serving(channel)
    stub = pb_grpc.DetectorStub(channel)
    assert stub.GetScores(pb.GetScoresRequest(request_id="A"), timeout=5).state == \
        pb.REQUEST_STATE_FINISHED
    assert [p.name for p in stub.ListProbes(pb.ListProbesRequest(), timeout=5).probes] == \
        [PROBE_NAME]
    assert Path(sidecar.settings.channel[len("ipc://"):]).exists()

"""detector.serving.client without vLLM: reply conversion, errors when the sidecar is down, and
TLS / mutual TLS / admin token against a real in-process sidecar (no engine attached)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest
from support import free_port, make_pki, start_inprocess_sidecar

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.serving.client import (
    AsyncDetectorClient,
    CaptureState,
    DetectorClient,
    DetectorError,
    RequestState,
    TLSConfig,
    probes_from_pb,
    scores_from_pb,
    update_from_pb,
)


def _reply() -> pb.ScoresResponse:
    return pb.ScoresResponse(
        request_id="cmpl-1", engine_request_id="cmpl-1-abc", state=pb.REQUEST_STATE_FINISHED,
        num_prompt_tokens=4, probes=["p", "q"], text="Paris is big",
        tokens=[pb.TokenScore(index=0, position=4, token_id=11, scored=True, text="Paris",
                              scores=[pb.ProbeScore(probe="p", probability=0.75, flagged=True)],
                              generated_unix_nano=123),
                pb.TokenScore(index=1, position=5, token_id=12, scored=False, text=" is")],
        spans=[pb.Span(char_start=0, char_end=5, token_start=0, token_end=1, text="Paris",
                       kind="claim", probe="p", score=0.75, threshold=0.5, flagged=True),
               pb.Span(char_start=0, char_end=12, token_start=0, token_end=3,
                       text="Paris is big", kind="sentence", probe="p", score=0.75,
                       threshold=0.5, flagged=True)],
        verdicts=[pb.ResponseVerdict(probe="p", score=0.75, threshold=0.5, flagged=True,
                                     claims=1, flagged_claims=1),
                  pb.ResponseVerdict(probe="q", score=float("nan"), threshold=0.5)],
        requests_with_id=1)


def test_scores_convert_field_by_field() -> None:
    s = scores_from_pb(_reply())
    assert (s.request_id, s.engine_request_id, s.state) == ("cmpl-1", "cmpl-1-abc",
                                                            RequestState.FINISHED)
    assert s.state.done and s.probes == ("p", "q") and s.num_prompt_tokens == 4
    first, second = s.tokens
    assert (first.index, first.position, first.token_id, first.text) == (0, 4, 11, "Paris")
    assert first.scored and first.generated_unix_nano == 123
    assert first.score("p") is not None and first.score("p").probability == 0.75
    assert first.score("q") is None
    assert not second.scored and second.scores == ()
    assert [sp.text for sp in s.claims] == ["Paris"]
    assert all(s.text[sp.char_start:sp.char_end] == sp.text for sp in s.spans)
    assert len(s.flagged_spans) == 2 and s.flagged
    # A probe that judged no claim: NaN on the wire, None here.
    assert s.verdict("q") is not None and s.verdict("q").score is None
    assert not s.verdict("q").flagged and s.verdict("q").claims == 0
    assert s.verdict("p").score == 0.75 and s.verdict("missing") is None
    # Frozen, hashable, comparable.
    with pytest.raises(AttributeError):
        s.text = "x"  # type: ignore[misc]
    assert scores_from_pb(_reply()) == s and hash(s.spans[0]) == hash(s.spans[0])


def test_unknown_enum_values_read_as_unspecified() -> None:
    """A newer sidecar's state or capture state is not one this client can act on."""
    reply = _reply()
    reply.state = 7
    assert scores_from_pb(reply).state is RequestState.UNSPECIFIED
    assert not RequestState.UNSPECIFIED.done and not RequestState.RUNNING.done
    assert RequestState.INCOMPLETE.done
    update = pb.ScoresUpdate(request_id="r", state=42, final=True,
                             verdicts=[pb.ResponseVerdict(probe="p", score=math.nan)])
    u = update_from_pb(update)
    assert u.state is RequestState.UNSPECIFIED and u.final and u.verdicts[0].score is None
    listing = pb.ListProbesResponse(
        probes=[pb.ProbeInfo(name="p", layers=[8, 15], threshold=0.5, inactive_reason="x",
                             token_features=["logprob"])],
        capture_status=pb.CaptureStatus(state=9, summary="?", pid=3, layers=[8]))
    probes = probes_from_pb(listing)
    assert probes.capture_status.state is CaptureState.UNSPECIFIED
    assert probes.capture_status.pid == 3 and probes.capture_status.layers == (8,)
    info = probes.get("p")
    assert info is not None and info.layers == (8, 15) and not info.active
    assert info.token_features == ("logprob",) and probes.get("other") is None
    empty = probes_from_pb(pb.ListProbesResponse())
    assert empty.probes == () and empty.capture_status.state is CaptureState.UNSPECIFIED


def test_sidecar_down_is_unavailable() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens
    with DetectorClient(address, timeout=5) as client:
        for call in (client.list_probes, lambda: client.get_scores("x"),
                     lambda: list(client.stream_scores("x", timeout=5)),
                     lambda: client.unload_probe("p")):
            with pytest.raises(DetectorError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
            assert err.value.details

    async def main() -> None:
        async with AsyncDetectorClient(address, timeout=5) as client:
            with pytest.raises(DetectorError) as err:
                await client.list_probes()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(DetectorError) as err:
                async for _ in client.stream_scores("x", timeout=5):
                    pass
            assert err.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        DetectorClient("")
    with pytest.raises(ValueError):
        TLSConfig(client_cert=Path("c.crt")).credentials()


# ---- a real sidecar (in-process, no engine) --------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ("server", "admin-client", "reader-client"))


def test_admin_token_errors(tmp_path) -> None:
    sidecar = start_inprocess_sidecar(tmp_path, admin_token="s3cret")
    address = sidecar.settings.grpc_address
    try:
        with DetectorClient(address) as client:
            with pytest.raises(DetectorError) as err:
                client.unload_probe("p")
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "admin token" in err.value.details and err.value.method == "UnloadProbe"
            with pytest.raises(DetectorError) as err:
                client.load_probe(tmp_path)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert client.list_probes().probes == ()  # reads need no token
        with DetectorClient(address, admin_token="wrong") as client:
            with pytest.raises(DetectorError) as err:
                client.unload_probe("p")
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        with DetectorClient(address, admin_token="s3cret") as client:
            assert client.unload_probe("p") is False  # allowed; nothing of that name
            with pytest.raises(DetectorError) as err:
                client.load_probe(tmp_path / "missing")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

        async def main() -> None:
            async with AsyncDetectorClient(address) as client:
                with pytest.raises(DetectorError) as aerr:
                    await client.unload_probe("p")
                assert aerr.value.code == grpc.StatusCode.UNAUTHENTICATED
            async with AsyncDetectorClient(address, admin_token="s3cret") as client:
                assert await client.unload_probe("p") is False

        asyncio.run(main())
    finally:
        sidecar.stop()


def test_tls_with_server_name(tmp_path, pki) -> None:
    key, crt = pki["server"]
    sidecar = start_inprocess_sidecar(tmp_path, tls_cert_file=crt, tls_key_file=key)
    address = sidecar.settings.grpc_address
    try:
        tls = TLSConfig(root_certificates=pki["ca"], server_name="localhost")
        with DetectorClient(address, tls=tls) as client:
            assert client.list_probes().probes == ()
        # The cert is not for this name: refused.
        with DetectorClient(address, tls=TLSConfig(root_certificates=pki["ca"],
                                                   server_name="elsewhere"), timeout=3) as c:
            with pytest.raises(DetectorError) as err:
                c.list_probes()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        # Plaintext to a TLS port: refused.
        with DetectorClient(address, timeout=3) as c, pytest.raises(DetectorError) as err:
            c.list_probes()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE

        async def main() -> None:
            async with AsyncDetectorClient(address, tls=tls) as client:
                assert (await client.list_probes()).probes == ()

        asyncio.run(main())
    finally:
        sidecar.stop()


def test_client_with_mutual_tls_identity_may_load_probes(tmp_path, pki) -> None:
    key, crt = pki["server"]
    sidecar = start_inprocess_sidecar(tmp_path, tls_cert_file=crt, tls_key_file=key,
                                      tls_client_ca_file=pki["ca"],
                                      admin_identities=["admin-client"])
    address = sidecar.settings.grpc_address

    def tls(who: str | None) -> TLSConfig:
        if who is None:
            return TLSConfig(root_certificates=pki["ca"], server_name="localhost")
        k, c = pki[who]
        return TLSConfig(root_certificates=pki["ca"], client_cert=c, client_key=k,
                         server_name="localhost")

    try:
        with DetectorClient(address, tls=tls("admin-client")) as client:
            assert client.unload_probe("p") is False  # allowed through, nothing loaded
        with DetectorClient(address, tls=tls("reader-client")) as client:
            assert client.list_probes().probes == ()
            with pytest.raises(DetectorError) as err:
                client.unload_probe("p")
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        with DetectorClient(address, tls=tls(None), timeout=3) as client:
            with pytest.raises(DetectorError) as err:  # no client cert: the handshake fails
                client.list_probes()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        sidecar.stop()


def test_a_stream_is_open_on_the_sidecar_before_the_first_update(tmp_path) -> None:
    """stream_scores starts the call when called: a stream opened before its request is
    sent already waits on the sidecar (open_calls counts it) before anything is read; closing
    the iterator cancels it."""
    import time

    sidecar = start_inprocess_sidecar(tmp_path)
    try:
        with DetectorClient(sidecar.settings.grpc_address) as client:
            updates = client.stream_scores("not-yet", timeout=30)
            deadline = time.monotonic() + 10
            while sidecar.service.open_calls < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sidecar.service.open_calls == 1
            updates.close()  # type: ignore[attr-defined]
            deadline = time.monotonic() + 10
            while sidecar.service.open_calls > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sidecar.service.open_calls == 0, "closing the stream left the call open"
    finally:
        sidecar.stop()

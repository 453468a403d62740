"""detector.serving.client against a real sidecar on the session's real vLLM server: scores, streams
(blocking and asyncio), the probe registry, admin calls and the errors a caller acts on; and
the README's "Python client" example, run as written."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading

import grpc
import pytest
from readme_examples import example, shell_commands
from support import LAYERS, complete, start_sidecar, synthetic_probe, wait_for_engine

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.serving.client import (
    AsyncDetectorClient,
    CaptureState,
    DetectorClient,
    DetectorError,
    RequestState,
    ScoresUpdate,
    scores_from_pb,
)

pytestmark = pytest.mark.vllm

ADMIN_TOKEN = "client-test-token"
# Numbers and names: the claim spans the sidecar judges.
PROMPT = "The first five prime numbers are 2, 3, 5, 7 and 11. The capital of France is"


@pytest.fixture(scope="module")
def sidecar(vllm_server, probe_dir, model_dir, tmp_path_factory):
    proc = start_sidecar(vllm_server.channel, tmp_path_factory.mktemp("client"),
                         probes=[probe_dir], model_dir=model_dir,
                         env={"LIE_DETECTOR_ADMIN_TOKEN": ADMIN_TOKEN},
                         # LoadProbe of the probes tests write in their own tmp folders
                         probe_roots=[tmp_path_factory.getbasetemp()])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(sidecar):
    with DetectorClient(sidecar.grpc_address) as c:
        wait_for_engine(c)
        yield c


def _check_spans(text: str, spans) -> None:
    assert spans, "no span was judged"
    assert {s.kind for s in spans} >= {"claim"}
    for s in spans:
        assert text[s.char_start:s.char_end] == s.text, s
        assert s.probe == "word-start" and 0 < s.threshold < 1
        assert s.flagged == (s.score >= s.threshold)


def test_get_scores_waits_for_the_end_and_matches_the_stub(vllm_server, sidecar, client) -> None:
    resp = complete(vllm_server.base_url, PROMPT, max_tokens=24, request_id="client-get-1",
                    ignore_eos=True)
    scores = client.get_scores("client-get-1", wait_until_finished=True, timeout=60)
    choice = resp["choices"][0]
    assert scores.state is RequestState.FINISHED and scores.incomplete_reason == ""
    assert scores.request_id == "client-get-1" and scores.requests_with_id == 1
    assert scores.probes == ("word-start",)
    assert scores.text == choice["text"]
    assert [t.token_id for t in scores.tokens] == choice["token_ids"]
    assert [t.index for t in scores.tokens] == list(range(len(scores.tokens)))
    assert "".join(t.text for t in scores.tokens) == scores.text
    assert all(t.score("word-start") is not None for t in scores.tokens if t.scored)
    _check_spans(scores.text, scores.spans)
    (verdict,) = scores.verdicts
    claims = scores.claims
    assert verdict == scores.verdict("word-start")
    assert verdict.claims == len(claims) and verdict.score is not None
    assert abs(verdict.score - max(c.score for c in claims)) < 1e-6
    assert verdict.flagged == any(c.flagged for c in claims) == scores.flagged
    # The same request by its response id, and the raw stub's reply converted: equal.
    by_response_id = client.get_scores(resp["id"])
    assert by_response_id.engine_request_id == scores.engine_request_id
    assert by_response_id.tokens == scores.tokens and by_response_id.spans == scores.spans
    with grpc.insecure_channel(sidecar.grpc_address) as channel:
        raw = pb_grpc.DetectorStub(channel).GetScores(
            pb.GetScoresRequest(request_id="client-get-1"), timeout=10)
    assert scores_from_pb(raw) == scores


def _generate_in_background(base_url: str, request_id: str, result: dict) -> threading.Thread:
    worker = threading.Thread(target=lambda: result.update(resp=complete(
        base_url, PROMPT, max_tokens=32, request_id=request_id, ignore_eos=True)))
    worker.start()
    return worker


def _check_stream(updates: list[ScoresUpdate], text: str, scores) -> None:
    assert updates and updates[-1].final
    assert not any(u.final for u in updates[:-1]), "final before the last update"
    assert all(u.verdicts == () for u in updates[:-1])
    assert updates[-1].state is RequestState.FINISHED
    assert all(u.state is RequestState.RUNNING for u in updates[:-1])
    tokens = [t for u in updates for t in u.tokens]
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert "".join(t.text for t in tokens) == text
    spans = [s for u in updates for s in u.spans]
    _check_spans(text, spans)
    # What streamed is what the finished request reads: the same spans and verdicts.
    assert sorted(spans, key=repr) == sorted(scores.spans, key=repr)
    assert updates[-1].verdicts == scores.verdicts


def test_stream_scores_blocking(vllm_server, client) -> None:
    result: dict = {}
    worker = _generate_in_background(vllm_server.base_url, "client-stream-1", result)
    try:
        updates = list(client.stream_scores("client-stream-1", timeout=180))
    finally:
        worker.join()
    text = result["resp"]["choices"][0]["text"]
    _check_stream(updates, text, client.get_scores("client-stream-1"))
    assert len(updates) > 1, "the stream sent everything at the end"


def test_stream_scores_asyncio(vllm_server, sidecar) -> None:
    result: dict = {}

    async def main() -> tuple[list[ScoresUpdate], object, object]:
        async with AsyncDetectorClient(sidecar.grpc_address) as aclient:
            worker = _generate_in_background(vllm_server.base_url, "client-astream-1", result)
            try:
                updates = [u async for u in aclient.stream_scores("client-astream-1",
                                                                   timeout=180)]
            finally:
                await asyncio.to_thread(worker.join)
            scores = await aclient.get_scores("client-astream-1", wait_until_finished=True,
                                              timeout=30)
            probes = await aclient.list_probes()
            with pytest.raises(DetectorError) as err:
                await aclient.get_scores("client-never-sent")
            return updates, scores, (probes, err.value)

    updates, scores, (probes, error) = asyncio.run(main())
    _check_stream(updates, result["resp"]["choices"][0]["text"], scores)
    assert probes.get("word-start") is not None
    assert error.code == grpc.StatusCode.NOT_FOUND and "client-never-sent" in error.details


def test_a_stream_left_early_is_cancelled(vllm_server, sidecar, client) -> None:
    """Breaking out of the loop ends the call on the sidecar (no stream slot held)."""
    result: dict = {}
    worker = _generate_in_background(vllm_server.base_url, "client-stream-early", result)
    try:
        stream = client.stream_scores("client-stream-early", timeout=180)
        first = next(stream)
        stream.close()
    finally:
        worker.join()
    assert first.request_id == "client-stream-early" and not first.final
    # The request still reads whole afterwards.
    assert client.get_scores("client-stream-early", wait_until_finished=True,
                             timeout=60).state is RequestState.FINISHED


def test_list_probes_and_capture_status(client) -> None:
    listing = client.list_probes()
    probe = listing.get("word-start")
    assert probe is not None and probe.active and probe.inactive_reason == ""
    assert probe.layers == (15,) and probe.score_position == "producer"
    assert 0 < probe.threshold < 1 and probe.model_fingerprint and probe.path
    status = listing.capture_status
    assert status.state is CaptureState.ON, status
    assert status.pid > 0 and status.layers == tuple(LAYERS) and status.reason == ""


def test_admin_calls_with_the_token(sidecar, client, model_dir, tmp_path) -> None:
    extra = synthetic_probe(model_dir, tmp_path / "client-extra", name="client-extra")
    with DetectorClient(sidecar.grpc_address, admin_token=ADMIN_TOKEN) as admin:
        info = admin.load_probe(extra)
        assert info.name == "client-extra" and info.layers == (15,)
        assert client.list_probes().get("client-extra") is not None
        with pytest.raises(DetectorError) as err:
            admin.load_probe(extra)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert admin.load_probe(extra, replace=True).name == "client-extra"
        assert admin.unload_probe("client-extra") is True
        assert admin.unload_probe("client-extra") is False
    assert client.list_probes().get("client-extra") is None
    assert [p.name for p in client.list_probes().probes] == ["word-start"]


def test_admin_errors(sidecar, client, probe_dir) -> None:
    with pytest.raises(DetectorError) as err:
        client.unload_probe("word-start")  # no token
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.details
    with DetectorClient(sidecar.grpc_address, admin_token="wrong") as wrong:
        with pytest.raises(DetectorError) as err:
            wrong.load_probe(probe_dir, replace=True)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert client.list_probes().get("word-start") is not None  # untouched


def test_unknown_request_and_deadlines(client) -> None:
    with pytest.raises(DetectorError) as err:
        client.get_scores("client-no-such-id")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.details == "request 'client-no-such-id' is not known (never seen, or expired)"
    assert err.value.method == "GetScores" and "NOT_FOUND" in str(err.value)
    # A stream waits for a request that has not appeared yet, within its deadline.
    with pytest.raises(DetectorError) as err:
        list(client.stream_scores("client-no-such-id", timeout=1.5))
    assert err.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND)
    with pytest.raises(DetectorError) as err:
        client.get_scores("", timeout=5)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_readme_example_runs(vllm_server, sidecar) -> None:
    """The README's Python client example, as written, with the address and ids of this run."""
    source = example("client")
    assert '"127.0.0.1:50051"' in source and '"my-id"' in source
    complete(vllm_server.base_url, PROMPT, max_tokens=16, request_id="client-readme-1",
             ignore_eos=True)
    source = (source.replace('"127.0.0.1:50051"', repr(sidecar.grpc_address))
              .replace('"my-id"', '"client-readme-1"'))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "README.md", "exec"), {"__name__": "readme_example"})
    printed = out.getvalue()
    with DetectorClient(sidecar.grpc_address) as client:
        scores = client.get_scores("client-readme-1")
    lines = printed.splitlines()
    assert lines[0] == f"FINISHED {'flagged' if scores.flagged else 'ok'}", printed
    for span in scores.flagged_spans:
        assert f"{span.kind} {span.text!r} {round(span.score, 2)}" in lines, printed
    # The stream printed the whole text, then the verdicts.
    (verdict,) = scores.verdicts
    assert f"{scores.text}\nverdicts: {[(verdict.probe, verdict.flagged, verdict.score)]}\n" \
        in printed, printed
    assert lines[-1].startswith("NOT_FOUND request 'never-sent' is not known"), printed


def test_readme_grpc_example_runs(vllm_server, sidecar) -> None:
    """The README's grpcurl example, sent as written (its address and id swapped for this
    run's) through a generic gRPC call, so no grpcurl binary is needed: the method path and
    the JSON body are the example's own."""
    from google.protobuf import json_format

    ((program, *argv),) = shell_commands(example("grpc"))
    assert program == "grpcurl" and "-plaintext" in argv
    body = json.loads(argv[argv.index("-d") + 1])
    address, method = argv[-2:]
    assert address == "127.0.0.1:50051" and body["request_id"] == "my-id"
    complete(vllm_server.base_url, PROMPT, max_tokens=16, request_id="client-readme-grpc",
             ignore_eos=True)
    request = json_format.ParseDict({**body, "request_id": "client-readme-grpc"},
                                    pb.GetScoresRequest())
    with grpc.insecure_channel(sidecar.grpc_address) as channel:
        call = channel.unary_unary(f"/{method}",
                                   request_serializer=pb.GetScoresRequest.SerializeToString,
                                   response_deserializer=pb.ScoresResponse.FromString)
        reply = json_format.MessageToDict(call(request, timeout=60))
    with DetectorClient(sidecar.grpc_address) as client:
        scores = client.get_scores("client-readme-grpc")
    assert reply["state"] == "REQUEST_STATE_FINISHED" and reply["text"] == scores.text
    assert len(reply["tokens"]) == len(scores.tokens) == 16
    assert [v["probe"] for v in reply["verdicts"]] == [v.probe for v in scores.verdicts]

"""Every score belongs to the request the caller means, without vLLM.

vLLM makes its engine ids unique (a random suffix), but the ids clients know a request by
are not: an ``X-Request-Id`` (and the response id built from it, ``cmpl-<id>``) can be sent
twice, by a retry or by someone who wants a victim's verdicts to go unseen. The rule: a
lookup by a shared id returns the newest request, says how many share the id
(``requests_with_id``) and names the one returned (``engine_request_id``, which is unique
and can be asked for); an id several running requests share names none of them
(FAILED_PRECONDITION). A stream follows the request its id named when it started. A
request the engine has ended is settled: a later step naming it is refused. Ids too long or
odd for the channel travel bounded and are still found by the ids the client knows.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from support import free_port
from tiny_engine import probe, single_request

from detector.channel.ids import bounded_engine_id
from detector.serving.client import DetectorClient, DetectorError, RequestState
from detector.sidecar.app import Sidecar, SidecarSettings

FIRST = "cmpl-abc-0-aaaaaaaa"   # vLLM's id for X-Request-Id "abc", first request
SECOND = "cmpl-abc-0-bbbbbbbb"  # the same X-Request-Id sent again
PROMPT = [11, 12, 13]


@pytest.fixture
def sidecar(tmp_path):
    probe_path = probe("p", [1, 3], "producer", 1).save(tmp_path / "p")
    sc = Sidecar(SidecarSettings(channel=f"ipc://{tmp_path}/ch.sock",
                                 grpc_address=f"127.0.0.1:{free_port()}", metrics_port=None,
                                 probes=[probe_path], shutdown_grace_s=0))
    sc.start()
    yield sc
    sc.stop()


@pytest.fixture
def client(sidecar):
    with DetectorClient(sidecar.settings.grpc_address) as c:
        yield c


def _feed(sidecar, steps) -> None:
    for step in steps:
        sidecar.pipeline.handle(step)


def _renumbered(steps, seq0: int) -> list:
    """The same steps sent later: engine step numbers continue from ``seq0``."""
    return [(header.model_copy(update={"seq": seq0 + i}), rows)
            for i, (header, rows) in enumerate(steps)]


def _tokens(reply) -> list[int]:
    return [t.token_id for t in reply.tokens]


def test_a_reused_id_returns_the_newest_request_and_says_it_is_shared(sidecar, client) -> None:
    _feed(sidecar, single_request(FIRST, PROMPT, [101, 102, 103]))
    _feed(sidecar, single_request(SECOND, PROMPT, [201, 202], seq0=3))
    for asked in ("abc", "cmpl-abc", "cmpl-abc-0"):
        reply = client.get_scores(asked)
        assert reply.engine_request_id == SECOND, asked
        assert _tokens(reply) == [201, 202], asked
        assert reply.requests_with_id == 2, asked
    for engine_id, tokens in ((FIRST, [101, 102, 103]), (SECOND, [201, 202])):
        reply = client.get_scores(engine_id)
        assert reply.engine_request_id == engine_id and _tokens(reply) == tokens
        assert reply.requests_with_id == 1


def test_a_stream_follows_the_request_its_id_named_when_it_started(sidecar, client) -> None:
    steps = single_request(FIRST, PROMPT, [101, 102, 103, 104])
    _feed(sidecar, steps[:2])  # the first request is running
    got: dict = {}

    def read() -> None:
        updates = list(client.stream_scores("abc", timeout=60))
        got["tokens"] = [t.token_id for u in updates for t in u.tokens]
        got["engine_ids"] = {u.engine_request_id for u in updates}

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    _feed(sidecar, single_request(SECOND, PROMPT, [201, 202], seq0=2))  # takes the id
    _feed(sidecar, _renumbered(steps[2:], seq0=4))  # the first goes on, and ends
    reader.join(30)
    assert not reader.is_alive()
    assert got["engine_ids"] == {FIRST}
    assert got["tokens"] == [101, 102, 103, 104]


def test_a_step_naming_an_ended_request_is_refused(sidecar, client) -> None:
    _feed(sidecar, single_request(FIRST, PROMPT, [101, 102, 103]))
    before = client.get_scores(FIRST)
    # The same request "continued" in a later step, with other tokens.
    forged = single_request(FIRST, PROMPT, [666, 667, 668], seq0=10)
    _feed(sidecar, forged)
    after = client.get_scores(FIRST)
    assert after.state is RequestState.FINISHED and not after.incomplete_reason
    assert _tokens(after) == _tokens(before) == [101, 102, 103]
    assert [s.probability for t in after.tokens for s in t.scores] == \
        [s.probability for t in before.tokens for s in t.scores]
    assert sidecar.store.refused_finished == len(forged)


def test_an_id_several_running_requests_share_names_none_of_them(sidecar, client) -> None:
    """Two requests in flight with one X-Request-Id: a read by it used to return the newest,
    silently the other caller's scores. It is refused, saying why; each one's unique id
    reads it, and once one has ended the id names the newest again (issue 23)."""
    first, second = single_request(FIRST, PROMPT, [101, 102, 103]), \
        single_request(SECOND, PROMPT, [201, 202], seq0=3)
    _feed(sidecar, first[:2])  # running
    _feed(sidecar, _renumbered(second[:1], seq0=2))  # running too, under the same id
    for asked in ("abc", "cmpl-abc", "cmpl-abc-0"):
        for call in (lambda: client.get_scores(asked),
                     lambda: list(client.stream_scores(asked, timeout=10))):
            with pytest.raises(DetectorError) as err:
                call()
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, asked
            assert "2 requests running" in err.value.details, err.value.details
    assert client.get_scores(FIRST).engine_request_id == FIRST
    assert client.get_scores(SECOND).engine_request_id == SECOND
    _feed(sidecar, _renumbered(first[2:], seq0=3))  # the first ends
    reply = client.get_scores("abc")
    assert reply.engine_request_id == SECOND and reply.requests_with_id == 2


@pytest.mark.parametrize("x", ["y" * 600, "z" * 65536, "r\u00e9q\u00eate"])
def test_a_long_or_odd_id_is_read_by_the_ids_the_client_knows(sidecar, client, x) -> None:
    """The hook sends the bounded form of such an id; GetScores finds it by the full one,
    as sent (UTF-8) or as vLLM read the header's bytes (latin-1)."""
    seen = x.encode().decode("latin-1")
    engine_id = bounded_engine_id(f"cmpl-{seen}-0-aaaaaaaa")
    _feed(sidecar, single_request(engine_id, PROMPT, [101, 102]))
    for asked in (x, seen, f"cmpl-{x}", f"cmpl-{seen}-0-aaaaaaaa"):
        reply = client.get_scores(asked)
        assert reply.engine_request_id == engine_id and _tokens(reply) == [101, 102]

"""Wire format: exact round trips, and every inconsistent message refused as ``WireError``."""

from __future__ import annotations

import json
import random

import pytest
import torch

from detector.channel.wire import (
    MAX_REASON_CHARS,
    MAX_ROWS_PER_STEP,
    DTYPES,
    CaptureStatus,
    EngineInfo,
    Heartbeat,
    RequestRows,
    StepHeader,
    WireError,
    decode,
    encode_heartbeat,
    encode_status,
    encode_step,
    one_line,
)

LAYERS = [2, 5, 7]
HIDDEN = 8


def engine(dtype: str = "float32", **overrides) -> EngineInfo:
    fields = dict(
        engine_id="e0", model="tiny", hidden_size=HIDDEN, num_layers=12, layers=LAYERS,
        dtype=dtype, capture_method="forward_hook", pid=123, started_at=1.5,
    )
    fields.update(overrides)
    return EngineInfo(**fields)


def requests_for(sizes: list[int]) -> list[RequestRows]:
    out, offset = [], 0
    for i, n in enumerate(sizes):
        out.append(RequestRows(
            req_id=f"r{i}", row_offset=offset, num_rows=n, first_position=3 * i,
            num_prompt_tokens=5, input_token_ids=[100 * i + j for j in range(n)],
            sampled_token_ids=[7 + i] if n else [],
        ))
        offset += n
    return out


def step(dtype: str = "float32", sizes: tuple[int, ...] = (3, 1, 2), seq: int = 4) -> StepHeader:
    return StepHeader(
        engine=engine(dtype), seq=seq, time_ns=10**18, num_rows=sum(sizes),
        requests=requests_for(list(sizes)), finished=["gone"], hook_ns=77, dropped_total=3,
    )


def random_rows(header: StepHeader, seed: int = 0) -> torch.Tensor:
    torch_dtype = DTYPES[header.engine.dtype][0]
    g = torch.Generator().manual_seed(seed)
    shape = (len(header.engine.layers), header.num_rows, header.engine.hidden_size)
    rows = torch.randn(shape, generator=g, dtype=torch.float32) * 100
    rows = rows.to(torch_dtype)
    if rows.numel():  # special values must survive too
        flat = rows.view(-1)
        flat[0] = float("inf")
        flat[1] = float("-inf")
        flat[2] = -0.0
        flat[3] = float("nan")
    return rows


def header_dict(header: StepHeader | Heartbeat) -> dict:
    return json.loads(header.model_dump_json())


def frames_from(head: dict, payload: bytes) -> list[bytes]:
    return [json.dumps(head).encode(), payload]


def valid_frames(dtype: str = "float32") -> tuple[dict, bytes]:
    header = step(dtype)
    frames = encode_step(header, random_rows(header))
    return header_dict(header), bytes(frames[1])


def assert_rejected(frames: list, *words: str) -> str:
    with pytest.raises(WireError) as info:
        decode(frames)
    message = str(info.value).lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in {message!r}"
    return message


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_step_round_trip_is_bit_exact(dtype: str) -> None:
    header = step(dtype)
    rows = random_rows(header, seed=len(dtype))
    frames = encode_step(header, rows)
    assert len(frames) == 2
    got_header, got_rows = decode([bytes(f) for f in frames])
    assert got_header == header
    assert got_rows.dtype == rows.dtype
    assert got_rows.shape == rows.shape
    # Bit-exact, NaN included: compare the raw bytes, not float values.
    assert torch.equal(got_rows.view(torch.int16 if rows.element_size() == 2 else torch.int32),
                       rows.view(torch.int16 if rows.element_size() == 2 else torch.int32))
    # The memoryview frame itself (what the publisher sends) decodes the same.
    _, again = decode(frames)
    assert torch.equal(again.view(torch.uint8), rows.view(torch.uint8))


def test_round_trip_of_non_contiguous_rows() -> None:
    header = step("float32")
    rows = random_rows(header)
    transposed = rows.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not transposed.is_contiguous()
    _, got = decode(encode_step(header, transposed))
    assert torch.equal(got.view(torch.int32), rows.view(torch.int32))


def test_request_slices_carry_their_own_rows() -> None:
    header = step("float32", sizes=(3, 1, 2))
    rows = torch.zeros(len(LAYERS), 6, HIDDEN)
    for r in header.requests:
        rows[:, r.row_offset:r.row_offset + r.num_rows] = float(int(r.req_id[1:]) + 1)
    got_header, got = decode(encode_step(header, rows))
    for r in got_header.requests:
        part = got[:, r.row_offset:r.row_offset + r.num_rows]
        assert part.shape[1] == len(r.input_token_ids)
        assert torch.all(part == int(r.req_id[1:]) + 1)


def test_empty_step_round_trip() -> None:
    header = StepHeader(engine=engine(), seq=0, time_ns=1, num_rows=0, requests=[],
                        finished=["a", "b"])
    got_header, got = decode(encode_step(header, torch.empty(len(LAYERS), 0, HIDDEN)))
    assert got_header.finished == ["a", "b"]
    assert got.shape == (len(LAYERS), 0, HIDDEN)


def test_heartbeat_round_trip() -> None:
    beat = Heartbeat(engine=engine("bfloat16"), time_ns=42, steps_published=9,
                     dropped_total=4, next_seq=13)
    got, rows = decode(encode_heartbeat(beat))
    assert rows is None
    assert isinstance(got, Heartbeat)
    assert got == beat
    assert (got.next_seq, got.dropped_total, got.steps_published) == (13, 4, 9)


def test_encode_refuses_rows_of_the_wrong_shape() -> None:
    header = step()
    with pytest.raises(WireError, match="shape"):
        encode_step(header, torch.zeros(len(LAYERS), header.num_rows + 1, HIDDEN))


# ------------------------------------------------------------------ rejections
@pytest.mark.parametrize("count", [0, 1, 3])
def test_wrong_frame_count(count: int) -> None:
    head, payload = valid_frames()
    frames = [json.dumps(head).encode(), payload, b""][:count]
    assert_rejected(frames, "frames", str(count))


def test_truncated_rows_frame() -> None:
    head, payload = valid_frames()
    msg = assert_rejected(frames_from(head, payload[:-1]), "rows frame", str(len(payload) - 1))
    assert str(len(payload)) in msg


def test_rows_frame_too_long() -> None:
    head, payload = valid_frames()
    assert_rejected(frames_from(head, payload + b"\0" * 4), "rows frame", str(len(payload) + 4))


def test_rows_frame_for_another_dtype() -> None:
    head, payload = valid_frames("float32")
    head["engine"]["dtype"] = "float16"  # same header, payload twice as long as implied
    assert_rejected(frames_from(head, payload), "rows frame")


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b"\xff\xfe\x00", b"[]", b"null", b"42",
                                 b'{"kind": "step"'])
def test_header_garbage(raw: bytes) -> None:
    assert_rejected([raw, b""], "invalid header")


def test_header_with_unknown_kind() -> None:
    head, payload = valid_frames()
    head["kind"] = "shutdown"
    assert_rejected(frames_from(head, payload), "invalid header", "shutdown")


def test_header_without_kind() -> None:
    head, payload = valid_frames()
    del head["kind"]
    assert_rejected(frames_from(head, payload), "invalid header", "kind")


@pytest.mark.parametrize("version", [0, 3, "1", None])
def test_wrong_version(version) -> None:
    head, payload = valid_frames()
    head["version"] = version
    assert_rejected(frames_from(head, payload), "wire version", "same lie-detector release")


def test_wrong_heartbeat_version() -> None:
    head = header_dict(Heartbeat(engine=engine(), time_ns=1))
    head["version"] = 3
    assert_rejected(frames_from(head, b""), "version")


def test_overlapping_requests() -> None:
    head, payload = valid_frames()
    head["requests"][1]["row_offset"] -= 1  # r1 starts inside r0
    assert_rejected(frames_from(head, payload), "invalid header", "consecutive")


def test_gap_between_requests() -> None:
    head, payload = valid_frames()
    head["requests"][2]["row_offset"] += 1
    assert_rejected(frames_from(head, payload), "invalid header", "consecutive")


def test_first_request_not_at_zero() -> None:
    head, payload = valid_frames()
    for r in head["requests"]:
        r["row_offset"] += 1
    assert_rejected(frames_from(head, payload), "consecutive")


def test_requests_exceed_num_rows() -> None:
    head, payload = valid_frames()
    r = head["requests"][-1]
    r["num_rows"] += 1
    r["input_token_ids"].append(1)
    assert_rejected(frames_from(head, payload), "invalid header", "cover 7 rows", "says 6")


def test_requests_leave_rows_uncovered() -> None:
    head, payload = valid_frames()
    r = head["requests"][-1]
    r["num_rows"] -= 1
    r["input_token_ids"].pop()
    assert_rejected(frames_from(head, payload), "cover 5 rows", "says 6")


def test_negative_row_offset() -> None:
    head, payload = valid_frames()
    head["requests"][0]["row_offset"] = -1
    assert_rejected(frames_from(head, payload), "row_offset")


def assert_refused_alone(frames: list, index: int, req_id: str | None, *words: str) -> None:
    """Request ``index``'s share is refused; the step and its other requests are kept."""
    header, rows = decode(frames)
    assert isinstance(header, StepHeader) and rows is not None
    (refused,) = header.refused
    assert refused.req_id == req_id and refused.row_offset == [0, 3, 4][index]
    for word in words:
        assert word.lower() in refused.reason.lower(), (word, refused.reason)
    assert [r.req_id for r in header.requests] == [f"r{i}" for i in range(3) if i != index]
    assert "refused" not in header.model_dump_json()  # never sent on


@pytest.mark.parametrize("delta", [-1, 1])
def test_input_token_ids_length_differs_from_num_rows(delta: int) -> None:
    head, payload = valid_frames()
    ids = head["requests"][0]["input_token_ids"]
    if delta < 0:
        ids.pop()
    else:
        ids.append(5)
    assert_refused_alone(frames_from(head, payload), 0, "r0", "input_token_ids")


@pytest.mark.parametrize(
    "layers, words",
    [
        ([5, 2, 7], ("sorted",)),
        ([2, 2, 7], ("sorted",)),
        ([0, 5, 7], ("1..11",)),
        ([2, 5, 12], ("1..11",)),
        ([-3, 5, 7], ("1..11",)),
        ([], ("layers",)),
    ],
)
def test_bad_layers(layers: list[int], words: tuple[str, ...]) -> None:
    head, payload = valid_frames()
    head["engine"]["layers"] = layers
    assert_rejected(frames_from(head, payload), "invalid header", "engine", *words)


def test_too_many_layers() -> None:
    head = header_dict(Heartbeat(engine=engine(), time_ns=1))
    head["engine"]["num_layers"] = 1024
    head["engine"]["layers"] = list(range(1, 258))
    assert_rejected(frames_from(head, b""), "layers")


@pytest.mark.parametrize("hidden", [10**9, 0, -8, 65537])
def test_absurd_hidden_size(hidden: int) -> None:
    head, payload = valid_frames()
    head["engine"]["hidden_size"] = hidden
    assert_rejected(frames_from(head, payload), "invalid header", "hidden_size")


def test_num_rows_above_limit() -> None:
    head = header_dict(StepHeader(engine=engine(), seq=0, time_ns=1, num_rows=0, requests=[]))
    n = MAX_ROWS_PER_STEP + 1
    head["num_rows"] = n
    # Make the requests consistent so that only the limit is wrong.
    head["requests"] = [dict(req_id="big", row_offset=0, num_rows=n, first_position=0,
                             num_prompt_tokens=n, input_token_ids=[0] * n)]
    assert_rejected(frames_from(head, b""), "invalid header", "num_rows")


@pytest.mark.parametrize("dtype", ["int8", "float64", "", "FLOAT32", None])
def test_unknown_dtype(dtype) -> None:
    head, payload = valid_frames()
    head["engine"]["dtype"] = dtype
    assert_rejected(frames_from(head, payload), "invalid header", "dtype")


def test_negative_seq() -> None:
    head, payload = valid_frames()
    head["seq"] = -1
    assert_rejected(frames_from(head, payload), "seq")


def test_missing_engine() -> None:
    """Without a cache of engines heard from, a step must carry its engine's info; without
    its engine's id it is malformed whatever the cache holds."""
    head, payload = valid_frames()
    del head["engine"]
    assert_rejected(frames_from(head, payload), "engine e0", "not been received")
    del head["engine_id"]
    assert_rejected(frames_from(head, payload), "invalid header", "engine_id")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_an_overlong_req_id_costs_that_request_alone(index: int) -> None:
    """A 600-character id used to get every step holding it refused, and with it the rows
    of every other request in those steps (issue 23)."""
    head, payload = valid_frames()
    head["requests"][index]["req_id"] = "x" * 513
    assert_refused_alone(frames_from(head, payload), index, None, "req_id", "512")


@pytest.mark.parametrize("change", [
    {"row_offset": "three"}, {"num_rows": -1}, {"row_offset": None}, "not a dict"])
def test_a_share_whose_rows_cannot_be_placed_refuses_the_step(change) -> None:
    """Without where its rows lie, no row of the step can be attributed safely."""
    head, payload = valid_frames()
    if isinstance(change, dict):
        head["requests"][1].update(change, req_id="y" * 600)
    else:
        head["requests"][1] = change
    assert_rejected(frames_from(head, payload), "invalid header", "requests.1")


def test_a_bad_share_with_another_fault_refuses_the_step() -> None:
    head, payload = valid_frames()
    head["requests"][0]["req_id"] = "x" * 513
    head["seq"] = -1
    assert_rejected(frames_from(head, payload), "invalid header")


# ------------------------------------------------------------------ fuzz
def _assert_consistent(message) -> None:
    header, rows = message
    if isinstance(header, Heartbeat):
        assert rows is None
        return
    if isinstance(header, CaptureStatus):
        assert rows is None
        assert header.enabled or header.reason.strip()
        assert header.reason.isprintable() and len(header.reason) <= MAX_REASON_CHARS
        return
    assert isinstance(header, StepHeader)
    eng = header.engine
    assert rows.dtype == DTYPES[eng.dtype][0]
    assert tuple(rows.shape) == (len(eng.layers), header.num_rows, eng.hidden_size)
    assert eng.layers == sorted(set(eng.layers))
    assert 1 <= eng.layers[0] and eng.layers[-1] < eng.num_layers
    assert 0 < eng.hidden_size <= 65536
    assert 0 <= header.num_rows <= MAX_ROWS_PER_STEP
    end = 0
    for r in sorted([*header.requests, *header.refused], key=lambda r: r.row_offset):
        assert r.row_offset == end
        if isinstance(r, RequestRows):
            assert len(r.input_token_ids) == r.num_rows >= 0
        end += r.num_rows
    assert end == header.num_rows


def _mutate(rng: random.Random, head: bytes, payload: bytes) -> list[bytes]:
    choice = rng.randrange(8)
    h, p = bytearray(head), bytearray(payload)
    if choice == 0:  # flip random bits in the header
        for _ in range(rng.randint(1, 3)):
            h[rng.randrange(len(h))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # replace a digit with another digit: stays valid JSON, changes values
        digits = [i for i, c in enumerate(h) if chr(c).isdigit()]
        for i in rng.sample(digits, k=min(len(digits), rng.randint(1, 2))):
            h[i] = ord(str(rng.randrange(10)))
    elif choice == 2:  # truncate the header
        h = h[: rng.randrange(len(h))]
    elif choice == 3:  # truncate or extend the payload
        if rng.random() < 0.5 and p:
            p = p[: rng.randrange(len(p))]
        else:
            p += bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
    elif choice == 4:  # random bytes anywhere in the header, any value
        for _ in range(rng.randint(1, 4)):
            h[rng.randrange(len(h))] = rng.randrange(256)
    elif choice == 5:  # insert a digit after another: bigger numbers
        digits = [i for i, c in enumerate(h) if chr(c).isdigit()]
        i = rng.choice(digits)
        h[i:i] = str(rng.randrange(10)).encode() * rng.randint(1, 12)
    elif choice == 6:  # flip payload bits: values change, message must stay valid
        if p:
            p[rng.randrange(len(p))] ^= 0xFF
    else:  # swap or duplicate frames
        return rng.choice([[bytes(p), bytes(h)], [bytes(h)], [bytes(h), bytes(p), bytes(p)],
                           [bytes(h), bytes(h)]])
    return [bytes(h), bytes(p)]


def test_fuzzed_messages_decode_consistently_or_raise_wire_error() -> None:
    rng = random.Random(20240917)
    seeds = []
    for dtype in ("float32", "float16", "bfloat16"):
        header = step(dtype, sizes=(2, 1, 0, 3))
        frames = encode_step(header, random_rows(header))
        seeds.append((bytes(frames[0]), bytes(frames[1])))
    beat = encode_heartbeat(Heartbeat(engine=engine(), time_ns=5, next_seq=2))
    seeds.append((beat[0], beat[1]))
    status = encode_status(off_status())
    seeds.append((status[0], status[1]))
    accepted = rejected = 0
    for _ in range(4000):
        head, payload = rng.choice(seeds)
        frames = _mutate(rng, head, payload)
        try:
            message = decode(frames)
        except WireError:
            rejected += 1
            continue
        _assert_consistent(message)
        accepted += 1
    # Both branches must actually be exercised for the loop to mean anything.
    assert accepted > 200 and rejected > 1000, (accepted, rejected)


# ------------------------------------------------------------------ the engine's own limits
@pytest.mark.parametrize(("field", "value", "words"), [
    ("input_token_ids", 2**70, ("input_token_ids", "vocabulary")),
    ("input_token_ids", -1, ("input_token_ids", "vocabulary")),
    ("sampled_token_ids", 2**31, ("sampled_token_ids", "vocabulary")),
])
def test_token_ids_outside_any_vocabulary_are_refused(field: str, value: int,
                                                       words: tuple[str, ...]) -> None:
    """A token id of 2**70 used to be accepted; reading that request then failed (UNKNOWN).
    That request's share is refused, its step-mates' kept."""
    head, payload = valid_frames()
    head["requests"][0][field][0] = value
    assert_refused_alone(frames_from(head, payload), 0, "r0", *words)


def test_token_ids_past_the_engines_vocabulary_are_refused() -> None:
    head, payload = valid_frames()
    head["engine"]["vocab_size"] = 300
    assert decode(frames_from(head, payload))  # every id below 300: accepted
    head["requests"][2]["input_token_ids"][0] = 300
    assert_refused_alone(frames_from(head, payload), 2, "r2", "outside the vocabulary (0..299)")


def test_positions_past_the_engines_context_length_are_refused() -> None:
    """One message claiming a million positions used to grow the sidecar by 1.2 GiB."""
    head, payload = valid_frames()
    head["engine"]["max_model_len"] = 64
    assert decode(frames_from(head, payload))
    head["requests"][0]["first_position"] = 1_000_000
    assert_refused_alone(frames_from(head, payload), 0, "r0",
                         "beyond the engine's context length 64")
    head["requests"][0]["first_position"] = 0
    head["requests"][0]["num_prompt_tokens"] = 65
    assert_refused_alone(frames_from(head, payload), 0, "r0", "context length 64")


def test_a_heartbeat_cannot_claim_more_drops_than_steps() -> None:
    """A forged heartbeat used to add 2e9 to the dropped-steps counter."""
    frames = encode_heartbeat(Heartbeat(engine=engine(), time_ns=1, dropped_total=3,
                                        next_seq=10))
    assert decode(frames)[0].dropped_total == 3
    head = json.loads(bytes(frames[0]))
    head["dropped_total"] = 2_000_000_000
    assert_rejected([json.dumps(head).encode(), *frames[1:]], "dropped_total")


# ------------------------------------------------------------------ capture status
def off_status(**overrides) -> CaptureStatus:
    fields = dict(enabled=False, reason="LIE_DETECTOR_LAYERS=999 outside 1..29",
                  engine_id="e1", model="tiny", model_path="/models/tiny", pid=4321,
                  num_layers=30, hidden_size=576, time_ns=10**18)
    fields.update(overrides)
    return CaptureStatus(**fields)


def status_frames(**changes) -> list[bytes]:
    head = json.loads(encode_status(off_status())[0])
    head.update(changes)
    return [json.dumps(head).encode(), b""]


def test_capture_status_round_trip() -> None:
    for status in (off_status(), off_status(num_layers=None, hidden_size=None, model_path=None),
                   CaptureStatus(enabled=True, capture_method="aux_hidden_states",
                                 layers=[8, 15], pid=7, model="m")):
        got, rows = decode(encode_status(status))
        assert got == status and rows is None
    assert off_status().summary() == ("capture is OFF in vLLM (pid 4321): "
                                      "LIE_DETECTOR_LAYERS=999 outside 1..29")


@pytest.mark.parametrize(("changes", "words"), [
    ({"reason": ""}, ("why",)),
    ({"reason": "   "}, ("why",)),
    ({"reason": "x" * (MAX_REASON_CHARS + 1)}, ("reason",)),
    ({"reason": "two\nlines"}, ("reason", "printable")),
    ({"reason": "escape \x1b[2J"}, ("reason", "printable")),
    ({"model": "m" * 5000}, ("model",)),
    ({"model_path": "evil\r\npath"}, ("model_path",)),
    ({"pid": -1}, ("pid",)),
    ({"pid": 2**70}, ("pid",)),
    ({"num_layers": 0}, ("num_layers",)),
    ({"hidden_size": 10**9}, ("hidden_size",)),
    ({"layers": list(range(1, 300))}, ("layers",)),
    ({"enabled": True}, ("method",)),
    ({"enabled": "maybe"}, ("enabled",)),
    ({"version": 3}, ("version",)),
    ({"capture_method": "telepathy"}, ("capture_method",)),
])
def test_hostile_capture_status_is_refused(changes: dict, words: tuple[str, ...]) -> None:
    assert_rejected(status_frames(**changes), *words)


def test_capture_status_with_rows_is_refused() -> None:
    head = encode_status(off_status())[0]
    assert_rejected([head, b"\0" * 16], "capture_status", "bytes")
    assert_rejected([head], "frames")


def test_one_line_makes_any_text_a_valid_reason() -> None:
    text = "boom\n  Traceback:\t\x1b[31mred\x00" + "y" * 5000
    line = one_line(text)
    assert line.isprintable() and len(line) == MAX_REASON_CHARS
    assert line.startswith("boom Traceback: [31mred y")
    off_status(reason=line)  # accepted

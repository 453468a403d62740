"""Streaming load for the benchmarks: decode throughput, TTFT and ITL from ``/v1/completions``
with ``stream: true``, and score delay from ``StreamScores``.

One *round* sends ``n`` distinct greedy requests at once (``ignore_eos``, a fixed
``max_tokens``) and streams every response. Per request it records the time to the first
chunk that carries a token (TTFT) and the gap between token-carrying chunks (inter-token
latency, ITL; a chunk with k tokens counts as k gaps of 1/k of its interval, which vLLM never
does at these settings but the arithmetic stays right if it does). The round's throughput is
generated tokens / (last byte - first request sent).

With a gRPC address, each request also gets a ``StreamScores`` stream opened *before* its HTTP
request is sent (the sidecar waits for an id it has not seen yet), and every ``TokenScore``
that arrives gives one score delay: the client's clock at arrival minus the token's
``generated_unix_nano`` (the end of the engine step that sampled it; same machine, same clock).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from detector.serving.client import DetectorClient, DetectorError

TOPICS = [
    "the history of the printing press", "how volcanoes form", "the life cycle of a star",
    "the rules of chess", "why the sky is blue", "the water cycle", "how bread is baked",
    "the causes of the French Revolution", "how vaccines work", "the migration of birds",
    "the invention of the telephone", "how a bicycle stays upright", "the Roman Empire",
    "photosynthesis in plants", "the structure of the atom", "how bees make honey",
    "the Great Wall of China", "ocean tides", "the first moon landing", "how glaciers move",
]
STYLES = ["Explain", "Describe in detail", "Write a short essay about", "Tell a student about"]


def prompts_for(round_index: int, n: int) -> list[str]:
    """n distinct prompts; the same index gives the same prompts (shared by all variants)."""
    out = []
    for i in range(n):
        k = round_index * n + i
        topic = TOPICS[k % len(TOPICS)]
        style = STYLES[(k // len(TOPICS)) % len(STYLES)]
        out.append(f"Request {k}. {style} {topic}.")
    return out


@dataclass
class RequestTiming:
    request_id: str
    ttft_s: float
    itl_s: list[float]           # one gap per token after the first
    completion_tokens: int
    prompt_tokens: int
    start: float                 # perf_counter
    end: float
    # score delay (only with a gRPC stream): seconds per received TokenScore, scored ones
    score_delays_s: list[float] = field(default_factory=list)
    unscored_delays_s: list[float] = field(default_factory=list)
    first_token_delay_s: float | None = None
    scores_received: int = 0
    score_stream_final: bool = False
    score_stream_error: str | None = None

    @property
    def mean_itl_s(self) -> float | None:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None


@dataclass
class RoundTiming:
    wall_s: float
    requests: list[RequestTiming]

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s


class ScoreStream:
    """A ``StreamScores`` reader on its own thread; timestamps every TokenScore on arrival."""

    def __init__(self, client: DetectorClient, request_id: str, timeout_s: float) -> None:
        self.request_id = request_id
        self.delays: list[float] = []
        self.unscored: list[float] = []
        self.first: float | None = None  # the first generated token's delay
        self.received = 0
        self.final = False
        self.error: str | None = None
        self._client = client
        self._timeout_s = timeout_s
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            # The call is open once stream_scores returns (before the first update).
            updates = self._client.stream_scores(self.request_id, timeout=self._timeout_s)
            self._started.set()
            for update in updates:
                now_ns = time.time_ns()
                for token in update.tokens:
                    self.received += 1
                    if not token.generated_unix_nano:
                        continue
                    d = (now_ns - token.generated_unix_nano) / 1e9
                    (self.delays if token.scored else self.unscored).append(d)
                    if token.index == 0 and token.scored:
                        self.first = d
                if update.final:
                    self.final = True
        except DetectorError as exc:
            self.error = f"{exc.code.name}: {exc.details}"
        except Exception as exc:  # noqa: BLE001 - reported in the results, never hidden
            self.error = repr(exc)
        finally:
            self._started.set()

    def wait_started(self, timeout_s: float = 5.0) -> None:
        self._started.wait(timeout_s)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive() and self.error is None:
            self.error = f"stream still open {timeout_s:.0f} s after the request ended"


def stream_request(client: httpx.Client, base_url: str, model: str, prompt: str,
                   max_tokens: int, *, request_id: str, extra: dict[str, Any] | None = None
                   ) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    first: float | None = None
    last: float | None = None
    gaps: list[float] = []
    ntok = 0
    usage: dict[str, int] = {}
    with client.stream("POST", f"{base_url}/v1/completions", json=body,
                       headers={"X-Request-Id": request_id}) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"{base_url}: HTTP {resp.status_code}: {resp.text[:500]}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"{base_url}: stream error {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                k = len(choice.get("token_ids") or ()) or (1 if choice.get("text") else 0)
                if k == 0:
                    continue
                if first is None:
                    first = now
                    k_rest = k - 1
                    gaps += [0.0] * k_rest
                else:
                    assert last is not None
                    gaps += [(now - last) / k] * k
                last = now
                ntok += k
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{base_url}: no token streamed for {request_id}")
    completion = int(usage.get("completion_tokens", ntok))
    if completion != max_tokens or ntok != max_tokens:
        raise RuntimeError(f"{base_url}: {ntok} tokens streamed ({completion} in usage), "
                           f"expected {max_tokens} (ignore_eos not honoured?)")
    return RequestTiming(request_id, first - t0, gaps, completion,
                         int(usage.get("prompt_tokens", 0)), t0, end)


def run_round(client: httpx.Client, base_url: str, model: str, prompts: list[str],
              max_tokens: int, *, extra: dict[str, Any] | None = None,
              grpc_address: str | None = None, tag: str = "bench") -> RoundTiming:
    """All prompts at once, streamed; with ``grpc_address``, score streams alongside."""
    ids = [f"{tag}-{uuid.uuid4().hex[:12]}" for _ in prompts]
    streams: list[ScoreStream] = []
    detector = None
    if grpc_address is not None:
        detector = DetectorClient(grpc_address)
        streams = [ScoreStream(detector, rid, timeout_s=120 + 2 * max_tokens) for rid in ids]
        for s in streams:
            s.wait_started()
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            t0 = time.perf_counter()
            futures = [pool.submit(stream_request, client, base_url, model, p, max_tokens,
                                   request_id=rid, extra=extra)
                       for p, rid in zip(prompts, ids)]
            results = [f.result() for f in futures]
        wall = max(r.end for r in results) - t0
        for s, r in zip(streams, results):
            s.join(timeout_s=30)
            r.score_delays_s = s.delays
            r.unscored_delays_s = s.unscored
            r.first_token_delay_s = s.first
            r.scores_received = s.received
            r.score_stream_final = s.final
            r.score_stream_error = s.error
    finally:
        if detector is not None:
            detector.close()
    return RoundTiming(wall, results)

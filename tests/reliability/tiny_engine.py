"""A tiny fake engine for tests that drive the sidecar without vLLM: its identity, probes
that fit it, and steps built like the hook builds them, round-tripped through the wire."""

from __future__ import annotations

import zlib

import torch

from detector.artifact import ProbeArtifact, ProbeMetadata
from detector.channel.wire import EngineInfo, RequestRows, StepHeader, decode, encode_step
from detector.model_identity import ModelIdentity

HIDDEN = 4
MODEL = ModelIdentity(name="tiny", fingerprint="00ff00ff00ff00ff", hidden_size=HIDDEN,
                      num_layers=6)
PROMPTS = {"A": [11, 12, 13, 14], "B": [21, 22, 23, 24, 25, 26]}
GENERATED = {"A": [101, 102, 103, 104, 105, 106], "B": [201, 202, 203, 204]}


def engine(engine_id: str = "e1", layers: tuple[int, ...] = (1, 3)) -> EngineInfo:
    return EngineInfo(engine_id=engine_id, model="tiny", fingerprint=MODEL.fingerprint,
                      hidden_size=HIDDEN, num_layers=6, layers=list(layers), dtype="float32",
                      capture_method="forward_hook", pid=1, started_at=0.0)


def probe(name: str, layers: list[int], position: str, seed: int) -> ProbeArtifact:
    g = torch.Generator().manual_seed(seed)
    meta = ProbeMetadata(name=name, model=MODEL, layers=layers, hidden_size=HIDDEN,
                         score_position=position, calibration="none", threshold=0.5)
    return ProbeArtifact(metadata=meta, weight=torch.randn(len(layers) * HIDDEN, generator=g),
                         bias=torch.zeros(1))


def row_value(req_id: str, layer: int, position: int) -> torch.Tensor:
    """A residual row that depends only on (request, layer, position): a misattributed row
    gives a different score than the reference."""
    seed = zlib.crc32(f"{req_id}/{layer}/{position}".encode())
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def make_step(seq: int, parts: list[tuple[str, int, int, bool]], finished: list[str],
              eng: EngineInfo, tokens: dict[str, tuple[list[int], list[int]]] | None = None
              ) -> tuple[StepHeader, torch.Tensor]:
    """``parts``: (request, first position, rows, samples a token). Built like the hook does,
    then round-tripped through the wire format like the channel does. ``tokens`` maps a
    request to its (prompt, generated) ids; by default ``PROMPTS`` and ``GENERATED``."""
    requests, rows, offset = [], [], 0
    for req_id, first, n, samples in parts:
        prompt, generated = (tokens[req_id] if tokens and req_id in tokens
                             else (PROMPTS[req_id], GENERATED[req_id]))
        history = prompt + generated
        p0 = len(prompt)
        end = first + n
        requests.append(RequestRows(
            req_id=req_id, row_offset=offset, num_rows=n, first_position=first,
            num_prompt_tokens=p0, input_token_ids=history[first:end],
            sampled_token_ids=[history[end]] if samples else []))
        rows.append(torch.stack([torch.stack([row_value(req_id, k, first + j)
                                              for j in range(n)]) for k in eng.layers]))
        offset += n
    header = StepHeader(engine=eng, seq=seq, time_ns=10**18 + seq, num_rows=offset,
                        requests=requests, finished=finished)
    stacked = (torch.cat(rows, dim=1) if rows
               else torch.empty((len(eng.layers), 0, HIDDEN), dtype=torch.float32))
    frames = encode_step(header, stacked)
    return decode([bytes(f) for f in frames])


def schedule(eng: EngineInfo | None = None, seq0: int = 0) -> list:
    """A realistic run: A prefills in one step, B in two chunks, then both decode; A ends
    first. Every generated token's producer row and (but the last) own row are present."""
    eng = eng or engine()
    plan: list[tuple[list, list[str]]] = [
        ([("A", 0, 4, True), ("B", 0, 3, False)], []),
        ([("A", 4, 1, True), ("B", 3, 3, True)], []),
    ]
    pos = {"A": 5, "B": 6}  # next position to feed
    left = {"A": len(GENERATED["A"]) - 2, "B": len(GENERATED["B"]) - 1}
    while any(left.values()):
        parts, finished = [], []
        for req in ("A", "B"):
            if left[req]:
                parts.append((req, pos[req], 1, True))
                pos[req] += 1
                left[req] -= 1
                if not left[req]:
                    finished.append(req)
        plan.append((parts, finished))
    return [make_step(seq0 + i, parts, fin, eng) for i, (parts, fin) in enumerate(plan)]


def single_request(req_id: str, prompt: list[int], generated: list[int], *,
                   eng: EngineInfo | None = None, seq0: int = 0) -> list:
    """One request: prefill sampling the first token, then one decode step per token, the
    last one marking it finished."""
    eng = eng or engine()
    tokens = {req_id: (prompt, generated)}
    steps = [make_step(seq0, [(req_id, 0, len(prompt), True)],
                       [req_id] if len(generated) == 1 else [], eng, tokens)]
    for g in range(1, len(generated)):
        steps.append(make_step(seq0 + g, [(req_id, len(prompt) + g - 1, 1, True)],
                               [req_id] if g == len(generated) - 1 else [], eng, tokens))
    return steps

"""Turn what one engine step computed into a self-contained channel message.

This module knows nothing of vLLM's internals: ``vllm_adapter`` reads them and calls
``StepAssembler``. The assembler keeps each running request's token history (prompt plus
sampled tokens) so that every row can carry the token it read. That history lives in the
engine thread and is updated for every step, including steps the channel drops, so a
dropped message never shifts a token onto the wrong row.

A step is opened when its rows exist (``open_step``) and closed when its sampled tokens
are known (``close_step``). With asynchronous scheduling the tokens of step t arrive after
step t+1 was launched; closing happens in step order, so histories stay exact.

Ids go out in the channel's bounded form (``detector.channel.ids.bounded_engine_id``): a
client's long or odd X-Request-Id must never get a step refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from detector.channel.ids import bounded_engine_id
from detector.channel.publisher import ChannelPublisher, PendingStep
from detector.channel.wire import DTYPES, RequestRows, StopRule

logger = logging.getLogger(__name__)

# vLLM runs at most a couple of steps ahead of their outputs; more open steps than this
# means some were never resolved, and the oldest are let go.
MAX_OPEN_STEPS = 8


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step, as the adapter reads it from the engine."""

    req_id: str
    num_rows: int
    first_position: int
    num_prompt_tokens: int
    prompt_token_ids: Sequence[int] | None  # needed only the first time a request is seen
    stop: StopRule | None = None  # likewise: sent with the request's first step only


@dataclass(slots=True)
class OpenStep:
    seq: int
    time_ns: int
    rows: torch.Tensor
    scheduled: list[ScheduledRequest]
    finished: list[str]
    hook_ns: int
    ready: Callable[[], None] | None


class StepAssembler:
    """Per-request token bookkeeping plus hand-off to the publisher."""

    def __init__(self, publisher: ChannelPublisher) -> None:
        self.publisher = publisher
        self._history: dict[str, list[int]] = {}
        # Requests that ended while a later step holding them was still open (asynchronous
        # scheduling runs one step ahead): their history is kept for that step, whose
        # sampled tokens vLLM throws away and so do we.
        self._ended: set[str] = set()
        self._open: list[OpenStep] = []
        self._lock = threading.Lock()

    def knows(self, req_id: str) -> bool:
        return req_id in self._history

    def open_step(
        self,
        rows: torch.Tensor,
        scheduled: list[ScheduledRequest],
        finished: Sequence[str],
        *,
        hook_ns: int = 0,
        ready: Callable[[], None] | None = None,
    ) -> OpenStep:
        with self._lock:
            for req in scheduled:
                if req.req_id not in self._history:
                    self._history[req.req_id] = list(req.prompt_token_ids or ())
            seq = self.publisher.take_seq()
            step = OpenStep(seq, time.time_ns(), rows, scheduled, list(finished), hook_ns, ready)
            self._open.append(step)
            if len(self._open) > MAX_OPEN_STEPS:  # never closed (vLLM dropped an output)
                self._open.pop(0)
        return step

    def _still_open(self, req_id: str) -> bool:
        return any(r.req_id == req_id for step in self._open for r in step.scheduled)

    def close_step(self, step: OpenStep, sampled: dict[str, list[int]], *, hook_ns: int = 0,
                   token_features: dict[str, dict[str, list[float]]]
                   | Callable[[], dict[str, dict[str, list[float]]]] | None = None,
                   held_bytes: int = 0) -> bool:
        """Attach sampled tokens (and their features by request and feature name, for
        probes and verdicts that read them), update histories, and offer the step to the
        channel. ``token_features`` may be a function the publisher's thread calls before
        sending (the work stays off the engine thread); ``held_bytes`` is what it keeps
        alive until then (counted against the queue's byte bound)."""
        later = token_features if callable(token_features) else None
        if later is not None:
            token_features = None
        requests: list[RequestRows] = []
        offset = 0
        with self._lock:
            if step in self._open:
                self._open.remove(step)
            for req in step.scheduled:
                history = self._history.setdefault(req.req_id, [])
                end = req.first_position + req.num_rows
                if end > len(history):
                    # Prompt ids were unavailable (e.g. prompt embeddings): mark unknown.
                    history.extend([-1] * (end - len(history)))
                ended = req.req_id in self._ended
                new_tokens = [] if ended else list(sampled.get(req.req_id, ()))
                feats = (token_features or {}).get(req.req_id) if new_tokens else None
                extra = {} if not feats else {
                    "sampled_logprobs": feats.get("logprob"),
                    "sampled_entropies": feats.get("entropy"),
                }
                requests.append(
                    RequestRows.model_construct(
                        req_id=bounded_engine_id(req.req_id),
                        row_offset=offset,
                        num_rows=req.num_rows,
                        first_position=req.first_position,
                        num_prompt_tokens=req.num_prompt_tokens,
                        input_token_ids=history[req.first_position:end],
                        sampled_token_ids=new_tokens,
                        stop=req.stop,
                        **extra,
                    )
                )
                offset += req.num_rows
                if new_tokens:
                    # A sampled token sits at position ``end``; anything beyond that was
                    # never fed back (a re-run after preemption rewrites it).
                    del history[end:]
                    history.extend(new_tokens)
            gone = set(step.finished) | {r.req_id for r in step.scheduled if r.req_id in self._ended}
            for req_id in gone:
                if self._still_open(req_id):
                    self._ended.add(req_id)
                else:
                    self._ended.discard(req_id)
                    self._history.pop(req_id, None)
        return self.publisher.offer(
            PendingStep(
                seq=step.seq,
                time_ns=step.time_ns,
                rows=step.rows,
                requests=requests,
                finished=[bounded_engine_id(r) for r in step.finished],
                hook_ns=step.hook_ns + hook_ns,
                ready=step.ready,
                prepare=_features_attacher(later) if later is not None else None,
                held_bytes=held_bytes if later is not None else 0,
            )
        )

    def output_tokens(self, req: ScheduledRequest, sampled: Sequence[int]) -> list[int]:
        """The tokens ``req`` has generated once this step's ``sampled`` are added (for
        stop rules that read the whole output, before ``close_step`` records them)."""
        with self._lock:
            history = self._history.get(req.req_id, [])
            end = req.first_position + req.num_rows
            return history[req.num_prompt_tokens:end] + list(sampled)

    def end_requests(self, req_ids: Sequence[str]) -> bool:
        """Requests vLLM ended in a step that ran no tokens: tell the sidecar and forget them.

        vLLM tells the worker that a request ended (an abort, a client timeout, a stop string
        matched by the API server) in the next step. When the engine goes idle after it, that
        step schedules no tokens and no rows are captured, so the adapter must hand the ids
        here: they ride on a step still waiting for its tokens (keeping step order), or go
        out as a step of their own with no rows."""
        if not req_ids:
            return True
        with self._lock:
            if self._open:
                self._open[-1].finished.extend(req_ids)
                return True
        engine = self.publisher.engine
        rows = torch.empty((len(engine.layers), 0, engine.hidden_size),
                           dtype=DTYPES[engine.dtype][0])
        return self.close_step(self.open_step(rows, [], req_ids), {})

    def forget(self, req_ids: Sequence[str]) -> None:
        with self._lock:
            for req_id in req_ids:
                self._history.pop(req_id, None)


def _features_attacher(compute: Callable[[], dict[str, dict[str, list[float]]]]
                       ) -> Callable[[PendingStep], None]:
    """Fill each request's sampled-token features into a queued step (publisher thread)."""

    def attach(step: PendingStep) -> None:
        features = compute()
        for i, req in enumerate(step.requests):
            feats = features.get(req.req_id) if req.sampled_token_ids else None
            if feats:
                step.requests[i] = req.model_copy(update={
                    "sampled_logprobs": feats.get("logprob"),
                    "sampled_entropies": feats.get("entropy")})

    return attach

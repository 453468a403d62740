"""A request's tokens -> its text, spans and verdicts: what the API returns and metrics count.

:meth:`Analyzer.current` is what readers use: the request's analysis as it stands, advanced
by what changed since it was last read (detector.sidecar.incremental). :meth:`Analyzer.analyse`
analyses given tokens from scratch: the reference the incremental analysis must equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detector.claims import ResponseVerdict
from detector.sidecar.incremental import LiveAnalysis
from detector.sidecar.spans import SPAN_KINDS, SpanVerdict, find_spans, judge_spans
from detector.sidecar.stops import cut_to_returned
from detector.sidecar.records import RequestRecord
from detector.sidecar.scores import ProbeColumns, TokenScore
from detector.sidecar.store import RequestStore
from detector.sidecar.text import TextDecoder
from detector.sidecar.views import RequestAnalysis


class Analyzer:
    def __init__(self, decoder: TextDecoder | None,
                 span_kinds: Sequence[str] = SPAN_KINDS) -> None:
        unknown = set(span_kinds) - set(SPAN_KINDS)
        if unknown:
            raise ValueError(f"unknown span kinds {sorted(unknown)}; choose from {SPAN_KINDS}")
        self.decoder = decoder
        self.span_kinds = tuple(span_kinds)

    def ensure_decoder(self, model_path: str | None) -> None:
        """Without ``--model``, read the tokenizer from the path the engine reports."""
        if self.decoder is None and model_path and Path(model_path).is_dir():
            self.decoder = TextDecoder.from_model_dir(model_path)

    def current(self, store: RequestStore, request_id: str, *, settled_only: bool = False,
                stream: bool = False) -> RequestAnalysis | None:
        """The analysis of the request ``request_id`` names as it stands now (with
        ``settled_only``, of its leading tokens whose scores are final; with ``stream``,
        that while the request runs and every token once it has ended); None for an
        unknown or expired request. Equals :meth:`analyse` of a fresh snapshot, at the cost
        of what changed since the request was last read."""
        found = store.live(request_id, lambda _: LiveAnalysis(self.decoder, self.span_kinds))
        if found is None:
            return None
        engine_id = found[0]
        live: LiveAnalysis = found[1]
        with live.lock:
            if live.decoder is not self.decoder:  # the tokenizer arrived since
                live.restart(self.decoder)
            delta = store.delta(engine_id, live.read, live.nbytes)
            if delta is not None and delta.columns is not live.columns and live.read:
                live.restart(self.decoder)  # other probes: every token's scores anew
                delta = store.delta(engine_id, 0, live.nbytes)
            if delta is None:
                return None
            if delta.record.version != live.version or delta.token_ids or delta.tokens \
                    or delta.restart:
                live.advance(delta)
            if stream:
                settled_only = not delta.record.finished
            return live.view(settled_only)

    def analyse(self, record: RequestRecord, tokens: list[TokenScore],
                columns: ProbeColumns | None, *, settled_only: bool = False) -> RequestAnalysis:
        """Decode and judge; with ``settled_only``, only tokens whose scores are final."""
        if settled_only:
            n = 0
            while n < len(tokens) and tokens[n].settled:
                n += 1
            tokens = tokens[:n]
        if self.decoder is None:
            return RequestAnalysis(record, tokens, None, [], [])
        decoded = self.decoder.decode([t.token_id for t in tokens], record.prompt_tail)
        # Only what the client received: vLLM cuts stop strings after the engine ran past.
        record, tokens, decoded = cut_to_returned(record, tokens, decoded)
        verdicts: list[SpanVerdict] = []
        responses: list[ResponseVerdict] = []
        if columns is not None and columns.names:
            # Names copied from the prompt are no claim of the model's (detector.claims).
            prompt = self.decoder.text_of(record.prompt_tail)
            probes = list(zip(columns.names, columns.aggregations, columns.thresholds))
            fused = {n: v for n, v in zip(columns.names, columns.verdicts) if v is not None}
            verdicts, responses = judge_spans(
                decoded, find_spans(decoded, prompt), [t.scores for t in tokens], probes,
                self.span_kinds, verdicts=fused,
                logprobs=record.features.get("logprob") if fused else None)
        return RequestAnalysis(record, tokens, decoded, verdicts, responses)

"""Run a dataset through vLLM with the plugin and store the labelled spans' rows.

Two sources, one path. Questions are *generated*: each prompt is sent to
``/v1/completions`` (greedy, ``stop="\\n"``, ``logprobs=k``), the answer is labelled, and
the rows of the claim span that carries it (:func:`probes.labeling.claim_for_answer`:
the span the sidecar judges, found with the prompt the model read) are taken from the
plugin's channel; an answer no claim carries is left out (reason ``no claim span``).
Users' records are *replayed*: ``prompt + completion`` is sent as one token sequence with
``max_tokens=1`` and ``prompt_logprobs=k``, so the completion's rows are the ones the model
computes when it generates it (their spans are kept as the user drew them). Either way the rows come from the serving engine through the sidecar's own
decoder: no second forward pass, no train/serve skew.

Requests run concurrently (continuous batching gives vLLM's own throughput); results are
appended to a :class:`CaptureStore` as they come, so an interrupted capture resumes where
it stopped. A request whose rows did not all arrive (the plugin dropped a step) is retried.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from detector.config import candidate_layers
from detector.engine.token_features import entropy_of
from detector.serving.launch_checks import LaunchError, check_layers
from detector.model_identity import ModelIdentity, identify_model
from probes.datasets.prompts import STOP, PromptRenderer
from probes.datasets.registry import questions_hash
from probes.datasets.schema import PromptStyle, Question
from probes.datasets.user import UserRecord
from probes.labeling import (
    TRAINABLE,
    AnswerLabel,
    claim_for_answer,
    label_answer,
    label_claims,
    token_span,
)
from probes.server import CaptureServer, private_channel, start_capture_server
from probes.store import CaptureManifest, CaptureRecord, CaptureStore, SpanEntry
from probes.tap import RowCollector

logger = logging.getLogger(__name__)

# Reason of an answer left out because no claim span (detector.claims) carries it.
NO_CLAIM_REASON = "no claim span"


class CaptureSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Empty: derived from the model (``detector.config.candidate_layers``).
    layers: list[int] = Field(default_factory=list)
    styles: list[PromptStyle] = Field(default_factory=lambda: ["plain", "chat"])
    max_tokens: int = Field(24, ge=1, le=512)
    concurrency: int = Field(12, ge=1, le=256)
    logprobs: int = Field(20, ge=1, le=20)
    max_attempts: int = Field(3, ge=1)
    row_timeout_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    dtype: str | None = None  # vLLM --dtype when we start the server; None = its default
    # When we start the server: eager mode (None: where the plugin needs forward hooks,
    # ``detector.serving.launch_checks.needs_eager``) and extra vLLM arguments.
    enforce_eager: bool | None = None
    vllm_args: list[str] = Field(default_factory=list)
    max_num_seqs: int = Field(16, ge=1)
    shard_rows: int = Field(4096, ge=1)


@dataclass
class Job:
    id: str
    record: CaptureRecord  # the metadata part, filled further by the capture
    prompt: str | list[int]
    question: Question | None = None
    user: UserRecord | None = None
    # teacher forcing: prompt token count and the completion's token char offsets
    forced_prompt_len: int | None = None
    forced_offsets: list[int] | None = None
    forced_ids: list[int] | None = None


@dataclass
class CaptureSummary:
    directory: Path
    records: int
    labels: dict[str, int]
    spans_with_rows: int
    incomplete: int
    seconds: float
    generated_tokens: int
    prompt_tokens: int
    no_claim: int = 0  # labelled answers left out: no claim span carries them

    def describe(self) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds else 0.0
        labels = ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items()))
        return (f"{self.records} records in {self.seconds:.0f} s ({rate:.0f} generated tok/s, "
                f"{self.prompt_tokens} prompt tokens); spans: {labels} ({self.no_claim} "
                f"ambiguous: {NO_CLAIM_REASON}); {self.spans_with_rows} with rows; "
                f"{self.incomplete} incomplete")


# ----------------------------------------------------------------------------- jobs


def question_jobs(questions: Sequence[Question], styles: Sequence[PromptStyle],
                  renderer: PromptRenderer) -> list[Job]:
    jobs = []
    usable = renderer.usable_styles(styles)
    if styles and not usable:
        raise LaunchError(f"this model can do none of the prompt styles {list(styles)}")
    styles = usable
    for q in questions:
        for style in renderer.styles_for(q, styles):  # "mixed": one style per question
            job_id = f"{q.id}|{style}"
            record = CaptureRecord(
                id=job_id, source="questions", question_id=q.id, topic=q.topic,
                domain=q.domain, group=q.entity, subject=q.subject, invented=q.invented,
                style=style, question=q.question, gold=q.answers[0] if q.answers else None,
            )
            jobs.append(Job(job_id, record, renderer.render(q, style), question=q))
    return jobs


def user_jobs(records: Sequence[UserRecord], tokenizer: Any) -> list[Job]:
    jobs = []
    for r in records:
        prompt_ids = list(tokenizer(r.prompt).input_ids)
        enc = tokenizer(r.completion, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc.input_ids)
        offsets = [int(s) for s, _ in enc.offset_mapping]
        record = CaptureRecord(
            id=r.id, source="user", question_id=r.id, topic=r.topic, domain=r.topic,
            group=r.group_key, style="user", completion=r.completion,
        )
        jobs.append(Job(r.id, record, prompt_ids + ids, user=r, forced_prompt_len=len(prompt_ids),
                        forced_offsets=offsets, forced_ids=ids))
    return jobs


# ----------------------------------------------------------------------------- features


# ----------------------------------------------------------------------------- runner


class _Runner:
    def __init__(self, store: CaptureStore, collector: RowCollector, client: httpx.Client,
                 base_url: str, model_name: str, settings: CaptureSettings) -> None:
        self.store = store
        self.collector = collector
        self.client = client
        self.base_url = base_url
        self.model_name = model_name
        self.settings = settings
        self.tag = uuid.uuid4().hex[:8]
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self._lock = threading.Lock()

    def run(self, job: Job, attempt: int) -> bool:
        """One attempt; True when the record was stored complete."""
        key = f"ldtrain-{self.tag}-{uuid.uuid4().hex[:12]}-{attempt}"
        forced = job.forced_prompt_len is not None
        self.collector.expect(key, keep_from=(job.forced_prompt_len - 1) if forced else None)
        try:
            body: dict[str, Any] = {
                "model": self.model_name, "prompt": job.prompt, "temperature": 0.0,
                "return_token_ids": True,
            }
            if forced:
                body.update(max_tokens=1, prompt_logprobs=self.settings.logprobs)
            else:
                budget = (job.question.max_tokens if job.question is not None
                          and job.question.max_tokens else self.settings.max_tokens)
                body.update(max_tokens=budget, stop=STOP, logprobs=self.settings.logprobs)
            resp = self.client.post(f"{self.base_url}/v1/completions", json=body,
                                    headers={"X-Request-Id": key},
                                    timeout=self.settings.request_timeout_s)
            resp.raise_for_status()
            choice = resp.json()["choices"][0]
            record, spans = (self._forced(job, choice) if forced else self._generated(job, choice))
            record.attempts = attempt
            rows_needed = [s for s in spans if s[1] is not None]
            span_rows: list[np.ndarray | None] = []
            for entry, positions in spans:
                if positions is None:
                    span_rows.append(None)
                    continue
                rows = self.collector.wait_rows(key, positions[0], positions[1],
                                                self.settings.row_timeout_s)
                if rows is None:
                    got = self.collector.get(key)
                    logger.debug("%s: rows %s missing (have %d positions, dropped_total %d)",
                                 job.id, positions, len(got.tokens) if got else 0,
                                 self.collector.dropped_total)
                    return False
                span_rows.append(rows.numpy())
            del rows_needed
            self.store.append(record, span_rows)
            return True
        finally:
            self.collector.forget(key)

    def _generated(self, job: Job, choice: dict) -> tuple[CaptureRecord,
                                                          list[tuple[SpanEntry, Any]]]:
        assert job.question is not None
        text = choice["text"]
        token_ids = list(choice.get("token_ids") or [])
        lp = choice.get("logprobs") or {}
        offsets = list(lp.get("text_offset") or [])
        token_lps = [float(x) if x is not None else float("nan")
                     for x in (lp.get("token_logprobs") or [])]
        tops = lp.get("top_logprobs") or []
        prompt_ids = choice.get("prompt_token_ids") or []
        n_prompt, n_gen = len(prompt_ids), len(token_ids)
        with self._lock:
            self.generated_tokens += n_gen
            self.prompt_tokens += n_prompt
        record = job.record.model_copy(update={
            "completion": text, "num_prompt_tokens": n_prompt, "num_generated": n_gen,
            "finish_reason": choice.get("finish_reason"),
        })
        assert isinstance(job.prompt, str)
        if job.question.answer_type == "claims":
            return record, self._claims(job, text, choice, offsets, token_ids, token_lps, tops,
                                        n_prompt, n_gen, record)
        result = label_answer(job.question, text)
        entry, positions = self._span(result, offsets, len(text), token_ids, token_lps, tops,
                                      n_prompt, n_gen, trainable_last=n_gen - 2,
                                      claim_of=(text, job.prompt))
        record.spans = [entry]
        return record, [(entry, positions)]

    def _claims(self, job: Job, text: str, choice: dict, offsets: list[int],
                token_ids: list[int], token_lps: list[float], tops: list, n_prompt: int,
                n_gen: int, record: CaptureRecord) -> list[tuple[SpanEntry, Any]]:
        """Every claim span of a long-form answer, labelled one by one
        (:func:`probes.labeling.label_claims`); a claim that reaches the end of an answer cut
        off at ``max_tokens`` may be cut itself and is left out."""
        assert job.question is not None and isinstance(job.prompt, str)
        cut = choice.get("finish_reason") == "length"
        end = len(text.rstrip())
        pairs = []
        for result in label_claims(job.question, text, prompt=job.prompt):
            if cut and result.span is not None and result.span[1] >= end \
                    and result.label in TRAINABLE:
                result = result.model_copy(update={
                    "label": "ambiguous", "reason": f"cut off at max_tokens ({result.reason})"})
            pairs.append(self._span(result, offsets, len(text), token_ids, token_lps, tops,
                                    n_prompt, n_gen, trainable_last=n_gen - 2))
        record.spans = [p[0] for p in pairs]
        return pairs

    def _forced(self, job: Job, choice: dict) -> tuple[CaptureRecord,
                                                       list[tuple[SpanEntry, Any]]]:
        assert job.user is not None and job.forced_ids is not None
        assert job.forced_offsets is not None and job.forced_prompt_len is not None
        n_prompt = job.forced_prompt_len
        n_comp = len(job.forced_ids)
        plp = choice.get("prompt_logprobs") or []
        token_lps, tops = [], []
        for i, tok in enumerate(job.forced_ids):
            entry = plp[n_prompt + i] if n_prompt + i < len(plp) else None
            entry = entry or {}
            mine = entry.get(str(tok))
            token_lps.append(float(mine["logprob"]) if mine else float("nan"))
            tops.append({k: float(v["logprob"]) for k, v in entry.items()})
        with self._lock:
            self.prompt_tokens += n_prompt + n_comp
        record = job.record.model_copy(update={
            "num_prompt_tokens": n_prompt, "num_generated": n_comp, "finish_reason": "replayed",
        })
        pairs = []
        for span in sorted(job.user.spans, key=lambda s: s.start):
            result = AnswerLabel(label=span.label, reason="user label",
                                 span=(span.start, span.end),
                                 answer=job.user.completion[span.start:span.end])
            # Every completion token was fed, so the own row of the last one exists too.
            pairs.append(self._span(result, job.forced_offsets, len(job.user.completion),
                                    job.forced_ids, token_lps, tops, n_prompt, n_comp,
                                    trainable_last=n_comp - 1))
        record.spans = [p[0] for p in pairs]
        return record, pairs

    def _span(self, result: AnswerLabel, offsets: list[int], text_len: int, token_ids: list[int],
              token_lps: list[float], tops: list, n_prompt: int, n_gen: int,
              trainable_last: int, claim_of: tuple[str, str] | None = None
              ) -> tuple[SpanEntry, tuple[int, int] | None]:
        """The stored span of one labelled answer, and its row positions (None: no rows).

        ``claim_of = (completion, prompt)``: store the claim span that carries the labelled
        answer (:func:`probes.labeling.claim_for_answer`, what the sidecar judges) instead
        of the labeller's answer span; a trainable answer that no claim carries is left out
        (label ``ambiguous``, reason ``no claim span ...``). User spans (``None``) are kept
        as their author drew them.
        """
        entry = SpanEntry(label=result.label, reason=result.reason, chars=result.span,
                          text=result.answer, matched=result.matched, answer_chars=result.span)
        if result.span is None or not offsets:
            return entry, None
        if claim_of is not None and result.label in TRAINABLE:
            completion, prompt = claim_of
            claim = claim_for_answer(completion, result.span, prompt=prompt)
            if claim is None:
                entry.label = "ambiguous"
                entry.reason = f"{NO_CLAIM_REASON} (labelled {result.label}: {result.reason})"
                return entry, None
            entry.chars, entry.text = (claim.start, claim.end), claim.text
        assert entry.chars is not None
        toks = token_span(offsets, entry.chars, text_len)
        if toks is None:
            entry.label, entry.reason = "ambiguous", "span maps to no token"
            return entry, None
        t0, t1 = toks
        entry.tokens = (t0, t1)
        entry.token_ids = token_ids[t0:t1]
        entry.logprobs = token_lps[t0:t1]
        entry.entropies = [entropy_of(tops[i] or {}, self.settings.logprobs)
                           if i < len(tops) else float("nan") for i in range(t0, t1)]
        if entry.label not in ("retrieval", "fabrication"):
            return entry, None
        if t1 - 1 > trainable_last:
            # The last sampled token is never fed back: its own row does not exist.
            entry.label, entry.reason = "ambiguous", "answer truncated at max_tokens"
            return entry, None
        if any(math.isnan(x) for x in entry.logprobs):
            logger.debug("missing logprobs for a span; baselines will skip it")
        return entry, (n_prompt + t0 - 1, n_prompt + t1 - 1)


def _served_model(client: httpx.Client, base_url: str) -> str:
    resp = client.get(f"{base_url}/v1/models", timeout=30)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def run_capture(
    jobs: list[Job],
    out_dir: str | Path,
    *,
    model_dir: Path,
    source: str,
    dataset_hash: str,
    settings: CaptureSettings,
    base_url: str | None = None,
    channel: str | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> CaptureSummary:
    """Capture ``jobs`` into ``out_dir`` (resuming it), starting vLLM unless ``base_url``."""
    out_dir = Path(out_dir)
    identity = identify_model(model_dir, name=model_name)
    if (base_url is None) != (channel is None):
        raise ValueError("give both base_url and channel (an existing server), or neither")
    if not settings.layers:
        settings = settings.model_copy(update={"layers": candidate_layers(identity.num_layers)})
    check_layers(settings.layers, identity)
    start = time.monotonic()
    finished = _already_complete(out_dir, jobs, identity, dataset_hash, settings)
    if finished is not None:
        logger.info("capture in %s is already complete: %s", out_dir, finished.describe())
        return finished
    own_channel = channel is None
    channel = channel or private_channel()
    collector = RowCollector(channel)
    server: CaptureServer | None = None
    try:
        if base_url is None:
            server = start_capture_server(model_dir, layers=settings.layers, log_dir=out_dir,
                                          channel=channel, dtype=settings.dtype,
                                          max_num_seqs=settings.max_num_seqs,
                                          enforce_eager=settings.enforce_eager,
                                          extra_args=settings.vllm_args)
            base_url = server.base_url
        engine = collector.wait_connected(timeout_s=120)
        _check_engine(engine, identity, settings)
        manifest = CaptureManifest(
            model=identity, model_dir=str(model_dir), layers=list(engine.layers),
            hidden_size=engine.hidden_size, served_dtype=engine.dtype,
            capture_method=engine.capture_method, source=source,  # type: ignore[arg-type]
            dataset_hash=dataset_hash,
            settings=settings.model_dump(exclude={"concurrency", "row_timeout_s",
                                                  "request_timeout_s", "shard_rows",
                                                  "enforce_eager", "vllm_args"}),
        )
        store = CaptureStore.create_or_resume(out_dir, manifest, shard_rows=settings.shard_rows)
        done = store.done_ids()
        todo = [j for j in jobs if j.id not in done]
        logger.info("capture: %d jobs, %d already done, %d to run (layers %s, %s rows)",
                    len(jobs), len(jobs) - len(todo), len(todo), engine.layers, engine.dtype)
        with httpx.Client(limits=httpx.Limits(max_connections=settings.concurrency + 4)) as client:
            runner = _Runner(store, collector, client, base_url,
                             _served_model(client, base_url), settings)
            t_run = time.monotonic()
            failed = _run_all(runner, todo, settings, progress)
            elapsed = time.monotonic() - t_run
            for job in failed:
                rec = job.record.model_copy(update={"status": "incomplete",
                                                    "attempts": settings.max_attempts})
                store.append(rec, [])
        store.close()
        summary = _summarise(store, elapsed, runner.generated_tokens, runner.prompt_tokens)
        if collector.subscriber.rejected:
            logger.warning("the channel rejected %d malformed messages",
                           collector.subscriber.rejected)
        logger.info("capture done in %.0f s total: %s", time.monotonic() - start,
                    summary.describe())
        return summary
    finally:
        collector.close()
        if server is not None:
            server.stop()
        if own_channel and channel.startswith("ipc://"):
            shutil.rmtree(Path(channel[len("ipc://"):]).parent, ignore_errors=True)


def _summarise(store: CaptureStore, seconds: float, generated: int, prompt: int
               ) -> CaptureSummary:
    records = store.records()
    return CaptureSummary(
        directory=store.directory, records=len(records),
        labels=dict(Counter(s.label for r in records for s in r.spans)),
        spans_with_rows=sum(1 for r in records for s in r.spans if s.has_rows),
        incomplete=sum(1 for r in records if r.status == "incomplete"),
        seconds=seconds, generated_tokens=generated, prompt_tokens=prompt,
        no_claim=sum(1 for r in records for s in r.spans
                     if s.reason.startswith(NO_CLAIM_REASON)),
    )


def _already_complete(out_dir: Path, jobs: list[Job], identity: ModelIdentity,
                      dataset_hash: str, settings: CaptureSettings) -> CaptureSummary | None:
    """The summary of an existing capture that already holds every job (no server needed)."""
    if not (out_dir / "manifest.json").is_file():
        return None
    store = CaptureStore.open(out_dir)
    m = store.manifest
    if (m.dataset_hash != dataset_hash or m.model.fingerprint != identity.fingerprint
            or not set(settings.layers) <= set(m.layers)):
        return None  # create_or_resume reports the mismatch once the engine is up
    done = store.done_ids()
    if any(j.id not in done for j in jobs):
        return None
    return _summarise(store, 0.0, 0, 0)


def _run_all(runner: _Runner, jobs: list[Job], settings: CaptureSettings, progress: bool
             ) -> list[Job]:
    pending = list(jobs)
    bar = tqdm(total=len(jobs), desc="capture", unit="req", disable=not progress,
               dynamic_ncols=True)
    try:
        for attempt in range(1, settings.max_attempts + 1):
            if not pending:
                break
            if attempt > 1:
                logger.info("retrying %d requests whose rows were incomplete (attempt %d)",
                            len(pending), attempt)
            retry: list[Job] = []
            with ThreadPoolExecutor(settings.concurrency) as pool:
                futures = {pool.submit(runner.run, job, attempt): job for job in pending}
                for fut in as_completed(futures):
                    job = futures[fut]
                    try:
                        ok = fut.result()
                    except httpx.HTTPError as exc:
                        logger.warning("%s: request failed: %s", job.id, exc)
                        ok = False
                    if ok:
                        bar.update()
                        elapsed = max(float(bar.format_dict["elapsed"]), 1e-9)
                        bar.set_postfix(tok_s=f"{runner.generated_tokens / elapsed:.0f}")
                    else:
                        retry.append(job)
            pending = retry
    finally:
        bar.close()
    return pending


def _check_engine(engine: Any, identity: ModelIdentity, settings: CaptureSettings) -> None:
    if engine.fingerprint and engine.fingerprint != identity.fingerprint:
        raise RuntimeError(
            f"the engine serves a model with fingerprint {engine.fingerprint}, but "
            f"{identity.name} has {identity.fingerprint}: pass the served model's folder"
        )
    if engine.hidden_size != identity.hidden_size:
        raise RuntimeError(f"engine hidden size {engine.hidden_size} != {identity.hidden_size}")
    missing = sorted(set(settings.layers) - set(engine.layers))
    if missing:
        logger.warning("the engine does not capture layers %s (it captures %s)",
                       missing, engine.layers)


def capture_questions(questions: Sequence[Question], out_dir: str | Path, *, model_dir: Path,
                      settings: CaptureSettings | None = None, **kwargs: Any) -> CaptureSummary:
    settings = settings or CaptureSettings()
    renderer = PromptRenderer(model_dir)
    jobs = question_jobs(questions, settings.styles, renderer)
    return run_capture(jobs, out_dir, model_dir=model_dir, source="questions",
                       dataset_hash=questions_hash(questions), settings=settings, **kwargs)


def capture_user_records(records: Sequence[UserRecord], out_dir: str | Path, *, model_dir: Path,
                         settings: CaptureSettings | None = None, **kwargs: Any
                         ) -> CaptureSummary:
    import hashlib

    settings = settings or CaptureSettings()
    renderer = PromptRenderer(model_dir)
    jobs = user_jobs(records, renderer.tokenizer)
    digest = hashlib.sha256("".join(r.model_dump_json() for r in records).encode()).hexdigest()
    return run_capture(jobs, out_dir, model_dir=model_dir, source="user",
                       dataset_hash=digest[:16], settings=settings, **kwargs)


__all__ = ["CaptureSettings", "CaptureSummary", "NO_CLAIM_REASON",
           "capture_questions",
           "capture_user_records", "question_jobs", "run_capture", "user_jobs"]

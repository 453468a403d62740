"""The served held-out evaluation: held-out questions through ``lie-detector serve``, read
back over gRPC exactly as a client reads them.

Why served: the probe's offline evaluation scores rows captured under training's prompts;
a user meets the product through the OpenAI API and ``GetScores``, with other prompts and
with the sidecar's own claim spans and thresholds. This module measures that path, on
topics, templates and entities training never sees (:mod:`probes.datasets.heldout`):

1. every question is sent through vLLM's OpenAI API with ``logprobs`` (top 20) and an
   ``X-Request-Id``: ``plain`` (2-shot "Question:/Answer:" completions, stop at newline),
   ``chat`` (zero-shot, one short sentence) and ``longform`` (a paragraph about a country);
2. each answer's scores are read with ``GetScores(wait_until_finished=True)``;
3. short answers are labelled with :func:`probes.labeling.label_answer`; the served claim
   span that overlaps :func:`probes.labeling.claim_for_answer` is the one judged. Long-form
   claims are labelled one by one (:func:`probes.labeling.label_longform_claim`);
4. the served claim score and the free baselines on the same claim tokens (from the
   response's logprobs, aligned by generated-token index) are compared by AUROC with
   entity-bootstrap intervals; verdicts at the shipped threshold are counted.

``benchmarks/heldout.py`` and ``lie-detector evaluate-served`` both call :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from benchmarks import heldout_metrics as hm
from benchmarks.heldout_args import STYLES, add_arguments
from probes.datasets import heldout as ho
from probes.datasets.schema import Question
from probes.labeling import label_longform_claim

if TYPE_CHECKING:
    from detector.serving.client import ProbeInfo, Scores

logger = logging.getLogger(__name__)

Style = Literal["plain", "chat", "longform"]
SHORT_STYLES: tuple[Style, ...] = ("plain", "chat")
PLAIN_STOP = ["\n"]
CHAT_INSTRUCTION = "Answer in one short sentence."
TOP_LOGPROBS = 20


class EvalConfig(BaseModel):
    """What one evaluation run asks, and where it writes."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, description="a running vLLM (with the plugin); "
                                 "None: start `lie-detector serve` here")
    grpc: str | None = Field(None, description="the running sidecar's gRPC address")
    model: str | None = Field(None, description="model folder to serve (default: embedded)")
    probe: Path | None = Field(None, description="probe to serve (default: the shipped one)")
    probe_name: str | None = Field(None, description="probe to read among the served ones")
    styles: list[Style] = Field(default_factory=lambda: list(STYLES))
    topics: list[str] | None = None
    limit_per_topic: int | None = Field(None, ge=1)
    invented_per_topic: int = Field(ho.INVENTED_PER_TOPIC, ge=1)
    longform_real: int | None = Field(None, ge=0)
    longform_invented: int = Field(30, ge=0)
    # real and invented cities asked about their time (long form of a held-out-only domain)
    longform_cities: int = Field(30, ge=0)
    concurrency: int = Field(12, ge=1, le=64)
    enforce_eager: bool = False  # start serve without torch.compile (faster start on a busy box)
    max_tokens_plain: int = Field(16, ge=1)
    max_tokens_chat: int = Field(32, ge=1)
    max_tokens_longform: int = Field(80, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    out: Path = Path("benchmarks/results/heldout.json")
    answers_out: Path | None = None  # default: <out stem>-answers.jsonl
    plot: bool = True
    save_to_probe: bool = False  # also write the summary the demo reads into the probe folder
    progress: bool = True


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The run the flags of :func:`benchmarks.heldout_args.add_arguments` ask for."""
    return EvalConfig(
        base_url=args.base_url, grpc=args.grpc, model=args.model, probe=args.probe,
        probe_name=args.probe_name, styles=args.styles, topics=args.topics,
        limit_per_topic=args.limit_per_topic, invented_per_topic=args.invented_per_topic,
        longform_real=args.longform_real, longform_invented=args.longform_invented,
        longform_cities=args.longform_cities,
        concurrency=args.concurrency, enforce_eager=args.enforce_eager,
        bootstrap=args.bootstrap, seed=args.seed, out=args.out,
        plot=not args.no_plot, save_to_probe=args.save_to_probe,
        progress=not args.no_progress)


# ----------------------------------------------------------------------------- requests
@dataclass
class Job:
    """One request: a short question in one style, or a long-form subject."""

    style: Style
    topic: str
    family: str  # the held-out template; real and invented twins share it
    entity: str
    subject: str
    invented: bool
    question: Question | None = None
    longform: ho.LongformSubject | None = None
    request_id: str = ""


def plain_prompt(q: Question) -> str:
    """2-shot, a wording training never uses ("Question:/Answer:", blank lines)."""
    parts = [f"Question: {s.question}\nAnswer: {s.answer}" for s in q.shots[:2]]
    parts.append(f"Question: {q.question}\nAnswer:")
    return "\n\n".join(parts)


def chat_messages(q: Question) -> list[dict[str, str]]:
    """Zero-shot chat, the instruction in the user turn."""
    return [{"role": "user", "content": f"{q.question} {CHAT_INSTRUCTION}"}]


def longform_messages(s: ho.LongformSubject) -> list[dict[str, str]]:
    return [{"role": "user", "content": s.prompt}]


def build_jobs(cfg: EvalConfig) -> list[Job]:
    jobs: list[Job] = []
    short = [s for s in cfg.styles if s in SHORT_STYLES]
    if short:
        questions = ho.build_heldout(cfg.topics, invented_per_topic=cfg.invented_per_topic,
                                     limit_per_topic=cfg.limit_per_topic, seed=cfg.seed)
        for style in short:
            for q in questions:
                jobs.append(Job(style, q.topic, q.topic.removesuffix("_invented"), q.entity,
                                q.subject, q.invented, question=q))
    if "longform" in cfg.styles:
        for s in ho.longform_subjects(cfg.longform_real, cfg.longform_invented, seed=cfg.seed):
            jobs.append(Job("longform", "longform_invented" if s.invented else "longform_real",
                            "longform_country", s.entity, s.name, s.invented, longform=s))
        for s in ho.longform_city_subjects(cfg.longform_cities, cfg.longform_cities,
                                           seed=cfg.seed):
            jobs.append(Job("longform", f"{s.family}_{'invented' if s.invented else 'real'}",
                            s.family, s.entity, s.name, s.invented, longform=s))
    tag = uuid.uuid4().hex[:8]
    for i, job in enumerate(jobs):
        job.request_id = f"heldout-{tag}-{i}"
    return jobs


@dataclass
class Reply:
    """What the client got back: the OpenAI response's text and logprobs, and GetScores."""

    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    tops: list[list[float]] = field(default_factory=list)
    finish_reason: str | None = None
    scores: Scores | None = None
    error: str | None = None
    seconds: float = 0.0


class Client:
    """OpenAI HTTP + gRPC GetScores, as any client of the product would call them."""

    def __init__(self, base_url: str, grpc_address: str, cfg: EvalConfig) -> None:
        import httpx

        from detector.serving.client import DetectorClient

        self.base_url = base_url.rstrip("/")
        self.cfg = cfg
        self.http = httpx.Client(timeout=cfg.request_timeout_s,
                                 limits=httpx.Limits(max_connections=cfg.concurrency * 2))
        self.detector = DetectorClient(grpc_address, timeout=30)
        self.model = self.http.get(f"{self.base_url}/v1/models").json()["data"][0]["id"]

    def close(self) -> None:
        self.http.close()
        self.detector.close()

    def probes(self) -> list[ProbeInfo]:
        return list(self.detector.list_probes().probes)

    def ask(self, job: Job) -> Reply:
        reply = Reply()
        started = time.monotonic()
        headers = {"X-Request-Id": job.request_id}
        try:
            if job.style == "plain":
                assert job.question is not None
                body = {"model": self.model, "prompt": plain_prompt(job.question),
                        "max_tokens": self.cfg.max_tokens_plain, "temperature": 0.0,
                        "stop": PLAIN_STOP, "logprobs": TOP_LOGPROBS}
                resp = self.http.post(f"{self.base_url}/v1/completions", json=body,
                                      headers=headers)
                resp.raise_for_status()
                choice = resp.json()["choices"][0]
                reply.text = choice["text"]
                reply.finish_reason = choice.get("finish_reason")
                lp = choice.get("logprobs") or {}
                reply.tokens = list(lp.get("tokens") or [])
                reply.logprobs = list(lp.get("token_logprobs") or [])
                reply.tops = [list((t or {}).values()) for t in lp.get("top_logprobs") or []]
            else:
                if job.style == "chat":
                    assert job.question is not None
                    messages, max_tokens = chat_messages(job.question), self.cfg.max_tokens_chat
                else:
                    assert job.longform is not None
                    messages = longform_messages(job.longform)
                    max_tokens = self.cfg.max_tokens_longform
                body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                        "temperature": 0.0, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
                resp = self.http.post(f"{self.base_url}/v1/chat/completions", json=body,
                                      headers=headers)
                resp.raise_for_status()
                choice = resp.json()["choices"][0]
                reply.text = choice["message"].get("content") or ""
                reply.finish_reason = choice.get("finish_reason")
                content = (choice.get("logprobs") or {}).get("content") or []
                reply.tokens = [c.get("token", "") for c in content]
                reply.logprobs = [c.get("logprob") for c in content]
                reply.tops = [[t.get("logprob") for t in c.get("top_logprobs") or []]
                              for c in content]
            reply.scores = self.detector.get_scores(job.request_id, wait_until_finished=True,
                                                    timeout=self.cfg.request_timeout_s)
        except Exception as exc:  # one failed request is counted, not fatal
            reply.error = f"{type(exc).__name__}: {exc}"[:500]
            logger.warning("request %s failed: %s", job.request_id, reply.error)
        reply.seconds = time.monotonic() - started
        return reply


# ----------------------------------------------------------------------------- labelling
@dataclass
class Item:
    """One judged claim: the answer's claim (short styles) or one long-form claim."""

    style: str
    topic: str
    family: str
    entity: str
    subject: str
    invented: bool
    request_id: str
    text: str
    label: str  # retrieval | fabrication | refusal | ambiguous | unlabelled | echo | ...
    reason: str
    claim: str = ""
    char_span: tuple[int, int] | None = None
    token_span: tuple[int, int] | None = None
    probe: float = float("nan")
    threshold: float = float("nan")
    claim_flagged: bool | None = None
    verdict_flagged: bool | None = None  # the response verdict (any claim flagged)
    verdict_score: float = float("nan")
    neg_min_logprob: float = float("nan")
    neg_mean_logprob: float = float("nan")
    mean_entropy: float = float("nan")
    state: str = ""
    openai_tokens: int = 0
    sidecar_tokens: int = 0
    text_matches: bool = True


def _claims(scores: Any, probe: str) -> list[Any]:
    return [s for s in scores.spans if s.kind == "claim" and s.probe == probe]


def _verdict(scores: Any, probe: str) -> Any | None:
    for v in scores.verdicts:
        if v.probe == probe:
            return v
    return None


def _fill(item: Item, span: Any, reply: Reply) -> None:
    item.claim = span.text
    item.char_span = (span.char_start, span.char_end)
    item.token_span = (span.token_start, span.token_end)
    item.probe = float(span.score)
    item.threshold = float(span.threshold)
    item.claim_flagged = bool(span.flagged)
    base = hm.logprob_baselines(reply.logprobs, reply.tops, span.token_start, span.token_end)
    item.neg_min_logprob = base["neg_min_logprob"]
    item.neg_mean_logprob = base["neg_mean_logprob"]
    item.mean_entropy = base["mean_entropy"]


def _base_item(job: Job, reply: Reply, probe: str) -> Item:
    item = Item(job.style, job.topic, job.family, job.entity, job.subject, job.invented,
                job.request_id, reply.text, label="error", reason=reply.error or "")
    item.openai_tokens = len(reply.logprobs)
    if reply.scores is not None:
        # The wire enum's name, as the results have always said it.
        item.state = f"REQUEST_STATE_{reply.scores.state.name}"
        item.sidecar_tokens = len(reply.scores.tokens)
        item.text_matches = reply.scores.text == reply.text
        v = _verdict(reply.scores, probe)
        if v is not None and v.claims:
            item.verdict_flagged = bool(v.flagged)
            item.verdict_score = float(v.score)
    return item


def label_short(job: Job, reply: Reply, probe: str) -> Item:
    """The answer's label and the served claim that carries it."""
    from probes.labeling import claim_for_answer, label_answer

    item = _base_item(job, reply, probe)
    if reply.error or reply.scores is None:
        return item
    assert job.question is not None
    lab = label_answer(job.question, reply.text)
    item.label, item.reason = lab.label, lab.reason
    if lab.span is None:
        return item
    prompt = plain_prompt(job.question) if job.style == "plain" else job.question.question
    claim = claim_for_answer(reply.text, lab.span, prompt=prompt)
    target = (claim.start, claim.end) if claim is not None else lab.span
    best, overlap = None, 0
    for span in _claims(reply.scores, probe):
        k = min(span.char_end, target[1]) - max(span.char_start, target[0])
        if k > overlap:
            best, overlap = span, k
    if best is None:
        item.reason += "; no served claim carries the answer"
        return item
    _fill(item, best, reply)
    return item


def label_longform(job: Job, reply: Reply, probe: str) -> list[Item]:
    """One item per served claim span of a long-form answer."""
    base = _base_item(job, reply, probe)
    if reply.error or reply.scores is None:
        return [base]
    assert job.longform is not None
    subject = job.longform
    out = []
    for span in _claims(reply.scores, probe):
        item = Item(**{**asdict(base)})
        label, why = label_longform_claim(
            span.text, subject=subject.name, invented=subject.invented, values=subject.values,
            other_values=ho.longform_other_values(subject.family), prompt=subject.prompt,
            entity_key=subject.entity.partition(":")[2])
        item.label, item.reason = label, why
        _fill(item, span, reply)
        out.append(item)
    if not out:
        base.label, base.reason = "no_claim", "the sidecar returned no claim span"
        out.append(base)
    return out


# ----------------------------------------------------------------------------- summary
def _auroc_block(items: list[Item], cfg: EvalConfig) -> dict[str, Any]:
    judged = [i for i in items if i.label in ("retrieval", "fabrication")
              and i.token_span is not None]
    y = [int(i.label == "fabrication") for i in judged]
    scores = {k: [getattr(i, k) for i in judged] for k in hm.SCORERS}
    return hm.bootstrap_aurocs(y, scores, [i.entity for i in judged], n_boot=cfg.bootstrap,
                               seed=cfg.seed)


def _answer_verdicts(items: list[Item]) -> dict[str, Any]:
    judged = [i for i in items if i.label in ("retrieval", "fabrication")
              and i.verdict_flagged is not None]
    out = hm.verdict_metrics([i.label for i in judged], [bool(i.verdict_flagged)
                                                         for i in judged])
    claims = [i for i in judged if i.claim_flagged is not None]
    ret = [i for i in claims if i.label == "retrieval"]
    out["answer_claim_flagged_correct"] = (sum(bool(i.claim_flagged) for i in ret) / len(ret)
                                           if ret else None)
    return out


def _flag_share(items: list[Item]) -> dict[str, Any]:
    n = len(items)
    k = sum(bool(i.claim_flagged) for i in items)
    return {"claims": n, "flagged": k, "share": k / n if n else None}


def _longform_block(items: list[Item], jobs: list[Job], family: str) -> dict[str, Any]:
    """Flag shares of one long-form family's claims (real: all, matching the subject's
    values, matching another subject's; invented: every non-echo claim)."""
    lf = [i for i in items if i.style == "longform" and i.family == family
          and i.token_span is not None]
    if not lf:
        return {}
    real = [i for i in lf if not i.invented]
    fake = [i for i in lf if i.invented and i.label != "echo"]
    return {
        "real_all_claims": _flag_share(real),
        "real_retrieval_claims": _flag_share([i for i in real if i.label == "retrieval"]),
        "real_fabrication_claims": _flag_share([i for i in real if i.label == "fabrication"]),
        "invented_claims": _flag_share(fake),
        "labels": _counts([i for i in items if i.style == "longform" and i.family == family]),
        "responses": sum(1 for j in jobs if j.style == "longform" and j.family == family),
    }


def _slices(items: list[Item], key: Callable[[Item], str], cfg: EvalConfig
            ) -> dict[str, dict[str, Any]]:
    """AUROC block and label counts per value of ``key`` (topic family, domain)."""
    groups: dict[str, list[Item]] = {}
    for i in items:
        groups.setdefault(key(i), []).append(i)
    return {k: {**_auroc_block(g, cfg), "labels": _counts(g)} for k, g in sorted(groups.items())}


def summarise(items: list[Item], jobs: list[Job], replies: dict[str, Reply],
              cfg: EvalConfig) -> dict[str, Any]:
    styles: dict[str, Any] = {}
    topics: dict[str, dict[str, Any]] = {}
    domains: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, Any] = {}
    present = [s for s in cfg.styles if any(i.style == s for i in items)]
    for style in present:
        its = [i for i in items if i.style == style]
        styles[style] = _auroc_block(its, cfg)
        styles[style]["labels"] = _counts(its)
        topics[style] = _slices(its, lambda i: i.family, cfg)
        domains[style] = _slices(its, lambda i: ho.domain_of(i.family), cfg)
        if style in SHORT_STYLES:
            verdicts[style] = _answer_verdicts(its)
    short = [i for i in items if i.style in SHORT_STYLES]
    if short:
        styles["short (plain + chat)"] = _auroc_block(short, cfg)
        verdicts["short (plain + chat)"] = _answer_verdicts(short)
    longform = _longform_block(items, jobs, "longform_country")
    longform_city = _longform_block(items, jobs, "longform_city")
    errors = [r.error for r in replies.values() if r.error]
    per_answer = [i for i in items if i.style in SHORT_STYLES]
    return {
        "styles": styles, "topics": topics, "domains": domains, "verdicts": verdicts,
        "longform": longform, "longform_city": longform_city,
        # domains no training topic covers (the per-domain table marks them)
        "domains_heldout_only": sorted(ho.HELDOUT_ONLY_DOMAINS),
        "response_verdict": verdicts.get("short (plain + chat)", {}),
        "requests": {
            "sent": len(jobs), "errors": len(errors), "error_examples": errors[:5],
            "with_verdict_entry": sum(1 for r in replies.values() if r.scores is not None
                                      and len(r.scores.verdicts) > 0),
            "with_verdict": sum(1 for r in replies.values() if r.scores is not None
                                and any(v.claims for v in r.scores.verdicts)),
            "states": _counter(i.state for i in _one_per_request(items)),
            "answers_without_served_claim": sum(1 for i in per_answer if i.label in (
                "retrieval", "fabrication") and i.token_span is None),
        },
        "alignment": {
            # OpenAI's logprobs also list the token that carried a stop string, which the
            # client's text (and the sidecar) leave out: a difference of 1 in plain is that.
            "token_count_mismatch": sum(1 for i in _one_per_request(items)
                                        if i.openai_tokens != i.sidecar_tokens),
            "openai_minus_sidecar_tokens": _counter(
                f"{i.style}:{i.openai_tokens - i.sidecar_tokens}"
                for i in _one_per_request(items)),
            "text_mismatch": sum(1 for i in _one_per_request(items) if not i.text_matches),
            "requests": len(_one_per_request(items)),
        },
    }


def _one_per_request(items: list[Item]) -> list[Item]:
    seen: dict[str, Item] = {}
    for i in items:
        seen.setdefault(i.request_id, i)
    return list(seen.values())


def _counter(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _counts(items: list[Item]) -> dict[str, int]:
    return _counter(i.label for i in items)


# ----------------------------------------------------------------------------- running
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Served:
    """`lie-detector serve` started here (vLLM + sidecar, supervised), or a running one."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.supervisor: Any = None
        self.logs: Path | None = None
        self.base_url = cfg.base_url or ""
        self.grpc = cfg.grpc or ""
        self.probe_path: Path | None = cfg.probe

    def __enter__(self) -> _Served:
        if self.cfg.base_url and self.cfg.grpc:
            return self
        if self.cfg.base_url or self.cfg.grpc:
            raise ValueError("pass both --base-url and --grpc for a running server, or neither")
        from detector.artifact import default_probe_dir
        from detector.models.embedded import resolve_model
        from detector.model_identity import identify_model
        from detector.serving.serve import (
            ServeOptions,
            Supervisor,
            wait_for_grpc_health,
            wait_until_healthy,
        )

        model_dir = resolve_model(self.cfg.model)
        self.probe_path = self.cfg.probe or default_probe_dir()
        if self.probe_path is None:
            raise ValueError("no probe to serve: pass --probe (no default probe is installed)")
        self.logs = Path(tempfile.mkdtemp(prefix="lie-detector-heldout-"))
        opts = ServeOptions(model_dir=model_dir, port=_free_port(),
                            grpc_address=f"127.0.0.1:{_free_port()}", metrics_port=None,
                            probes=[self.probe_path],
                            channel=f"ipc://{self.logs}/channel.sock", max_model_len=1024,
                            enforce_eager=self.cfg.enforce_eager,
                            vllm_args=["--max-num-seqs", str(max(self.cfg.concurrency, 8)),
                                       "--seed", "0"],
                            log_dir=self.logs)
        logger.info("starting lie-detector serve (vLLM + sidecar); logs in %s", self.logs)
        self.supervisor = Supervisor(opts, identify_model(model_dir).num_layers)
        self.supervisor.start()
        try:
            wait_for_grpc_health(opts.grpc_address, self.supervisor.sidecar, timeout_s=180)
            wait_until_healthy(f"http://{opts.host}:{opts.port}", self.supervisor.vllm,
                               timeout_s=900)
            wait_for_grpc_health(opts.grpc_address, self.supervisor.sidecar, timeout_s=120,
                                 service="liedetector.v1.Hook")
        except BaseException:  # SIGTERM (SystemExit) and ^C too: never leave them running
            self.__exit__(None, None, None)
            raise
        self.base_url = f"http://{opts.host}:{opts.port}"
        self.grpc = opts.grpc_address
        return self

    def __exit__(self, *exc: object) -> None:
        if self.supervisor is not None:
            self.supervisor.shutdown()
            self.supervisor = None


def _pick_probe(client: Client, cfg: EvalConfig) -> tuple[str, dict[str, Any]]:
    infos = client.probes()
    active = [p for p in infos if not p.inactive_reason]
    if cfg.probe_name:
        chosen = [p for p in infos if p.name == cfg.probe_name]
        if not chosen:
            raise ValueError(f"probe {cfg.probe_name!r} is not served "
                             f"(served: {[p.name for p in infos]})")
    else:
        chosen = active or infos
    if not chosen:
        raise ValueError("the sidecar serves no probe")
    p = chosen[0]
    if p.inactive_reason:
        logger.warning("probe %s is inactive: %s", p.name, p.inactive_reason)
    return p.name, {"name": p.name, "layers": list(p.layers), "threshold": p.threshold,
                    "aggregation": p.aggregation, "score_position": p.score_position,
                    "path": p.path, "model_fingerprint": p.model_fingerprint,
                    "inactive_reason": p.inactive_reason}


def collect(jobs: list[Job], client: Client, probe: str, cfg: EvalConfig
            ) -> tuple[list[Item], dict[str, Reply]]:
    """Send every job (``cfg.concurrency`` at once), then label each reply."""
    replies: dict[str, Reply] = {}
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="held-out requests", unit="req")
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        futures = {pool.submit(client.ask, job): job for job in jobs}
        for fut in as_completed(futures):
            replies[futures[fut].request_id] = fut.result()
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    items: list[Item] = []
    for job in jobs:
        reply = replies[job.request_id]
        if job.style == "longform":
            items.extend(label_longform(job, reply, probe))
        else:
            items.append(label_short(job, reply, probe))
    return items, replies


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(cfg: EvalConfig, *, command: str = "", on_ready: Callable[[], None] | None = None
        ) -> dict[str, Any]:
    """One evaluation end to end; writes ``cfg.out`` (+ answers JSONL and a plot)."""
    t0 = time.monotonic()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM must unwind through _Served.__exit__, or vLLM and the sidecar (own
        # sessions) outlive the run.
        signal.signal(signal.SIGTERM, _raise_exit)
    jobs = build_jobs(cfg)
    logger.info("%d requests (%s)", len(jobs), _counter(j.style for j in jobs))
    with _Served(cfg) as served:
        startup_s = time.monotonic() - t0
        if on_ready is not None:
            on_ready()
        client = Client(served.base_url, served.grpc, cfg)
        try:
            probe, probe_info = _pick_probe(client, cfg)
            t1 = time.monotonic()
            items, replies = collect(jobs, client, probe, cfg)
            requests_s = time.monotonic() - t1
            model = client.model
        finally:
            client.close()
        probe_path = served.probe_path
    result: dict[str, Any] = {
        "source": "benchmarks/heldout.py (lie-detector evaluate-served)",
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model, "probe": probe_info,
        "config": json.loads(cfg.model_dump_json()),
        "topics_heldout": list(ho.TOPICS),
        **summarise(items, jobs, replies, cfg),
        "timing_s": {"startup": startup_s, "requests": requests_s,
                     "total": time.monotonic() - t0},
    }
    write(result, items, cfg, probe_path)
    return result


def write(result: dict[str, Any], items: list[Item], cfg: EvalConfig,
          probe_path: Path | None) -> None:
    out = cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    answers = cfg.answers_out or out.with_name(out.stem + "-answers.jsonl")
    with answers.open("w") as fh:
        for item in items:
            fh.write(json.dumps(_jsonable(asdict(item))) + "\n")
    logger.info("wrote %s and %s", out, answers)
    if cfg.plot:
        from benchmarks.heldout_report import plot

        logger.info("plot: %s", plot(result, out.with_suffix(".png")))
    if cfg.save_to_probe and probe_path is not None:
        from benchmarks.heldout_report import probe_summary

        target = probe_path / "heldout.json"
        target.write_text(json.dumps(_jsonable(probe_summary(result)), indent=2) + "\n")
        logger.info("wrote the demo's summary to %s", target)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x



__all__ = ["STYLES", "EvalConfig", "Item", "Job", "add_arguments", "build_jobs",
           "chat_messages", "collect", "config_from_args", "label_longform", "label_short",
           "plain_prompt", "run", "summarise"]

"""A capture on disk: a manifest, an index of records (JSONL) and float16 row shards.

Layout of a capture directory::

    manifest.json            CaptureManifest: model identity, captured layers, settings
    index.jsonl              one CaptureRecord per line (the last line for an id wins)
    shards/shard-00000.safetensors   tensor "rows" (n, len(layers), hidden) float16

A labelled span of generated tokens ``[t0, t1)`` owns ``t1 - t0 + 1`` consecutive shard
rows: the rows at positions ``P + t0 - 1 ... P + t1 - 1`` (P = prompt tokens). Row ``k``
is the *producer* row of token ``t0 + k`` and the *own* row of token ``t0 + k - 1``.

Writes are crash-safe and resumable: a shard is written to a temporary file and renamed,
and only then are its records appended to the index, so every indexed row exists; rows
not yet flushed are simply captured again on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load_file, save_file

from detector import __version__
from detector.model_identity import ModelIdentity
from probes.labeling import Label

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.jsonl"
SHARDS = "shards"
STORE_VERSION = 1


class CaptureManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: Literal[1] = STORE_VERSION
    model: ModelIdentity
    model_dir: str
    layers: list[int]
    hidden_size: int
    stored_dtype: Literal["float16"] = "float16"
    served_dtype: str
    capture_method: str = ""
    source: Literal["questions", "user"]
    dataset_hash: str
    settings: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    library_version: str = __version__


class SpanEntry(BaseModel):
    """One labelled span of a completion, with its per-token baseline features."""

    model_config = ConfigDict(extra="forbid")

    label: Label
    reason: str = ""
    chars: tuple[int, int] | None = None  # the span scored: a claim span for generated answers
    text: str = ""
    # the labeller's answer span, when the stored span is the claim that carries it
    answer_chars: tuple[int, int] | None = None
    matched: str | None = None
    tokens: tuple[int, int] | None = None  # generated-token indices [t0, t1)
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)  # of the generated token
    entropies: list[float] = Field(default_factory=list)  # over the top-k, renormalised
    row_offset: int | None = None  # first row of this span in the record's shard
    num_rows: int = 0

    @property
    def has_rows(self) -> bool:
        return self.row_offset is not None and self.num_rows > 0


class CaptureRecord(BaseModel):
    """One prompt sent through vLLM: what came back and how it was labelled."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: Literal["questions", "user"]
    question_id: str
    topic: str
    domain: str
    group: str
    subject: str = ""
    invented: bool = False
    style: str = "plain"
    question: str = ""
    gold: str | None = None
    completion: str = ""
    num_prompt_tokens: int = 0
    num_generated: int = 0
    finish_reason: str | None = None
    status: Literal["ok", "incomplete"] = "ok"
    attempts: int = 1
    spans: list[SpanEntry] = Field(default_factory=list)
    shard: int | None = None


def _shard_name(n: int) -> str:
    return f"shard-{n:05d}.safetensors"


class CaptureStore:
    """Append-only writer and reader of a capture directory (thread-safe appends)."""

    def __init__(self, directory: str | Path, manifest: CaptureManifest, *,
                 shard_rows: int = 4096) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.shard_rows = shard_rows
        self._lock = threading.Lock()
        self._pending: list[tuple[CaptureRecord, list[np.ndarray]]] = []
        self._pending_rows = 0
        self._records: dict[str, CaptureRecord] = {}
        self._shard_cache: dict[int, np.ndarray] = {}
        (self.directory / SHARDS).mkdir(parents=True, exist_ok=True)
        self._load_index()
        self._next_shard = self._find_next_shard()

    # --- opening

    @classmethod
    def create_or_resume(cls, directory: str | Path, manifest: CaptureManifest, *,
                         shard_rows: int = 4096) -> CaptureStore:
        """Open ``directory`` for appending; an existing capture must match ``manifest``."""
        directory = Path(directory)
        path = directory / MANIFEST
        if path.exists():
            old = CaptureManifest.model_validate_json(path.read_text())
            problems = []
            if old.model.fingerprint != manifest.model.fingerprint:
                problems.append(f"model fingerprint {old.model.fingerprint} != "
                                f"{manifest.model.fingerprint}")
            if old.layers != manifest.layers:
                problems.append(f"layers {old.layers} != {manifest.layers}")
            if old.source != manifest.source:
                problems.append(f"source {old.source} != {manifest.source}")
            if old.dataset_hash != manifest.dataset_hash:
                problems.append(f"dataset {old.dataset_hash} != {manifest.dataset_hash}")
            if problems:
                raise ValueError(f"{directory} holds another capture ({'; '.join(problems)}); "
                                 "use a new --out directory")
            logger.info("resuming the capture in %s", directory)
            manifest = old
        else:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
            tmp.replace(path)
        return cls(directory, manifest, shard_rows=shard_rows)

    @classmethod
    def open(cls, directory: str | Path) -> CaptureStore:
        """Open an existing capture for reading."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a capture directory (no {MANIFEST})")
        manifest = CaptureManifest.model_validate_json(path.read_text())
        return cls(directory, manifest)

    def _load_index(self) -> None:
        path = self.directory / INDEX
        if not path.exists():
            return
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        record = CaptureRecord.model_validate_json(line)
                    except ValueError:
                        logger.warning("%s: skipping a torn index line", path)
                        continue
                    self._records[record.id] = record

    def _find_next_shard(self) -> int:
        used = {r.shard for r in self._records.values() if r.shard is not None}
        for path in (self.directory / SHARDS).glob("shard-*.safetensors"):
            n = int(path.name[6:11])
            if n not in used:  # written but never indexed: a crash between the two steps
                logger.info("removing unindexed shard %s", path)
                path.unlink()
        for path in (self.directory / SHARDS).glob("*.tmp"):
            path.unlink()
        return max(used, default=-1) + 1

    # --- writing

    def done_ids(self) -> set[str]:
        return {rid for rid, r in self._records.items() if r.status == "ok"}

    def append(self, record: CaptureRecord, span_rows: list[np.ndarray | None]) -> None:
        """Add a record; ``span_rows[i]`` are span i's rows (n, L, H) or None."""
        if len(span_rows) != len(record.spans):
            raise ValueError("one rows entry per span")
        rows = [r for r in span_rows if r is not None]
        with self._lock:
            if not rows:
                self._write_index([record])
                return
            self._pending.append((record, [r for r in span_rows]))  # type: ignore[misc]
            self._pending_rows += sum(r.shape[0] for r in rows)
            if self._pending_rows >= self.shard_rows:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        shard = self._next_shard
        blocks: list[np.ndarray] = []
        offset = 0
        records = []
        for record, span_rows in self._pending:
            record = record.model_copy(deep=True)
            record.shard = shard
            for span, rows in zip(record.spans, span_rows):
                if rows is None:
                    continue
                span.row_offset, span.num_rows = offset, int(rows.shape[0])
                blocks.append(np.ascontiguousarray(rows, dtype=np.float16))
                offset += rows.shape[0]
            records.append(record)
        path = self.directory / SHARDS / _shard_name(shard)
        tmp = path.with_suffix(".tmp")
        save_file({"rows": np.concatenate(blocks, axis=0)}, str(tmp))
        os.replace(tmp, path)
        self._write_index(records)
        self._next_shard += 1
        self._pending, self._pending_rows = [], 0
        logger.debug("wrote %s (%d rows, %d records)", path.name, offset, len(records))

    def _write_index(self, records: list[CaptureRecord]) -> None:
        with (self.directory / INDEX).open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(record.model_dump_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for record in records:
            self._records[record.id] = record

    def close(self) -> None:
        self.flush()

    # --- reading

    def records(self) -> list[CaptureRecord]:
        return list(self._records.values())

    def shard(self, n: int) -> np.ndarray:
        if n not in self._shard_cache:
            self._shard_cache[n] = load_file(str(self.directory / SHARDS / _shard_name(n)))["rows"]
        return self._shard_cache[n]

    def span_rows(self, record: CaptureRecord, span: SpanEntry) -> np.ndarray:
        """(num_rows, L, H) float16 rows of one span."""
        if record.shard is None or not span.has_rows:
            raise ValueError(f"record {record.id}: span has no rows")
        assert span.row_offset is not None
        return self.shard(record.shard)[span.row_offset:span.row_offset + span.num_rows]

    def iter_spans(self) -> Iterator[tuple[CaptureRecord, SpanEntry]]:
        for record in self._records.values():
            for span in record.spans:
                yield record, span

    def data_hash(self) -> str:
        """Digest of the labelled spans (ids, labels, token ranges) training reads."""
        digest = hashlib.sha256()
        for record in sorted(self._records.values(), key=lambda r: r.id):
            for span in record.spans:
                if span.has_rows:
                    digest.update(json.dumps(
                        [record.id, span.label, span.tokens, record.completion]).encode())
        return digest.hexdigest()[:16]


__all__ = ["CaptureManifest", "CaptureRecord", "CaptureStore", "SpanEntry"]

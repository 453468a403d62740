"""Users' own labelled data: one JSON object per line (JSONL).

Each line is a prompt, the completion the model gave (or would give) for it, and the
labelled character spans of that completion::

    {"id": "ticket-17", "prompt": "Q: Who wrote Dune?\\nA:", "completion": " Frank Herbert",
     "spans": [{"start": 1, "end": 14, "label": "retrieval"}],
     "group": "dune", "topic": "books"}

* ``prompt`` is the exact text the model reads (apply your chat template yourself);
* ``completion`` is the generated text; ``start``/``end`` are character offsets into it
  (Python ``completion[start:end]``, end exclusive);
* ``label`` is ``fabrication`` (the claim is made up) or ``retrieval`` (it is correct);
* ``group`` (optional, default ``id``) keeps related lines on one side of every split
  (use the entity the line is about); ``topic`` (optional, default ``user``) drives the
  cross-topic evaluation.

Capture replays ``prompt + completion`` through vLLM (teacher forcing), so the rows are
the ones the model computes when it generates that completion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SpanLabel = Literal["fabrication", "retrieval"]
MAX_ERRORS_SHOWN = 20


class UserDataError(ValueError):
    """A user JSONL file with invalid lines; the message lists them as ``file:line: why``."""


class UserSpan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=0, description="first character of the span in the completion")
    end: int = Field(gt=0, description="one past the last character")
    label: SpanLabel

    @model_validator(mode="after")
    def _ordered(self) -> UserSpan:
        if self.end <= self.start:
            raise ValueError(f"span end {self.end} must be greater than start {self.start}")
        return self


class UserRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)
    spans: list[UserSpan] = Field(min_length=1)
    group: str | None = None
    topic: str = "user"

    @model_validator(mode="after")
    def _spans_fit(self) -> UserRecord:
        n = len(self.completion)
        previous_end = 0
        for i, span in enumerate(sorted(self.spans, key=lambda s: s.start)):
            if span.end > n:
                raise ValueError(
                    f"span {i} [{span.start}, {span.end}) ends past the completion "
                    f"({n} characters)"
                )
            if span.start < previous_end:
                raise ValueError(f"span {i} [{span.start}, {span.end}) overlaps the previous span")
            if not self.completion[span.start:span.end].strip():
                raise ValueError(f"span {i} [{span.start}, {span.end}) covers only whitespace")
            previous_end = span.end
        return self

    @property
    def group_key(self) -> str:
        return self.group or self.id


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_user_lines(lines: list[str], *, source: str = "<input>") -> list[UserRecord]:
    """Validate every line; raise one :class:`UserDataError` listing all the bad ones."""
    records: list[UserRecord] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{source}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(doc, dict):
            errors.append(f"{source}:{lineno}: expected a JSON object, got {type(doc).__name__}")
            continue
        try:
            record = UserRecord.model_validate(doc)
        except ValidationError as exc:
            errors.append(f"{source}:{lineno}: {_explain(exc)}")
            continue
        if record.id in seen:
            errors.append(f"{source}:{lineno}: id {record.id!r} already used on line "
                          f"{seen[record.id]}")
            continue
        seen[record.id] = lineno
        records.append(record)
    if errors:
        more = len(errors) - MAX_ERRORS_SHOWN
        shown = errors[:MAX_ERRORS_SHOWN] + ([f"... and {more} more"] if more > 0 else [])
        raise UserDataError(f"{len(errors)} invalid line(s):\n" + "\n".join(shown))
    if not records:
        raise UserDataError(f"{source}: no records")
    return records


def load_user_jsonl(path: str | Path) -> list[UserRecord]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserDataError(f"{path}: cannot be read: {exc}") from None
    return parse_user_lines(text.splitlines(), source=str(path))


__all__ = ["SpanLabel", "UserDataError", "UserRecord", "UserSpan", "load_user_jsonl",
           "parse_user_lines"]

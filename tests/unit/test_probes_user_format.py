"""The user JSONL format: valid files load, invalid lines are reported clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probes.datasets.user import UserDataError, load_user_jsonl, parse_user_lines

GOOD = {"id": "a", "prompt": "Q: Who wrote Dune?\nA:", "completion": " Frank Herbert",
        "spans": [{"start": 1, "end": 14, "label": "retrieval"}]}


def lines(*docs: object) -> list[str]:
    return [d if isinstance(d, str) else json.dumps(d) for d in docs]


def test_valid_file(tmp_path: Path) -> None:
    second = {**GOOD, "id": "b", "completion": " Isaac Asimov, in 1965",
              "spans": [{"start": 1, "end": 13, "label": "fabrication"},
                        {"start": 18, "end": 22, "label": "retrieval"}],
              "group": "dune", "topic": "books"}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines(GOOD, second)) + "\n\n")
    records = load_user_jsonl(path)
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].group_key == "a" and records[1].group_key == "dune"
    assert records[0].topic == "user" and records[1].topic == "books"
    span = records[1].spans[0]
    assert records[1].completion[span.start:span.end] == "Isaac Asimov"


@pytest.mark.parametrize("doc, message", [
    ({**GOOD, "spans": [{"start": 1, "end": 40, "label": "retrieval"}]},
     "span 0 [1, 40) ends past the completion (14 characters)"),
    ({**GOOD, "spans": [{"start": 5, "end": 5, "label": "retrieval"}]},
     "must be greater than start"),
    ({**GOOD, "spans": [{"start": 1, "end": 6, "label": "true"}]},
     "spans.0.label: Input should be 'fabrication' or 'retrieval'"),
    ({**GOOD, "spans": []}, "spans: List should have at least 1 item"),
    ({**GOOD, "spans": [{"start": 1, "end": 8, "label": "retrieval"},
                        {"start": 6, "end": 14, "label": "fabrication"}]}, "overlaps"),
    ({**GOOD, "spans": [{"start": 0, "end": 1, "label": "retrieval"}]}, "only whitespace"),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, "prompt: Field required"),
    ({**GOOD, "extra": 1}, "extra: Extra inputs are not permitted"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_invalid_lines_are_explained(doc: object, message: str) -> None:
    with pytest.raises(UserDataError) as err:
        parse_user_lines(lines(GOOD, doc), source="mine.jsonl")
    text = str(err.value)
    assert "mine.jsonl:2:" in text, text
    assert message in text, text


def test_every_bad_line_is_listed_and_duplicates_caught() -> None:
    bad = {**GOOD, "spans": [{"start": 1, "end": 99, "label": "retrieval"}]}
    with pytest.raises(UserDataError) as err:
        parse_user_lines(lines(bad, GOOD, bad, GOOD), source="f")
    text = str(err.value)
    assert text.startswith("3 invalid line(s)")
    assert "f:1:" in text and "f:3:" in text
    assert "f:4: id 'a' already used on line 2" in text


def test_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UserDataError, match="no records"):
        parse_user_lines(["", "  "], source="empty")
    with pytest.raises(UserDataError, match="cannot be read"):
        load_user_jsonl(tmp_path / "missing.jsonl")

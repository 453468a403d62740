"""The capture store: shards + index, resumable, crash-safe; the channel tap's id parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.store import CaptureManifest, CaptureRecord, CaptureStore, SpanEntry
from probes.synthetic import SYNTHETIC_MODEL
from probes.tap import request_key


def manifest(**kw) -> CaptureManifest:
    base = dict(model=SYNTHETIC_MODEL, model_dir="x", layers=[2, 4], hidden_size=16,
                served_dtype="bfloat16", source="questions", dataset_hash="abc")
    return CaptureManifest(**{**base, **kw})


def record(i: int, label: str = "fabrication") -> CaptureRecord:
    r = CaptureRecord(id=f"r{i}", source="questions", question_id=f"q{i}", topic="t",
                      domain="d", group=f"g{i}")
    r.spans = [SpanEntry(label=label, tokens=(0, 2), logprobs=[-1.0, -2.0])]  # type: ignore
    return r


def rows(i: int) -> np.ndarray:
    return np.full((3, 2, 16), i, dtype=np.float16)


def test_append_flush_reopen(tmp_path: Path) -> None:
    store = CaptureStore.create_or_resume(tmp_path / "c", manifest(), shard_rows=7)
    for i in range(5):
        store.append(record(i), [rows(i)])
    store.append(record(9, "refusal"), [None])  # no rows: indexed at once
    assert "r9" in store.done_ids()
    assert store.done_ids() >= {"r0", "r1", "r2"}  # the first shard (9 rows >= 7) is flushed
    store.close()
    again = CaptureStore.open(tmp_path / "c")
    assert again.done_ids() == {"r0", "r1", "r2", "r3", "r4", "r9"}
    for rec in again.records():
        for span in rec.spans:
            if span.has_rows:
                got = again.span_rows(rec, span)
                assert got.shape == (3, 2, 16) and (got == int(rec.id[1:])).all()


def test_unflushed_records_are_captured_again(tmp_path: Path) -> None:
    store = CaptureStore.create_or_resume(tmp_path / "c", manifest(), shard_rows=100)
    store.append(record(0), [rows(0)])
    del store  # a crash: nothing flushed
    resumed = CaptureStore.create_or_resume(tmp_path / "c", manifest())
    assert resumed.done_ids() == set()


def test_orphan_shards_are_removed(tmp_path: Path) -> None:
    store = CaptureStore.create_or_resume(tmp_path / "c", manifest(), shard_rows=1)
    store.append(record(0), [rows(0)])
    orphan = tmp_path / "c" / "shards" / "shard-00007.safetensors"
    orphan.write_bytes(b"partial")
    CaptureStore.create_or_resume(tmp_path / "c", manifest())
    assert not orphan.exists()
    assert (tmp_path / "c" / "shards" / "shard-00000.safetensors").exists()


def test_resume_refuses_a_different_capture(tmp_path: Path) -> None:
    CaptureStore.create_or_resume(tmp_path / "c", manifest())
    with pytest.raises(ValueError, match="layers"):
        CaptureStore.create_or_resume(tmp_path / "c", manifest(layers=[2, 6]))
    with pytest.raises(ValueError, match="dataset"):
        CaptureStore.create_or_resume(tmp_path / "c", manifest(dataset_hash="other"))


def test_request_key_from_engine_ids() -> None:
    assert request_key("cmpl-ldtrain-ab12-3-0-1a2b3c4d") == "ldtrain-ab12-3"
    assert request_key("cmpl-x-0-Zz09aBcD") == "x"
    assert request_key("chatcmpl-x-1a2b3c4d") is None
    assert request_key("garbage") is None

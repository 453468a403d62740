"""Hostile probe artifacts: random edits of either file are refused with a reason (never
another exception, never executed), and a sidecar process started with bad probes beside
a good one keeps running and serving, lists the good one and counts every refusal.

tests/unit/test_artifact.py covers each named defect (wrong shapes, NaN/Inf, tampered
metadata, pickle payloads) one by one; this adds random edits and the process view.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from support import health_status, scrape_metrics, start_sidecar, synthetic_probe, wait_until
from tiny_engine import probe

from detector.artifact import METADATA_FILE, TENSORS_FILE, ProbeArtifactError, load_probe
from detector.serving.client import DetectorClient

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return probe("pristine", [1, 3], "producer", 3).save(tmp_path_factory.mktemp("art") / "p")


def _copy(pristine: Path, tmp: Path) -> Path:
    out = tmp / "probe"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(pristine, out)
    return out


def _load_refused_or_valid(path: Path) -> None:
    try:
        art = load_probe(path)
    except ProbeArtifactError as exc:
        assert str(exc), "refused without a reason"
        return
    # Accepted: then it is a fully consistent probe.
    assert art.weight.shape == (art.metadata.input_dim,)
    assert torch.isfinite(art.weight).all()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8)
_keys = st.sampled_from(["format_version", "name", "layers", "hidden_size", "score_position",
                         "aggregation", "calibration", "platt_a", "platt_b", "threshold",
                         "created_at", "library_version", "training", "model", "model.name",
                         "model.fingerprint", "model.hidden_size", "model.num_layers",
                         "__class__", "code"])


@FUZZ
@given(edits=st.lists(st.tuples(_keys, _json_values | st.just(None)), min_size=1, max_size=3),
       delete=st.booleans())
def test_random_metadata_edits_are_refused_with_a_reason(pristine, tmp_path, edits,
                                                         delete) -> None:
    path = _copy(pristine, tmp_path)
    doc = json.loads((path / METADATA_FILE).read_text())
    for key, value in edits:
        target, _, leaf = key.rpartition(".")
        where = doc["model"] if target == "model" and isinstance(doc.get("model"), dict) else doc
        leaf = leaf or key
        if delete and value is None:
            where.pop(leaf, None)
        else:
            where[leaf] = value
    (path / METADATA_FILE).write_text(json.dumps(doc))
    _load_refused_or_valid(path)


@FUZZ
@given(data=st.data())
def test_random_tensor_file_edits_are_refused_with_a_reason(pristine, tmp_path, data) -> None:
    path = _copy(pristine, tmp_path)
    raw = bytearray((path / TENSORS_FILE).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "header-size"]))
        if op == "flip" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif op == "cut":
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        elif op == "insert":
            at = data.draw(st.integers(0, len(raw)))
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "header-size" and len(raw) >= 8:
            raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    (path / TENSORS_FILE).write_bytes(bytes(raw))
    _load_refused_or_valid(path)


# ------------------------------------------------------------------ a real sidecar process
class _Payload:
    """Unpickling this creates a file: proof of code execution if it ever happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_probes(good: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Each bad artifact, and a word its refusal must contain."""
    bad: dict[str, tuple[Path, str]] = {}

    def variant(name: str) -> Path:
        out = root / name
        shutil.copytree(good, out)
        meta = json.loads((out / METADATA_FILE).read_text())
        meta["name"] = name
        (out / METADATA_FILE).write_text(json.dumps(meta))
        return out

    p = variant("nan-weights")
    tensors = load_probe(good).tensors()
    tensors["weight"] = tensors["weight"].clone()
    tensors["weight"][7] = float("nan")
    save_file(tensors, str(p / TENSORS_FILE))
    bad["nan-weights"] = (p, "NaN")

    p = variant("tampered-hidden")
    meta = json.loads((p / METADATA_FILE).read_text())
    meta["hidden_size"] = meta["model"]["hidden_size"] = meta["hidden_size"] * 2
    (p / METADATA_FILE).write_text(json.dumps(meta))
    bad["tampered-hidden"] = (p, "hidden size")

    p = variant("other-model")
    meta = json.loads((p / METADATA_FILE).read_text())
    meta["model"]["fingerprint"] = "0" * 16
    (p / METADATA_FILE).write_text(json.dumps(meta))
    bad["other-model"] = (p, "fingerprint")

    p = variant("extra-key")
    meta = json.loads((p / METADATA_FILE).read_text())
    meta["loader"] = "pickle"
    (p / METADATA_FILE).write_text(json.dumps(meta))
    bad["extra-key"] = (p, "loader")

    p = variant("truncated")
    data = (p / TENSORS_FILE).read_bytes()
    (p / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    bad["truncated"] = (p, "truncated")

    p = root / "pickle-only"
    p.mkdir()
    (p / "probe.pkl").write_bytes(pickle.dumps(_Payload(root / "pwned")))
    (p / "probe.pt").write_bytes(pickle.dumps(_Payload(root / "pwned")))
    bad["pickle-only"] = (p, "missing")
    return bad


def test_sidecar_with_bad_probes_keeps_serving(model_dir, tmp_path) -> None:
    good = synthetic_probe(model_dir, tmp_path / "good", name="good")
    bad = _bad_probes(good, tmp_path)
    sidecar = start_sidecar(f"ipc://{tmp_path}/ch.sock", tmp_path / "sc",
                            probes=[good, *(p for p, _ in bad.values())], model_dir=model_dir)
    try:
        assert sidecar.proc.poll() is None
        for service in ("", "liedetector.v1.Detector"):
            assert health_status(sidecar.grpc_address, service) == \
                health_pb2.HealthCheckResponse.SERVING
        with DetectorClient(sidecar.grpc_address) as client:
            probes = client.list_probes().probes
        assert [p.name for p in probes] == ["good"]
        # Housekeeping publishes the count once a second.
        wait_until(lambda: scrape_metrics(sidecar.metrics_port).get(
            "lie_detector_probe_load_failures_total") == len(bad), 20,
            what="probe_load_failures_total")
        log = sidecar.log_path.read_text(errors="replace")
        for name, (path, reason) in bad.items():
            lines = [ln for ln in log.splitlines() if f"probe {path} refused" in ln]
            assert lines, f"{name}: no refusal logged"
            assert reason in lines[0], f"{name}: {lines[0]}"
        assert not (tmp_path / "pwned").exists()
        assert "Traceback" not in log
    finally:
        sidecar.stop()
    assert sidecar.proc.returncode == 0

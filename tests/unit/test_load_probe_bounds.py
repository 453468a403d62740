"""LoadProbe against hostile files and paths, through a real in-process gRPC sidecar (issue 23,
finding 4): a probe.json of millions of ``[]`` is refused from its bytes, before json builds
an object of it, and the sidecar keeps answering; a caller holding the admin token loads only
from the probe roots, whatever symlinks or ``..`` the path holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import start_inprocess_sidecar

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.artifact import (
    MAX_METADATA_BYTES,
    METADATA_FILE,
    TENSORS_FILE,
    ProbeArtifact,
    ProbeMetadata,
)
from detector.model_identity import ModelIdentity
from detector.sidecar.app import SidecarSettings

TOKEN = "s3cret"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
MODEL = ModelIdentity(name="tiny", fingerprint="0123456789abcdef", hidden_size=8, num_layers=6)


def _probe(directory: Path, name: str = "good") -> Path:
    meta = ProbeMetadata(name=name, model=MODEL, layers=[2], hidden_size=8,
                         score_position="own", calibration="none", threshold=0.5)
    return ProbeArtifact(metadata=meta, weight=torch.ones(8), bias=torch.zeros(1)).save(directory)


def _padded(directory: Path, size: int) -> Path:
    """A valid probe whose free-form ``training`` record is ``size`` bytes of ``[],[],...``:
    the shape of issue 23's file (16 MiB took 50 s and GiBs to refuse)."""
    _probe(directory, directory.name)
    text = (directory / METADATA_FILE).read_text().rstrip()
    doc = json.loads(text)
    doc.pop("training")
    head = json.dumps(doc)[:-1] + ', "training": {"x": ['
    pairs = (size - len(head)) // 3
    (directory / METADATA_FILE).write_text(head + "[]," * pairs + "[]]}}")
    return directory


def _load(stub, path: str | Path, replace: bool = False) -> tuple[grpc.StatusCode, str]:
    try:
        stub.LoadProbe(pb.LoadProbeRequest(path=str(path), replace=replace), timeout=30,
                       metadata=ADMIN)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "probes"


@pytest.fixture
def stub(tmp_path: Path, root: Path):
    _probe(root / "good")
    sidecar = start_inprocess_sidecar(tmp_path, admin_token=TOKEN, probe_roots=[root])
    try:
        with grpc.insecure_channel(sidecar.settings.grpc_address) as ch:
            yield pb_grpc.DetectorStub(ch), health_pb2_grpc.HealthStub(ch)
    finally:
        sidecar.stop()


def test_hostile_probe_json_is_refused_from_its_bytes(stub, root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    detector, health = stub
    assert _load(detector, root / "good")[0] == grpc.StatusCode.OK
    hostile = {
        "reported": _padded(root / "reported", (16 << 20) - 4096),  # as issue 23 sent it
        "under-limit": _padded(root / "under-limit", MAX_METADATA_BYTES - 4096),
        "deep": _padded(root / "deep", 1024),
    }
    (hostile["deep"] / METADATA_FILE).write_text('{"x": ' + "[" * 300_000 + "]" * 300_000 + "}")
    parsed: list[int] = []
    real_loads = json.loads

    def spy(raw, *args, **kwargs):
        parsed.append(len(raw))
        return real_loads(raw, *args, **kwargs)

    monkeypatch.setattr(json, "loads", spy)
    for name, path in hostile.items():
        code, details = _load(detector, path)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert details.startswith(str(path / METADATA_FILE)), details
        assert ("larger than the" in details or "arrays and objects" in details), details
    # Nothing hostile reached a JSON parser (the good probe's files are a few KiB).
    assert all(n < 16_384 for n in parsed), parsed
    check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert [p.name for p in detector.ListProbes(pb.ListProbesRequest(), timeout=5).probes] == \
        ["good"]
    assert _load(detector, root / "good", replace=True)[0] == grpc.StatusCode.OK


def test_load_probe_reads_only_under_the_probe_roots(stub, tmp_path: Path, root: Path) -> None:
    detector, _ = stub
    outside = _probe(tmp_path / "outside" / "evil", "evil")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    mixed = _probe(root / "mixed", "evil")  # its own tensors, the outside metadata
    (mixed / METADATA_FILE).unlink()
    (mixed / METADATA_FILE).symlink_to(outside / METADATA_FILE)
    refused = [outside, outside / METADATA_FILE, root / ".." / "outside" / "evil",
               root / "linked", root / "linked" / TENSORS_FILE, mixed, "/etc", "/proc/self",
               os.path.relpath(outside)]
    for path in refused:
        code, details = _load(detector, path)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (path, code, details)
        assert "outside the folders probes may be loaded from" in details
        assert str(root) in details and "LIE_DETECTOR_PROBE_ROOTS" in details
    code, details = _load(detector, "bad\x00path")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a usable path" in details
    assert detector.ListProbes(pb.ListProbesRequest(), timeout=5).probes == []
    # Inside the root, by any spelling.
    assert _load(detector, root / "good" / METADATA_FILE)[0] == grpc.StatusCode.OK
    assert _load(detector, root / "mixed" / ".." / "good", replace=True)[0] == \
        grpc.StatusCode.OK
    listed = detector.ListProbes(pb.ListProbesRequest(), timeout=5).probes
    assert [(p.name, p.path) for p in listed] == [("good", str((root / "good").resolve()))]


def test_probe_roots_default_to_the_folders_of_the_started_probes(tmp_path: Path) -> None:
    a, b = _probe(tmp_path / "a" / "p1", "p1"), _probe(tmp_path / "b" / "p2", "p2")
    settings = SidecarSettings(probes=[a, b, tmp_path / "a" / ".." / "a" / "p1"])
    assert settings.load_probe_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert SidecarSettings(probes=[a], probe_roots=[]).load_probe_roots == []
    assert SidecarSettings(probes=[], probe_roots=[b]).load_probe_roots == [b]

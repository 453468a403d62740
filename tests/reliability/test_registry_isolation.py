"""A probe that cannot be scored never takes the others down.

The artifact checks refuse every known way a probe can break the fused scorer; this covers
the ones nobody has thought of yet: whatever the scorer raises while a new probe is added,
the load is refused with the reason and counted, the probes already loaded keep scoring, and
later loads still work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_engine import MODEL, engine, probe

from detector.artifact import ProbeArtifactError
from detector.sidecar import registry as registry_module
from detector.sidecar.registry import ProbeRegistry


def test_a_probe_the_scorer_cannot_build_is_refused_and_the_others_keep_scoring(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = ProbeRegistry(served=MODEL, device=torch.device("cpu"))
    reg.attach_engine(engine())
    reg.load(probe("good", [1, 3], "producer", 1).save(tmp_path / "good"))
    real = registry_module.FusedProbeScorer

    def fragile(probes, **kwargs):
        if any(p.metadata.name == "boom" for p in probes):
            raise RuntimeError("cannot fuse this one")
        return real(probes, **kwargs)

    monkeypatch.setattr(registry_module, "FusedProbeScorer", fragile)
    with pytest.raises(ProbeArtifactError, match="'boom' cannot be scored: RuntimeError"):
        reg.load(probe("boom", [3], "own", 2).save(tmp_path / "boom"))
    assert reg.load_failures == 1
    assert [p.artifact.name for p in reg.probes()] == ["good"]
    active = reg.active()
    assert active is not None and active.columns.names == ("good",)
    # Replacing a loaded probe with one that fails keeps the old one.
    with pytest.raises(ProbeArtifactError):
        reg.load(probe("boom", [3], "own", 3).save(tmp_path / "boom2"))
    reg.load(probe("other", [3], "own", 4).save(tmp_path / "other"))
    assert reg.active().columns.names == ("good", "other")

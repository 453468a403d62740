"""The loaded probes, checked against the engine they score, fused into one scorer.

Probes can be loaded and unloaded while vLLM runs. A probe that does not fit the served
model (other fingerprint, hidden size or layer count) is refused; one whose layers the
engine does not capture is kept but inactive, with the reason, until an engine that
captures them connects. An engine whose plugin switched capture off says why (a
``CaptureStatus``); until an engine that captures is heard from, that reason is every
probe's inactive reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from detector.artifact import (
    ProbeArtifact,
    ProbeArtifactError,
    ProbeMetadata,
    ProbeMismatchError,
    check_compatible,
    load_probe,
)
from detector.channel.wire import CaptureStatus, EngineInfo
from detector.model_identity import ModelIdentity
from detector.sidecar.scorer import FusedProbeScorer, default_device
from detector.sidecar.scores import ProbeColumns, columns_for
from detector.verdict import VerdictModel

logger = logging.getLogger(__name__)

NO_ENGINE_YET = ("no vLLM engine heard from yet: the probe scores once the in-engine hook "
                 "connects to this sidecar's channel")


@dataclass(frozen=True, slots=True)
class HeardCapture:
    """What the sidecar last heard about capture: an engine that captures (``engine``), or
    one that switched capture off (``off``); neither until an engine is heard from."""

    engine: EngineInfo | None = None
    off: CaptureStatus | None = None
    heard_at: float = 0.0  # time.monotonic() of the status, for an engine that is off
    stale: bool = False  # an engine that is off, not heard from within the hook timeout

    def summary(self) -> str:
        """One line for people; empty while nothing was heard."""
        if self.off is not None:
            if self.stale:
                return f"no vLLM engine heard from since one said: {self.off.summary()}"
            return self.off.summary()
        if self.engine is not None:
            return (f"capture is ON in vLLM (pid {self.engine.pid}): layers "
                    f"{self.engine.layers} via {self.engine.capture_method}")
        return ""


@dataclass(slots=True)
class LoadedProbe:
    artifact: ProbeArtifact
    path: str
    inactive_reason: str = ""


@dataclass(slots=True)
class ActiveScorer:
    """An immutable pairing of a fused scorer with the columns it produces."""

    scorer: FusedProbeScorer
    columns: ProbeColumns
    engine_id: str


class ProbeRegistry:
    def __init__(self, *, served: ModelIdentity | None = None,
                 device: torch.device | None = None, target_fpr: float | None = None) -> None:
        self.served = served  # known up front when the sidecar is given the model folder
        self.device = device or default_device()
        # The operator's false-flag rate for probes with a verdict model (None: each
        # probe's shipped operating point); see detector.verdict.
        if target_fpr is not None and not 0.0 < target_fpr < 1.0:
            raise ValueError(f"target false-flag rate must be in (0, 1), got {target_fpr}")
        self.target_fpr = target_fpr
        self._probes: dict[str, LoadedProbe] = {}
        self._engine: EngineInfo | None = None
        # The last engine heard from switched capture off (``off``), when, and whether it
        # fell silent since; ``engine`` is never set here (it is ``_engine``).
        self._off = HeardCapture()
        self._active: ActiveScorer | None = None
        self._lock = threading.Lock()
        self.load_failures = 0
        # Called with the new columns (or None) whenever the set of scoring probes changes.
        self.on_change: list[Callable[[ProbeColumns | None], None]] = []

    # ----------------------------------------------------------------- probes
    def load(self, path: str | Path, *, replace: bool = False) -> LoadedProbe:
        """Load and check an artifact; raises ``ProbeArtifactError`` with the reason."""
        try:
            try:
                artifact = load_probe(path)
            except OSError as exc:  # a path the OS refuses (name too long, no permission...)
                raise ProbeArtifactError(f"{str(path)[:300]}: cannot be read: "
                                         f"{exc.strerror or exc}") from None
            with self._lock:
                name = artifact.metadata.name
                if name in self._probes and not replace:
                    raise ProbeArtifactError(f"a probe named {name!r} is already loaded")
                served = self._served_identity()
                if served is not None:
                    layers = self._engine.layers if self._engine else artifact.metadata.layers
                    check_compatible(artifact.metadata, served, layers)
                loaded = LoadedProbe(artifact, str(path))
                previous = self._probes.get(name)
                self._probes[name] = loaded
                try:
                    self._rebuild()
                except Exception as exc:  # whatever it is, the probes already loaded keep scoring
                    if previous is None:
                        del self._probes[name]
                    else:
                        self._probes[name] = previous
                    self._rebuild()
                    raise ProbeArtifactError(f"probe {name!r} cannot be scored: "
                                             f"{type(exc).__name__}: {exc}") from None
        except ProbeArtifactError:
            self.load_failures += 1
            raise
        logger.info("probe %s loaded from %s%s", name, path,
                    f" (inactive: {loaded.inactive_reason})" if loaded.inactive_reason else "")
        return loaded

    def unload(self, name: str) -> bool:
        with self._lock:
            if self._probes.pop(name, None) is None:
                return False
            self._rebuild()
        logger.info("probe %s unloaded", name)
        return True

    def probes(self) -> list[LoadedProbe]:
        with self._lock:
            return list(self._probes.values())

    # ----------------------------------------------------------------- engine
    def attach_engine(self, engine: EngineInfo) -> None:
        """Called for every message; rebuilds only when the engine changes.

        The whole description is compared, not just the id: rows must always be read with
        the layers, hidden size and dtype their own message declares."""
        current = self._engine
        if current is not None and (current is engine or current == engine):
            return
        with self._lock:
            self._engine = engine
            self._off = HeardCapture()
            logger.info("engine %s connected: %s, layers %s, %s via %s", engine.engine_id[:8],
                        engine.model, engine.layers, engine.dtype, engine.capture_method)
            self._rebuild()

    def capture_off(self, status: CaptureStatus) -> EngineInfo | None:
        """An engine says capture is off (repeated every heartbeat): its reason becomes every
        probe's inactive reason, and the engine that captured before, if any, is detached
        (returned, so its running requests can be ended)."""
        with self._lock:
            previous = self._engine
            said = self._off.off
            known = said is not None and not self._off.stale and (
                said.engine_id, said.reason) == (status.engine_id, status.reason)
            self._off = HeardCapture(off=status, heard_at=time.monotonic())
            if known and previous is None:
                return None
            self._engine = None
            logger.error("%s", status.summary())
            self._rebuild()
        return previous

    def expire_capture_off(self, timeout_s: float) -> None:
        """An engine that said capture is off and then fell silent (vLLM stopped): say so."""
        with self._lock:
            said = self._off.off
            if (said is None or self._off.stale
                    or time.monotonic() - self._off.heard_at < timeout_s):
                return
            self._off = replace(self._off, stale=True)
            logger.warning("the vLLM engine that reported capture OFF (pid %d) fell silent",
                           said.pid)
            self._rebuild()

    def capture(self) -> HeardCapture:
        """What was last heard about capture."""
        with self._lock:
            return replace(self._off, engine=self._engine)

    @property
    def engine(self) -> EngineInfo | None:
        return self._engine

    def active(self) -> ActiveScorer | None:
        return self._active

    def _served_identity(self) -> ModelIdentity | None:
        engine = self._engine
        if engine is None:
            return self.served
        fingerprint = engine.fingerprint or (self.served.fingerprint if self.served else None)
        if fingerprint is None:
            return None
        return ModelIdentity(name=engine.model, fingerprint=fingerprint,
                             hidden_size=engine.hidden_size, num_layers=engine.num_layers)

    def _rebuild(self) -> None:
        engine = self._engine
        if engine is None:
            # Nothing scores until the hook is heard from: ListProbes must not report a
            # probe as active while every step would still be dropped.
            reason = self._off.summary() or NO_ENGINE_YET
            for loaded in self._probes.values():
                loaded.inactive_reason = reason
            self._active = None
            self._notify()
            return
        served = self._served_identity()
        usable: list[ProbeArtifact] = []
        for loaded in self._probes.values():
            try:
                if served is None:
                    raise ProbeMismatchError(
                        "the engine's model has no fingerprint (not a local folder) and the "
                        "sidecar was not given --model to identify it")
                check_compatible(loaded.artifact.metadata, served, engine.layers)
            except ProbeMismatchError as exc:
                if loaded.inactive_reason != str(exc):
                    logger.warning("probe %s inactive: %s", loaded.artifact.metadata.name, exc)
                loaded.inactive_reason = str(exc)
                continue
            loaded.inactive_reason = ""
            usable.append(loaded.artifact)
            trained = loaded.artifact.metadata.training.get("served_dtype")
            if trained and trained != engine.dtype:
                logger.warning("probe %s was trained on %s rows but the engine serves %s: "
                               "scores may drift; start vLLM with --dtype %s",
                               loaded.artifact.metadata.name, trained, engine.dtype, trained)
        scorer = FusedProbeScorer(usable, captured_layers=engine.layers,
                                  hidden_size=engine.hidden_size, device=self.device)
        absent = [f for f in scorer.token_features if f not in engine.token_features]
        if absent:
            logger.warning("hybrid probes read token features %s that the engine does not "
                           "compute: their tokens stay unscored; start vLLM with "
                           "LIE_DETECTOR_TOKEN_FEATURES=%s (lie-detector serve sets it)",
                           absent, ",".join(scorer.token_features))
        metas = [a.metadata for a in usable]
        columns = columns_for([m.name for m in metas], [m.score_position for m in metas],
                              [m.threshold for m in metas], [m.aggregation for m in metas],
                              [self._verdict(m) for m in metas])
        self._active = ActiveScorer(scorer, columns, engine.engine_id)
        self._notify()

    def _verdict(self, meta: ProbeMetadata) -> tuple[VerdictModel, float] | None:
        """A probe's verdict model and its threshold at the operator's target rate."""
        if meta.verdict is None:
            return None
        return meta.verdict, meta.verdict.threshold_for(self.target_fpr)

    def _notify(self) -> None:
        columns = self._active.columns if self._active else None
        for callback in self.on_change:
            callback(columns)

"""A linear probe on residual-stream rows: standardise, logistic regression, calibrate.

Linear because the sidecar folds every probe into one GEMM (see
``detector.sidecar.scorer``); calibrated because the artifact's threshold is a
probability, and class-balanced logistic regression's raw sigmoid is not one (balancing
shifts it toward 0.5), so a separate calibration map restores meaningful probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from detector.artifact import ProbeArtifact, ProbeArtifactError, ProbeMetadata, _describe
from detector.model_identity import ModelIdentity
from detector.verdict import VerdictModel

logger = logging.getLogger(__name__)

Calibration = Literal["none", "platt", "isotonic"]


def fit_platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling ``p = sigmoid(a*z + b)`` by maximum likelihood on smoothed targets.

    Platt's targets ``(n+ + 1)/(n+ + 2)`` and ``1/(n- + 2)`` instead of 1 and 0 keep ``a``
    finite when the logits separate the classes perfectly (the training-data fallback).
    """
    z = np.asarray(z, dtype=np.float64).ravel()
    y = np.asarray(y).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        s = params[0] * z + params[1]
        g = expit(s) - t
        return float(np.sum(np.logaddexp(0.0, s) - t * s)), np.array([g @ z, g.sum()])

    x0 = np.array([1.0, np.log((n_pos + 1.0) / (n_neg + 1.0))])
    res = minimize(loss, x0, jac=True, method="L-BFGS-B")
    if not res.success:
        logger.warning("Platt calibration did not fully converge: %s", res.message)
    return float(res.x[0]), float(res.x[1])


def threshold_for_fpr(scores_neg: Sequence[float] | np.ndarray, fpr: float) -> float:
    """The smallest threshold flagging (``score >= threshold``) at most ``fpr`` of negatives.

    Scores are compared in float32 by the sidecar, so the threshold is the next float32
    above the highest negative score that must stay unflagged (ties stay unflagged too).
    """
    s = np.asarray(scores_neg, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("threshold_for_fpr needs at least one negative score")
    if not np.isfinite(s).all():
        raise ValueError("scores_neg contains NaN/Inf")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    s = np.sort(s)[::-1]
    allowed = int(np.floor(fpr * s.size + 1e-9))  # negatives that may be flagged
    if allowed >= s.size:
        return float(np.float32(s[-1]))
    keep = np.float32(s[allowed])  # the highest score that must not be flagged
    return float(np.nextafter(keep, np.float32(np.inf)))


class LinearProbe(ClassifierMixin, BaseEstimator):
    """StandardScaler + LogisticRegression + calibration, exportable as a probe artifact.

    Learned attributes (scikit-learn shapes): ``coef_`` (1, n_features) and
    ``intercept_`` (1,) on standardised features, ``mean_``/``scale_`` (n_features,),
    ``platt_a_``/``platt_b_`` (None unless ``calibration="platt"``),
    ``isotonic_x_``/``isotonic_y_`` (None unless ``calibration="isotonic"``), ``classes_``.
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        max_iter: int = 1000,
        calibration: Calibration = "platt",
        class_weight: str | dict | None = "balanced",
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.calibration = calibration
        self.class_weight = class_weight

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        X_cal: np.ndarray | None = None,
        y_cal: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
    ) -> LinearProbe:
        """Fit on (X, y); calibrate on (X_cal, y_cal) when given, else on the training logits.

        Calibrating on the training logits is optimistic (they are overfit), so pass a
        held-out calibration split when the data allows it. ``sample_weight`` (optional,
        one per row) weights the logistic regression, e.g. so that every labelled span
        counts once however many tokens it has; it multiplies ``class_weight``.
        """
        if self.calibration not in ("none", "platt", "isotonic"):
            raise ValueError(f"calibration must be none|platt|isotonic, got {self.calibration!r}")
        X, y = check_X_y(X, y, dtype=[np.float64, np.float32])
        self.classes_ = np.unique(y)
        if self.classes_.size != 2:
            raise ValueError(f"LinearProbe needs exactly two classes, got {self.classes_.tolist()}")
        self.n_features_in_ = X.shape[1]
        y01 = (y == self.classes_[1]).astype(np.int64)

        scaler = StandardScaler().fit(X)
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = np.asarray(scaler.scale_, dtype=np.float64)  # constant features -> 1
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64).ravel()
            if sample_weight.shape != (X.shape[0],):
                raise ValueError(f"sample_weight has shape {sample_weight.shape}, expected "
                                 f"({X.shape[0]},)")
        clf.fit(scaler.transform(X), y01, sample_weight=sample_weight)
        self.coef_ = np.asarray(clf.coef_, dtype=np.float64)
        self.intercept_ = np.asarray(clf.intercept_, dtype=np.float64)

        if (X_cal is None) != (y_cal is None):
            raise ValueError("pass both X_cal and y_cal, or neither")
        if X_cal is not None:
            X_cal, y_cal = check_X_y(X_cal, y_cal, dtype=[np.float64, np.float32])
            unknown = set(np.unique(y_cal)) - set(self.classes_)
            if unknown:
                raise ValueError(f"y_cal has labels {sorted(unknown)} unseen in y")
            z_cal, t_cal = self.decision_function(X_cal), (y_cal == self.classes_[1])
        else:
            if self.calibration != "none":
                logger.info("no calibration split given; calibrating on the training logits")
            z_cal, t_cal = self.decision_function(X), y01.astype(bool)

        self._fit_calibration(z_cal, t_cal)
        return self

    def recalibrate(self, z: np.ndarray, y: np.ndarray) -> LinearProbe:
        """Refit only the calibration map (``self.calibration``) on given logits.

        For calibrating on something other than token rows, e.g. span scores (the max of
        a span's token logits) from out-of-fold models: calibration maps are increasing,
        so calibrating the max logit calibrates the max token probability too.
        ``y`` holds labels from ``classes_`` (or booleans: True = ``classes_[1]``).
        """
        check_is_fitted(self, "coef_")
        z = np.asarray(z, dtype=np.float64).ravel()
        y = np.asarray(y).ravel()
        if z.shape != y.shape or z.size == 0:
            raise ValueError(f"z {z.shape} and y {y.shape} must be non-empty and the same length")
        t = y if y.dtype == bool else (y == self.classes_[1])
        self._fit_calibration(z, t.astype(bool))
        return self

    def _fit_calibration(self, z_cal: np.ndarray, t_cal: np.ndarray) -> None:
        self.platt_a_ = self.platt_b_ = None
        self.isotonic_x_ = self.isotonic_y_ = None
        if self.calibration == "platt":
            self.platt_a_, self.platt_b_ = fit_platt(z_cal, t_cal)
        elif self.calibration == "isotonic":
            # Fit on float32-exact logits so the knots stay distinct once stored as float32.
            z32 = z_cal.astype(np.float32).astype(np.float64)
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            iso.fit(z32, t_cal.astype(np.float64))
            self.isotonic_x_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
            self.isotonic_y_ = np.asarray(iso.y_thresholds_, dtype=np.float64)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """The probe's logit ``((x - mean) / scale) . coef + intercept``, shape (n,)."""
        check_is_fitted(self, "coef_")
        X = check_array(X, dtype=[np.float64, np.float32])
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the probe expects {self.n_features_in_}")
        return ((X - self.mean_) / self.scale_) @ self.coef_[0] + self.intercept_[0]

    def calibrate(self, z: np.ndarray) -> np.ndarray:
        """Map logits to calibrated probabilities of the positive class."""
        z = np.asarray(z, dtype=np.float64)
        if self.calibration == "platt":
            return expit(self.platt_a_ * z + self.platt_b_)
        if self.calibration == "isotonic":
            return np.interp(z, self.isotonic_x_, self.isotonic_y_)
        return expit(z)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, 2): probabilities of ``classes_[0]`` and ``classes_[1]`` (the flagged class)."""
        p = self.calibrate(self.decision_function(X))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]

    def to_artifact(
        self,
        *,
        name: str,
        model: ModelIdentity,
        layers: Sequence[int],
        score_position: Literal["producer", "own"] = "producer",
        threshold: float = 0.5,
        training: dict[str, Any] | None = None,
        token_features: Sequence[str] = (),
        verdict: VerdictModel | None = None,
    ) -> ProbeArtifact:
        """Export for the sidecar; features must be ``layers``' rows concatenated in order,
        then, for a hybrid probe, one column per ``token_features`` name in that order
        (``SpanTable.features`` with ``token_features`` set; ``probes.hybrid``)."""
        check_is_fitted(self, "coef_")
        layers = [int(k) for k in layers]
        token_features = list(token_features)
        expected = len(layers) * model.hidden_size + len(token_features)
        if self.n_features_in_ != expected:
            extra = f" + {len(token_features)} token features" if token_features else ""
            raise ProbeArtifactError(
                f"probe {name!r} was fitted on {self.n_features_in_} features but "
                f"{len(layers)} layers x hidden size {model.hidden_size}{extra} = {expected}"
            )
        info = dict(training or {})
        info.setdefault(
            "estimator",
            {
                "type": f"{type(self).__module__}.{type(self).__qualname__}",
                "C": float(self.C),
                "max_iter": int(self.max_iter),
                "calibration": self.calibration,
                "class_weight": (
                    self.class_weight
                    if self.class_weight is None or isinstance(self.class_weight, str)
                    else {str(k): float(v) for k, v in self.class_weight.items()}
                ),
                "classes": [c.item() if hasattr(c, "item") else c for c in self.classes_],
            },
        )
        try:
            metadata = ProbeMetadata(
                name=name,
                model=model,
                layers=layers,
                hidden_size=model.hidden_size,
                score_position=score_position,
                calibration=self.calibration,
                platt_a=self.platt_a_,
                platt_b=self.platt_b_,
                threshold=threshold,
                training=info,
                token_features=token_features,
                verdict=verdict,
            )
        except ValidationError as exc:
            raise ProbeArtifactError(f"probe {name!r}: invalid metadata: {_describe(exc)}") from None

        def f32(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float32).copy())

        return ProbeArtifact(
            metadata=metadata,
            weight=f32(self.coef_[0]),
            bias=f32(self.intercept_[:1]),
            mean=f32(self.mean_),
            scale=f32(self.scale_),
            isotonic_x=f32(self.isotonic_x_),
            isotonic_y=f32(self.isotonic_y_),
        )


__all__ = ["LinearProbe", "fit_platt", "threshold_for_fpr"]

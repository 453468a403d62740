"""Score every captured token with every loaded probe in one matrix product.

Why one block matrix rather than one matmul per probe (and per layer)
--------------------------------------------------------------------
Each engine step delivers rows ``(n_captured_layers, n_tokens, hidden)``. With a handful
of probes the product ``(n_tokens, L*H) @ (L*H, n_probes)`` is memory-bound: its cost is
reading the activations once. Per-probe matmuls would read the activations once per
probe (and launch one small kernel per probe and layer, which on a GPU costs more than
the arithmetic), so the step's scoring time would grow with the number of probes. The
block matrix ``W`` puts each probe's folded weights in the rows of its own layers and
zeros elsewhere, so all probes and layers are one GEMM whose time barely depends on how
many probes are loaded.

The trade-off: when probes read few of many captured layers, ``W`` is mostly zeros and
the GEMM multiplies them anyway (``L*H*n_probes`` multiply-adds per token instead of
``sum(len(probe.layers))*H``). Since the product is bandwidth-bound on the activations
this costs little compute; the real waste is capturing and shipping layers no probe
reads, which is fixed by capturing fewer layers (``LIE_DETECTOR_LAYERS``), not by
splitting the GEMM. :attr:`FusedProbeScorer.unused_layers` reports such layers.

Hybrid probes (``token_features`` in their metadata) also read the scored token's
log-probability and entropy. Those few columns are added after the GEMM
(``features @ W_f``, only into hybrid probes' logits), so the GEMM over the rows stays one
and pure probes' logits are the GEMM's output unchanged. A hybrid probe whose features are
missing for a token gets a NaN logit and probability there: the token stays unscored.

Drift (:mod:`detector.drift`): a probe that ships a summary of its training rows adds
``k + 1`` columns to the same GEMM (its principal directions and its mean, in the rows of
its layers), so ``x . v_i`` and ``x . mean`` come out of the one product; with each
captured layer's ``|x|^2`` (one reduction over the rows, shared by all probes) that gives
T^2 and the residual energy of every row for every such probe.
:meth:`FusedProbeScorer.logits_and_drift` returns, beside the logits, whether each row lies
outside each probe's summary (NaN for probes without one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from detector.artifact import (
    ProbeArtifact,
    ProbeArtifactError,
    ProbeMismatchError,
    check_compatible,
    folded_linear,
    linear_token_features,
)
from detector.model_identity import ModelIdentity

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FusedProbeScorer:
    """All loaded probes as one block weight matrix over the captured layers.

    ``logits(rows)`` -> ``(n_tokens, n_probes)`` logits; ``probabilities(logits)`` applies
    each probe's own calibration; ``thresholds`` are on the calibrated probability.
    """

    def __init__(
        self,
        probes: Sequence[ProbeArtifact],
        *,
        captured_layers: Sequence[int],
        hidden_size: int,
        device: torch.device | str | None = None,
        model: ModelIdentity | None = None,
    ) -> None:
        """``model``, when given, is checked against every probe (:func:`check_compatible`)."""
        self.captured_layers = [int(k) for k in captured_layers]
        if self.captured_layers != sorted(set(self.captured_layers)):
            raise ValueError(
                f"captured_layers must be sorted and unique, got {self.captured_layers}"
            )
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.hidden_size = int(hidden_size)
        self.device = torch.device(device) if device is not None else default_device()
        probes = list(probes)

        names = [p.name for p in probes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ProbeArtifactError(f"probe names must be unique; duplicated: {dupes}")

        n_layers, h = len(self.captured_layers), self.hidden_size
        position = {k: i for i, k in enumerate(self.captured_layers)}
        weight = torch.zeros(n_layers * h, len(probes), dtype=torch.float32)
        bias = torch.zeros(len(probes), dtype=torch.float32)
        platt_a = torch.ones(len(probes), dtype=torch.float32)
        platt_b = torch.zeros(len(probes), dtype=torch.float32)
        # Token features: one row per feature any probe reads (canonical order).
        self.token_features = linear_token_features([p.metadata for p in probes])
        n_feat = len(self.token_features)
        feat_weight = torch.zeros(n_feat, len(probes), dtype=torch.float32)
        feat_used = torch.zeros(n_feat, len(probes), dtype=torch.float32)
        hybrid: dict[str, list[int]] = {"own": [], "producer": []}
        for j, probe in enumerate(probes):
            meta = probe.metadata
            if model is not None:
                check_compatible(meta, model, self.captured_layers)
            if meta.hidden_size != h:
                raise ProbeMismatchError(
                    f"probe {meta.name!r} has hidden size {meta.hidden_size}, "
                    f"the captured rows have {h}"
                )
            missing = [k for k in meta.layers if k not in position]
            if missing:
                raise ProbeMismatchError(
                    f"probe {meta.name!r} reads layers {missing} that are not captured "
                    f"(captured: {self.captured_layers}); set LIE_DETECTOR_LAYERS to include them"
                )
            w, b = folded_linear(probe)
            for i, k in enumerate(meta.layers):
                c = position[k]
                weight[c * h : (c + 1) * h, j] = w[i * h : (i + 1) * h]
            bias[j] = b
            for i, name in enumerate(meta.token_features):
                f = self.token_features.index(name)
                feat_weight[f, j] = w[meta.hidden_dim + i]
                feat_used[f, j] = 1.0
            if meta.token_features:
                hybrid[meta.score_position].append(j)
            if meta.calibration == "platt":
                platt_a[j], platt_b[j] = float(meta.platt_a), float(meta.platt_b)

        self._probes = probes
        drift_weight = self._init_drift(probes, position)
        self._gemm_weight = torch.cat([weight, drift_weight], 1).to(self.device)
        self._gemm_bias = torch.cat([bias, torch.zeros(drift_weight.shape[1])]).to(self.device)
        self._weight = self._gemm_weight[:, : len(probes)]
        self._bias = bias.to(self.device)
        self._platt_a = platt_a.to(self.device)
        self._platt_b = platt_b.to(self.device)
        self._feat_weight = feat_weight.to(self.device)
        self._feat_used = feat_used.to(self.device)
        self._hybrid = {
            pos: torch.tensor(cols, dtype=torch.long, device=self.device)
            for pos, cols in hybrid.items() if cols
        }
        self._thresholds = torch.tensor(
            [p.metadata.threshold for p in probes], dtype=torch.float32, device=self.device
        )
        self._init_isotonic(probes)
        used = {k for p in probes for k in p.metadata.layers}
        self.unused_layers = [k for k in self.captured_layers if k not in used]
        if probes and self.unused_layers:
            logger.info("captured layers %s are read by no probe", self.unused_layers)

    def _init_drift(self, probes: list[ProbeArtifact], position: dict[int, int]
                    ) -> torch.Tensor:
        """The drift columns of the GEMM (every summary's directions, then every summary's
        mean) and the constants that turn their products into T^2 and residual energy."""
        h, n_layers = self.hidden_size, len(self.captured_layers)
        cols = [j for j, p in enumerate(probes) if p.metadata.drift is not None]
        ks = [probes[j].metadata.drift.components for j in cols]  # type: ignore[union-attr]
        n_dir = sum(ks)
        weight = torch.zeros(n_layers * h, n_dir + len(cols), dtype=torch.float32)
        offset_c = torch.zeros(n_dir, dtype=torch.float64)  # v_i . mean
        inv_std = torch.zeros(n_dir, dtype=torch.float64)
        group = torch.zeros(n_dir, len(cols), dtype=torch.float64)  # direction -> probe
        layer_sel = torch.zeros(n_layers, len(cols), dtype=torch.float64)  # layer -> probe
        mean_sq = torch.zeros(len(cols), dtype=torch.float64)
        limits = torch.zeros(2, len(cols), dtype=torch.float64)
        d0 = 0
        for c, (j, k) in enumerate(zip(cols, ks)):
            meta, probe = probes[j].metadata, probes[j]
            assert meta.drift is not None and probe.drift_mean is not None
            assert probe.drift_directions is not None
            mean, dirs = probe.drift_mean.double(), probe.drift_directions.double()
            for i, layer in enumerate(meta.layers):
                at, part = position[layer], slice(i * h, (i + 1) * h)
                weight[at * h : (at + 1) * h, d0 : d0 + k] = dirs[:, part].T.float()
                weight[at * h : (at + 1) * h, n_dir + c] = mean[part].float()
                layer_sel[at, c] = 1.0
            offset_c[d0 : d0 + k] = dirs @ mean
            inv_std[d0 : d0 + k] = 1.0 / torch.tensor(meta.drift.component_std,
                                                      dtype=torch.float64)
            group[d0 : d0 + k, c] = 1.0
            mean_sq[c] = float(mean @ mean)
            limits[:, c] = torch.tensor([meta.drift.t2_limit, meta.drift.residual_limit])
            d0 += k
        # Both statistics of every summary from one small product of [t*t, |x_layer|^2,
        # x.mean] (t = x.v - v.mean): T^2 = sum t^2/std^2 and residual = |x|^2 -
        # 2 x.mean + |mean|^2 - sum t^2. Formed in float64 from the float32 products: the
        # residual is a difference of large numbers.
        n = len(cols)
        combine = torch.zeros(n_dir + n_layers + n, 2 * n, dtype=torch.float64)
        combine[:n_dir, :n] = group * (inv_std ** 2).unsqueeze(1)
        combine[:n_dir, n:] = -group
        combine[n_dir : n_dir + n_layers, n:] = layer_sel
        combine[n_dir + n_layers :, n:] = -2.0 * torch.eye(n, dtype=torch.float64)
        self._drift_cols = torch.tensor(cols, dtype=torch.long, device=self.device)
        self._drift_all = n == len(probes)
        self._drift_dirs = n_dir
        self._drift_c = offset_c.to(self.device)
        self._drift_combine = combine.to(self.device)
        self._drift_offset = torch.cat([torch.zeros(n, dtype=torch.float64),
                                        mean_sq]).to(self.device)
        self._drift_limits = limits.reshape(-1).to(self.device)
        return weight

    @property
    def has_drift(self) -> bool:
        """Whether any probe ships a drift summary (:meth:`logits_and_drift` reports it)."""
        return bool(self._drift_cols.numel())

    def _init_isotonic(self, probes: list[ProbeArtifact]) -> None:
        """Pad every isotonic probe's knots to one (n_iso, K) table for batched searchsorted."""
        cols = [j for j, p in enumerate(probes) if p.metadata.calibration == "isotonic"]
        self._iso_cols = torch.tensor(cols, dtype=torch.long, device=self.device)
        if not cols:
            return
        knots = []
        for j in cols:
            x, y = probes[j].isotonic_x.double(), probes[j].isotonic_y.double()
            if x.numel() == 1:  # a constant map; two knots keep the interpolation uniform
                x, y = torch.cat([x, x + x.abs().clamp(min=1.0)]), torch.cat([y, y])
            knots.append((x, y))
        k_max = max(x.numel() for x, _ in knots)
        xs = torch.full((len(cols), k_max), float("inf"), dtype=torch.float64)
        ys = torch.zeros((len(cols), k_max), dtype=torch.float64)
        for r, (x, y) in enumerate(knots):
            xs[r, : x.numel()], ys[r, : y.numel()] = x, y
            ys[r, y.numel() :] = y[-1]
        n = torch.tensor([x.numel() for x, _ in knots], dtype=torch.long)
        self._iso_x = xs.float().to(self.device)
        self._iso_y = ys.float().to(self.device)
        self._iso_last = (n - 1).to(self.device).unsqueeze(1)
        self._iso_lo = self._iso_x[:, :1]
        self._iso_hi = self._iso_x.gather(1, self._iso_last)

    # ------------------------------------------------------------------ properties

    @property
    def num_probes(self) -> int:
        return len(self._probes)

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self._probes]

    @property
    def probes(self) -> list[ProbeArtifact]:
        return list(self._probes)

    @property
    def thresholds(self) -> torch.Tensor:
        """(n_probes,) float32 thresholds on the calibrated probability, on ``device``."""
        return self._thresholds

    @property
    def score_positions(self) -> list[str]:
        return [p.metadata.score_position for p in self._probes]

    @property
    def aggregations(self) -> list[str]:
        return [p.metadata.aggregation for p in self._probes]

    @property
    def weight(self) -> torch.Tensor:
        """The block matrix ``W``: (n_captured_layers * hidden, n_probes)."""
        return self._weight

    @property
    def bias(self) -> torch.Tensor:
        return self._bias

    # ------------------------------------------------------------------ scoring

    @property
    def has_hybrid(self) -> bool:
        """Whether any probe reads token features (the caller must then pass them)."""
        return bool(self._hybrid)

    @torch.no_grad()
    def logits(
        self,
        rows: torch.Tensor,
        *,
        own_features: torch.Tensor | None = None,
        producer_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n_captured_layers, n_tokens, hidden) rows -> (n_tokens, n_probes) float32 logits.

        ``own_features``/``producer_features``: ``(n_tokens, len(token_features))``, the
        features of the token each row scores as its own row (position p) or as its
        producer (the token at p+1); NaN where unknown. Hybrid probes get NaN logits where
        a feature they read is unknown or not passed."""
        return self.logits_and_drift(rows, own_features=own_features,
                                     producer_features=producer_features)[0]

    @torch.no_grad()
    def logits_and_drift(
        self,
        rows: torch.Tensor,
        *,
        own_features: torch.Tensor | None = None,
        producer_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`logits`, and from the same product, ``(n_tokens, n_probes)`` float32: 1.0
        where the row lies outside the probe's training summary, 0.0 inside, NaN for a
        probe without one; None when no probe has a summary."""
        n_layers, h = len(self.captured_layers), self.hidden_size
        if rows.dim() != 3 or rows.shape[0] != n_layers or rows.shape[2] != h:
            raise ValueError(
                f"rows must have shape ({n_layers}, n_tokens, {h}) for captured layers "
                f"{self.captured_layers}, got {tuple(rows.shape)}"
            )
        if not rows.is_floating_point():
            raise TypeError(f"rows must be a float tensor, got {rows.dtype}")
        n_tokens = rows.shape[1]
        if self.num_probes == 0 or n_tokens == 0:
            empty = torch.zeros((n_tokens, self.num_probes), dtype=torch.float32,
                                device=self.device)
            return empty, (empty.clone() if self.has_drift else None)
        # One copy does the device move, the cast to float32 and the (L,T,H)->(T,L,H) layout.
        x = torch.empty((n_tokens, n_layers, h), dtype=torch.float32, device=self.device)
        x.copy_(rows.transpose(0, 1))
        flat = x.view(n_tokens, n_layers * h)
        product = torch.addmm(self._gemm_bias, flat, self._gemm_weight)
        z = product[:, : self.num_probes]
        drift = None
        if self.has_drift:  # z stays a view of the product's first columns
            drift = self._outside(x, product[:, self.num_probes :])
        if self._hybrid:
            feats = {"own": own_features, "producer": producer_features}
            for position, cols in self._hybrid.items():
                self._add_token_features(z, cols, feats[position])
        return z, drift

    @torch.no_grad()
    def drift_statistics(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t2, residual) of (n_captured_layers, n_tokens, hidden) rows, each
        ``(n_tokens, n_drift_probes)`` float64, for the probes with a summary in load order
        (what :meth:`logits_and_drift` compares with the limits; for diagnostics)."""
        x = rows.transpose(0, 1).to(device=self.device, dtype=torch.float32).contiguous()
        extra = x.view(x.shape[0], -1) @ self._gemm_weight[:, self.num_probes :]
        return self._statistics(x, extra)

    def _statistics(self, x: torch.Tensor, extra: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t2, residual) from the rows ``x`` (n_tokens, n_layers, hidden) and the GEMM's
        drift columns ``extra``."""
        stats = self._stacked_statistics(x, extra)
        n = stats.shape[1] // 2
        return stats[:, :n], stats[:, n:].clamp(min=0.0)

    def _stacked_statistics(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """``[t2 | residual]`` (n_tokens, 2 * n_drift_probes) float64, in few kernels."""
        extra = extra.double()
        t = extra[:, : self._drift_dirs] - self._drift_c
        norm = torch.linalg.vector_norm(x, dim=2).double()  # float32 pass over the rows
        layer_sq = norm.mul_(norm)
        inputs = torch.cat([t.square_(), layer_sq, extra[:, self._drift_dirs :]], 1)
        return torch.addmm(self._drift_offset, inputs, self._drift_combine)

    def _outside(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        beyond = self._stacked_statistics(x, extra) > self._drift_limits
        out = beyond.view(x.shape[0], 2, -1).any(1).float()
        if self._drift_all:
            return out
        flags = torch.full((x.shape[0], self.num_probes), float("nan"), dtype=torch.float32,
                           device=self.device)
        flags[:, self._drift_cols] = out
        return flags

    def _add_token_features(self, z: torch.Tensor, cols: torch.Tensor,
                            features: torch.Tensor | None) -> None:
        """``z[:, cols] += features @ W_f[:, cols]``, NaN where a read feature is unknown."""
        if features is None:
            z.index_fill_(1, cols, float("nan"))
            return
        f = torch.as_tensor(features).to(device=self.device, dtype=torch.float32)
        expected = (z.shape[0], len(self.token_features))
        if tuple(f.shape) != expected:
            raise ValueError(f"token features must have shape {expected} "
                             f"({self.token_features}), got {tuple(f.shape)}")
        unknown = ~torch.isfinite(f)
        add = torch.where(unknown, 0.0, f) @ self._feat_weight[:, cols]
        gone = (unknown.float() @ self._feat_used[:, cols]) > 0
        z[:, cols] = torch.where(gone, float("nan"), z[:, cols] + add)

    @torch.no_grad()
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply each probe's calibration: none -> sigmoid(z), platt -> sigmoid(a*z + b),
        isotonic -> piecewise-linear interpolation of its knots, clamped at the ends."""
        if logits.dim() != 2 or logits.shape[1] != self.num_probes:
            raise ValueError(
                f"logits must have shape (n_tokens, {self.num_probes}), got {tuple(logits.shape)}"
            )
        z = logits.to(device=self.device, dtype=torch.float32)
        # "none" columns carry a=1, b=0, so one expression covers them and platt.
        probs = torch.sigmoid(z * self._platt_a + self._platt_b)
        if self._iso_cols.numel() and z.shape[0]:
            zi = z.index_select(1, self._iso_cols).t().contiguous()  # (n_iso, T)
            zi = torch.minimum(torch.maximum(zi, self._iso_lo), self._iso_hi)
            hi = torch.searchsorted(self._iso_x, zi)
            hi = torch.minimum(hi, self._iso_last).clamp_(min=1)
            lo = hi - 1
            x0, x1 = self._iso_x.gather(1, lo), self._iso_x.gather(1, hi)
            y0, y1 = self._iso_y.gather(1, lo), self._iso_y.gather(1, hi)
            t = (zi - x0) / (x1 - x0)
            probs[:, self._iso_cols] = (y0 + t * (y1 - y0)).t()
        if self._hybrid:  # an unscored token stays NaN whatever the calibration
            probs = torch.where(torch.isnan(z), z, probs)
        return probs

    def score(self, rows: torch.Tensor, **token_features: torch.Tensor | None) -> torch.Tensor:
        """Calibrated probabilities (n_tokens, n_probes) for a step's rows (and, for
        hybrid probes, ``own_features``/``producer_features`` as in :meth:`logits`)."""
        return self.probabilities(self.logits(rows, **token_features))

    def __repr__(self) -> str:
        return (
            f"FusedProbeScorer(probes={self.probe_names}, captured_layers={self.captured_layers}, "
            f"hidden_size={self.hidden_size}, device={self.device})"
        )

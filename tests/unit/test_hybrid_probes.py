"""Hybrid probes: rows plus the scored token's log-probability and entropy, one definition
from the engine hook to the artifact, the wire, the store and the fused scorer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support import FakePublisher

from detector.artifact import (
    METADATA_FILE,
    TENSORS_FILE,
    ProbeArtifact,
    ProbeArtifactError,
    ProbeMetadata,
    folded_linear,
    load_probe,
    probe_token_features,
)
from detector.channel.wire import (
    EngineInfo,
    RequestRows,
    StepHeader,
    decode,
    encode_step,
)
from detector.engine.capture import ScheduledRequest, StepAssembler
from detector.engine.token_features import (
    TOP_K,
    parse_token_features,
    token_features,
    topk_entropy,
)
from detector.model_identity import ModelIdentity
from detector.sidecar.scorer import FusedProbeScorer
from detector.sidecar.scores import columns_for, rows_to_score
from detector.sidecar.store import RequestStore

H = 8
CAPTURED = [2, 4]
MODEL = ModelIdentity(name="tiny", fingerprint="0123456789abcdef", hidden_size=H, num_layers=6)
ENGINE = EngineInfo(engine_id="e", model="tiny", hidden_size=H, num_layers=6, layers=CAPTURED,
                    dtype="float32", capture_method="forward_hook", pid=1, started_at=0.0,
                    token_features=["logprob", "entropy"])


def make_probe(name: str = "hyb", *, layers: tuple[int, ...] = (4,),
               features: tuple[str, ...] = ("logprob", "entropy"), seed: int = 0,
               score_position: str = "producer", calibration: str = "platt") -> ProbeArtifact:
    g = torch.Generator().manual_seed(seed)
    d = len(layers) * H + len(features)
    extra = {"platt_a": 1.4, "platt_b": -0.2} if calibration == "platt" else {}
    meta = ProbeMetadata(name=name, model=MODEL, layers=list(layers), hidden_size=H,
                         score_position=score_position, calibration=calibration, threshold=0.5,
                         token_features=list(features), **extra)
    return ProbeArtifact(metadata=meta, weight=torch.randn(d, generator=g),
                         bias=torch.tensor([0.3]), mean=torch.randn(d, generator=g),
                         scale=torch.rand(d, generator=g) + 0.5)


# ----------------------------------------------------------------------------- definitions


def test_token_features_match_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=g) * 3
    tokens = torch.tensor([5, 0, 99])
    out = token_features(logits, tokens, ["logprob", "entropy"])
    lp = torch.log_softmax(logits.double(), dim=-1)
    for i in range(3):
        assert out[i, 0].item() == pytest.approx(lp[i, tokens[i]].item(), abs=1e-5)
        top = torch.sort(lp[i], descending=True).values[:TOP_K]
        p = torch.softmax(top, dim=0)
        assert out[i, 1].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
    # Columns follow the names given.
    swapped = token_features(logits, tokens, ["entropy", "logprob"])
    assert torch.equal(swapped, out.flip(1))


def test_entropy_matches_what_training_reads_from_the_api() -> None:
    """entropy_of, which training applies to the API's top_logprobs: same number."""
    from detector.engine.token_features import entropy_of

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 500, generator=g) * 4
    lp = torch.log_softmax(logits, dim=-1)[0]
    # The API also lists the sampled token when outside the top 20: entropy_of keeps 20.
    top = {str(i): float(v) for i, v in enumerate(lp.tolist()) if v >= lp.topk(21).values[-1]}
    assert len(top) == 21
    assert topk_entropy(lp.unsqueeze(0)).item() == pytest.approx(entropy_of(top, 20), abs=1e-5)


def test_a_minus_inf_logit_in_the_top_k_is_not_nan() -> None:
    logits = torch.full((1, 10), float("-inf"))
    logits[0, 3] = 1.0
    out = token_features(logits, torch.tensor([3]), ["logprob", "entropy"])
    assert out.tolist() == [[0.0, 0.0]]


def test_parse_token_features() -> None:
    assert parse_token_features("entropy, logprob") == ["logprob", "entropy"]
    assert parse_token_features("") == [] and parse_token_features(None) == []
    with pytest.raises(ValueError, match="unknown token feature"):
        parse_token_features("logprob,perplexity")


# ----------------------------------------------------------------------------- artifact


def test_hybrid_artifact_round_trips(tmp_path: Path) -> None:
    art = make_probe()
    art.save(tmp_path / "p")
    back = load_probe(tmp_path / "p")
    assert back.metadata.token_features == ["logprob", "entropy"]
    assert back.metadata.input_dim == H + 2 and back.metadata.hidden_dim == H
    assert torch.equal(back.weight, art.weight)


def test_old_artifacts_load_as_pure_probes(tmp_path: Path) -> None:
    art = make_probe(features=())
    art.save(tmp_path / "p")
    doc = json.loads((tmp_path / "p" / METADATA_FILE).read_text())
    del doc["token_features"]  # written before the field existed
    (tmp_path / "p" / METADATA_FILE).write_text(json.dumps(doc))
    assert load_probe(tmp_path / "p").metadata.token_features == []


def _tamper(tmp_path: Path, **changes: object) -> Path:
    make_probe().save(tmp_path / "p")
    doc = json.loads((tmp_path / "p" / METADATA_FILE).read_text())
    doc.update(changes)
    (tmp_path / "p" / METADATA_FILE).write_text(json.dumps(doc))
    return tmp_path / "p"


def test_unknown_token_feature_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = _tamper(tmp_path, token_features=["logprob", "surprise"])
    with pytest.raises(ProbeArtifactError, match=r"unknown token feature.*surprise.*logprob"):
        load_probe(path)


def test_duplicate_or_non_string_token_features_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProbeArtifactError, match="unique"):
        load_probe(_tamper(tmp_path / "a", token_features=["logprob", "logprob"]))
    with pytest.raises(ProbeArtifactError, match="token_features"):
        load_probe(_tamper(tmp_path / "b", token_features=[1]))


def test_weights_without_the_feature_weights_are_refused(tmp_path: Path) -> None:
    path = _tamper(tmp_path, token_features=["logprob", "entropy"])
    art = load_probe(path)
    save_file({"weight": art.weight[:H].contiguous(), "bias": art.bias},
              str(path / TENSORS_FILE))
    with pytest.raises(ProbeArtifactError, match=r"shape \(8,\), expected \(10,\).*token features"):
        load_probe(path)


def test_nan_feature_weight_is_refused() -> None:
    art = make_probe()
    weight = art.weight.clone()
    weight[-1] = float("nan")
    with pytest.raises(ProbeArtifactError, match="NaN/Inf"):
        ProbeArtifact(metadata=art.metadata, weight=weight, bias=art.bias, mean=art.mean,
                      scale=art.scale)


def test_folded_feature_weights_fold_their_own_standardisation() -> None:
    art = make_probe()
    w, b = folded_linear(art)
    x = torch.randn(4, H + 2, generator=torch.Generator().manual_seed(5)).double()
    direct = (((x - art.mean.double()) / art.scale.double()) @ art.weight.double()
              + art.bias.double())
    assert torch.allclose(x @ w.double() + b, direct, atol=1e-5)


def test_probe_token_features_is_the_union_in_canonical_order() -> None:
    metas = [make_probe("a", features=("entropy",)).metadata,
             make_probe("b", features=("logprob",)).metadata,
             make_probe("c", features=()).metadata]
    assert probe_token_features(metas) == ["logprob", "entropy"]
    assert probe_token_features(metas[2:]) == []


# ----------------------------------------------------------------------------- scorer


def _by_hand(art: ProbeArtifact, h: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """sigmoid(platt(w . standardise([h, f]) + bias)) in float64, straight from the file."""
    x = torch.cat([h.double(), feats.double()], dim=1)
    z = ((x - art.mean.double()) / art.scale.double()) @ art.weight.double() + float(art.bias)
    meta = art.metadata
    return torch.sigmoid(meta.platt_a * z + meta.platt_b)


def test_hybrid_probability_is_the_formula_and_pure_probes_are_unchanged() -> None:
    g = torch.Generator().manual_seed(7)
    pure = make_probe("pure", layers=(2, 4), features=(), seed=3)
    hyb = make_probe("hyb", layers=(4,), features=("entropy", "logprob"), seed=4)
    own = make_probe("own", layers=(2,), features=("logprob",), seed=5, score_position="own",
                     calibration="none")
    rows = torch.randn(len(CAPTURED), 6, H, generator=g)
    scorer = FusedProbeScorer([pure, hyb, own], captured_layers=CAPTURED, hidden_size=H,
                              device="cpu")
    assert scorer.token_features == ["logprob", "entropy"] and scorer.has_hybrid
    f_own = torch.randn(6, 2, generator=g)
    f_prod = torch.randn(6, 2, generator=g)
    probs = scorer.score(rows, own_features=f_own, producer_features=f_prod)

    expected = _by_hand(hyb, rows[1], f_prod[:, [1, 0]])  # the artifact lists entropy first
    assert torch.allclose(probs[:, 1].double(), expected, atol=1e-5)
    z_own = (((torch.cat([rows[0], f_own[:, :1]], 1).double() - own.mean.double())
              / own.scale.double()) @ own.weight.double() + float(own.bias))
    assert torch.allclose(probs[:, 2].double(), torch.sigmoid(z_own), atol=1e-5)
    # The pure probe: bit for bit the GEMM's output, whatever the features (even missing).
    gemm = torch.addmm(scorer.bias, rows.transpose(0, 1).reshape(6, -1), scorer.weight)
    for fo, fp in ((f_own, f_prod), (None, None), (f_own * float("nan"), f_prod)):
        z = scorer.logits(rows, own_features=fo, producer_features=fp)
        assert torch.equal(z[:, 0], gemm[:, 0])
        assert torch.equal(scorer.probabilities(z)[:, 0], torch.sigmoid(
            gemm[:, 0] * pure.metadata.platt_a + pure.metadata.platt_b))
    alone = FusedProbeScorer([pure], captured_layers=CAPTURED, hidden_size=H, device="cpu")
    assert torch.allclose(probs[:, 0], alone.score(rows)[:, 0], rtol=1e-4, atol=1e-7)


def test_missing_features_leave_only_that_probe_unscored() -> None:
    g = torch.Generator().manual_seed(8)
    pure = make_probe("pure", features=(), seed=1)
    hyb = make_probe("hyb", features=("logprob",), seed=2)
    rows = torch.randn(len(CAPTURED), 3, H, generator=g)
    scorer = FusedProbeScorer([pure, hyb], captured_layers=CAPTURED, hidden_size=H, device="cpu")
    feats = torch.tensor([[-0.5], [float("nan")], [-2.0]])
    probs = scorer.score(rows, producer_features=feats, own_features=feats)
    assert torch.isnan(probs[1, 1]) and not torch.isnan(probs[[0, 2], 1]).any()
    assert not torch.isnan(probs[:, 0]).any()
    # Not passed at all (an older hook): every hybrid score is missing, pure ones are not.
    probs = scorer.score(rows)
    assert torch.isnan(probs[:, 1]).all() and not torch.isnan(probs[:, 0]).any()


def test_an_unread_unknown_feature_does_not_unscore() -> None:
    """A probe reading only logprob is scored when only the entropy is unknown."""
    a = make_probe("a", features=("logprob",), seed=1)
    b = make_probe("b", features=("entropy",), seed=2)
    rows = torch.randn(len(CAPTURED), 1, H)
    scorer = FusedProbeScorer([a, b], captured_layers=CAPTURED, hidden_size=H, device="cpu")
    probs = scorer.score(rows, producer_features=torch.tensor([[-1.0, float("nan")]]))
    assert not torch.isnan(probs[0, 0]) and torch.isnan(probs[0, 1])


# ----------------------------------------------------------------------------- wire


def _header(**fields: object) -> StepHeader:
    req = RequestRows(req_id="r", row_offset=0, num_rows=1, first_position=3,
                      num_prompt_tokens=3, input_token_ids=[7], sampled_token_ids=[9], **fields)
    return StepHeader(engine=ENGINE, seq=0, time_ns=1, num_rows=1, requests=[req])


def test_wire_carries_token_features() -> None:
    h = _header(sampled_logprobs=[-0.25], sampled_entropies=[1.5])
    back, _ = decode(encode_step(h, torch.zeros(len(CAPTURED), 1, H)))
    assert back.requests[0].sampled_logprobs == [-0.25]
    assert back.requests[0].sampled_entropies == [1.5]
    assert back.engine.token_features == ["logprob", "entropy"]


def test_wire_decodes_messages_without_token_features() -> None:
    h = _header()
    doc = json.loads(h.model_dump_json())
    for r in doc["requests"]:
        r.pop("sampled_logprobs"), r.pop("sampled_entropies")
    doc["engine"].pop("token_features")
    back, _ = decode([json.dumps(doc).encode(), bytes(len(CAPTURED) * H * 4)])
    assert back.requests[0].sampled_logprobs is None and back.engine.token_features == []


@pytest.mark.parametrize("bad", [{"sampled_logprobs": [-1.0, -2.0]},
                                 {"sampled_entropies": []}])
def test_wire_refuses_features_that_do_not_match_the_tokens(bad: dict) -> None:
    """That request's share is refused (its step-mates' would be kept: issue 23)."""
    doc = json.loads(_header().model_dump_json())
    doc["requests"][0].update(bad)
    back, _ = decode([json.dumps(doc).encode(), bytes(len(CAPTURED) * H * 4)])
    (refused,) = back.refused
    assert refused.req_id == doc["requests"][0]["req_id"]
    assert "one value per sampled token" in refused.reason
    assert doc["requests"][0]["req_id"] not in [r.req_id for r in back.requests]


def test_wire_refuses_non_finite_features() -> None:
    raw = _header(sampled_logprobs=[-1.0]).model_dump_json().replace("-1.0", "NaN")
    back, _ = decode([raw.encode(), bytes(len(CAPTURED) * H * 4)])
    (refused,) = back.refused  # that request's share alone (issue 23)
    assert "sampled_logprobs" in refused.reason


# ----------------------------------------------------------------------------- hook side


def test_assembler_sends_features_with_the_sampled_tokens_only() -> None:
    asm = StepAssembler(FakePublisher())  # type: ignore[arg-type]
    reqs = [ScheduledRequest("a", 2, 0, 2, [1, 2]), ScheduledRequest("b", 3, 0, 5, [1, 2, 3, 4, 5])]
    step = asm.open_step(torch.zeros(len(CAPTURED), 5, H), reqs, [])
    asm.close_step(step, {"a": [8], "b": []},
                   token_features={"a": {"logprob": [-0.5], "entropy": [0.7]}})
    sent = asm.publisher.offered[-1].requests
    assert (sent[0].sampled_logprobs, sent[0].sampled_entropies) == ([-0.5], [0.7])
    assert sent[1].sampled_logprobs is None and sent[1].sampled_entropies is None
    # Features off: nothing extra on the wire.
    step = asm.open_step(torch.zeros(len(CAPTURED), 1, H), [ScheduledRequest("a", 1, 2, 2, None)],
                         [])
    asm.close_step(step, {"a": [9]})
    assert asm.publisher.offered[-1].requests[0].sampled_logprobs is None


# ----------------------------------------------------------------------------- store


def _step(seq: int, first: int, inputs: list[int], sampled: list[int], num_prompt: int,
          lp: list[float] | None) -> StepHeader:
    req = RequestRows(req_id="cmpl-x-0-1a2b3c4d", row_offset=0, num_rows=len(inputs),
                      first_position=first, num_prompt_tokens=num_prompt,
                      input_token_ids=inputs, sampled_token_ids=sampled, sampled_logprobs=lp,
                      sampled_entropies=None if lp is None else [-v for v in lp])
    return StepHeader(engine=ENGINE, seq=seq, time_ns=seq + 1, num_rows=len(inputs),
                      requests=[req])


def test_store_gives_each_scored_row_the_features_of_the_tokens_it_scores() -> None:
    store = RequestStore()
    names = ["logprob", "entropy"]
    prefill = _step(0, 0, [1, 2, 3], [10], 3, [-0.1])
    idx = rows_to_score(prefill)  # the last prompt row, position 2
    own, prod = store.token_feature_inputs(prefill, idx, names)
    assert np.isnan(own).all()  # token 2 is a prompt token
    assert prod.tolist() == [[np.float32(-0.1), np.float32(0.1)]]  # token 3, sampled now
    store.ingest(prefill, idx, None, None)
    decode1 = _step(1, 3, [10], [11], 3, [-0.2])
    own, prod = store.token_feature_inputs(decode1, rows_to_score(decode1), names)
    assert own[0].tolist() == pytest.approx([-0.1, 0.1])  # from the store
    assert prod[0].tolist() == pytest.approx([-0.2, 0.2])  # from this step
    store.ingest(decode1, rows_to_score(decode1), None, None)
    # An older hook (no features): missing, never guessed.
    decode2 = _step(2, 4, [11], [12], 3, None)
    own, prod = store.token_feature_inputs(decode2, rows_to_score(decode2), names)
    assert own[0].tolist() == pytest.approx([-0.2, 0.2]) and np.isnan(prod).all()


def test_store_leaves_nan_scores_out_of_token_scores() -> None:
    store = RequestStore()
    cols = columns_for(["pure", "hyb"], ["producer", "producer"], [0.5, 0.5])
    store.set_columns(cols)
    h = _step(0, 0, [1, 2], [10], 2, None)
    idx = rows_to_score(h)
    store.ingest(h, idx, np.array([[0.25, np.nan]], dtype=np.float32), cols)
    _, tokens = store.snapshot("cmpl-x-0-1a2b3c4d")
    assert tokens[0].scores == {"pure": 0.25} and tokens[0].settled
    assert not math.isnan(tokens[0].scores["pure"])


# ----------------------------------------------------------------------------- training


def test_linear_probe_exports_a_hybrid_artifact_that_scores_like_the_fit() -> None:
    from probes.linear import LinearProbe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, H + 2)).astype(np.float32)
    x[:, -2] = -np.abs(x[:, -2]) * 3  # logprob-like
    y = (x[:, -2] + 0.3 * x[:, 0] < -2).astype(int)
    probe = LinearProbe(C=1.0, calibration="platt").fit(x, y)
    art = probe.to_artifact(name="h", model=MODEL, layers=[4],
                            token_features=["logprob", "entropy"])
    assert art.metadata.token_features == ["logprob", "entropy"]
    scorer = FusedProbeScorer([art], captured_layers=CAPTURED, hidden_size=H, device="cpu")
    rows = torch.zeros(len(CAPTURED), 200, H)
    rows[1] = torch.from_numpy(x[:, :H])
    served = scorer.score(rows, producer_features=torch.from_numpy(x[:, H:]))[:, 0].double()
    assert np.allclose(served.numpy(), probe.predict_proba(x)[:, 1], atol=1e-4)
    with pytest.raises(ProbeArtifactError, match="token features"):
        probe.to_artifact(name="h", model=MODEL, layers=[4], token_features=["logprob"])


def test_span_table_appends_token_feature_columns() -> None:
    from probes.hybrid import with_token_features
    from probes.spans import SpanTable

    def arr(*v: object) -> np.ndarray:
        return np.asarray(v)

    table = SpanTable(
        layers=[4], rows=np.arange(4 * H, dtype=np.float16).reshape(4, 1, H),
        ids=arr("a"), y=arr(1), groups=arr("g"), topics=arr("t"), domains=arr("d"),
        invented=arr(False), styles=arr("s"), texts=arr("x"), questions=arr("q"),
        token_start=arr(0), token_count=arr(3), token_span=arr(0, 0, 0),
        producer_row=arr(0, 1, 2), own_row=arr(1, 2, 3),
        logprobs=arr(-0.5, float("nan"), -1.5), entropies=arr(0.1, 0.2, 0.3))
    assert table.features(arr(0), [4], "producer").shape == (3, H)
    hybrid = with_token_features(table, ["entropy", "logprob"])
    x = hybrid.features(arr(0), [4], "own")
    assert x.shape == (3, H + 2)
    assert np.array_equal(x[:, :H], table.features(arr(0), [4], "own"))
    assert x[:, H].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert x[:, H + 1].tolist() == pytest.approx([-0.5, -1.0, -1.5])  # unknown: the mean
    with pytest.raises(ValueError, match="token features"):
        with_token_features(table, ["logprob", "perplexity"])


# ----------------------------------------------------------------------------- adapter


def _runner(logits: torch.Tensor, temperatures: list[float], penalties: list[float] | None = None):
    from types import SimpleNamespace

    req_ids = [f"r{i}" for i in range(len(temperatures))]
    penalties = penalties or [1.0] * len(req_ids)
    return SimpleNamespace(
        execute_model_state=SimpleNamespace(logits=logits, spec_decode_metadata=None),
        input_batch=SimpleNamespace(req_ids=req_ids, num_reqs=len(req_ids)),
        requests={r: SimpleNamespace(sampling_params=SimpleNamespace(
            temperature=t, repetition_penalty=p))
            for r, t, p in zip(req_ids, temperatures, penalties)})


def test_adapter_features_equal_the_reference_before_the_sampler_scales_the_logits() -> None:
    from types import SimpleNamespace

    from detector.engine.vllm_adapter import _sampled_features, _snapshot_logits

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 300, generator=g) * 3
    raw = logits.clone()
    low = [int(logits[i].argsort()[5]) for i in range(3)]  # far outside the top 20
    # r0 greedy (its top token), r1 sampled at a temperature (a low token), r2 greedy but a
    # processor (a penalty) chose a low token: every one is read on the raw logits.
    snap = _snapshot_logits(_runner(logits, [0.0, 0.8, 0.0], [1.0, 1.0, 1.3]))
    # What the sampler does in place to float32 logits: divides each row by its temperature
    # (a greedy row by exactly 1.0) and applies penalties.
    logits.div_(torch.tensor([1.0, 0.8, 1.0]).unsqueeze(1))
    logits[2] = torch.where(logits[2] > 0, logits[2] / 1.3, logits[2] * 1.3)
    assert not torch.equal(logits[1:], raw[1:])
    sampled = {"r0": [int(raw[0].argmax())], "r1": [low[1]], "r2": [low[2]]}
    cap = SimpleNamespace(token_features=["logprob", "entropy"])
    out = _sampled_features(cap, snap, sampled)
    ref = token_features(raw, torch.tensor([sampled[r][0] for r in ("r0", "r1", "r2")]),
                         ["logprob", "entropy"])
    assert set(out) == {"r0", "r1", "r2"}
    for i, r in enumerate(("r0", "r1", "r2")):
        assert out[r]["logprob"][0] == pytest.approx(ref[i, 0].item(), abs=1e-5)
        assert out[r]["entropy"][0] == pytest.approx(ref[i, 1].item(), abs=1e-5)


def test_adapter_keeps_half_precision_logits_without_copying_them() -> None:
    """The sampler casts non-float32 logits to a float32 copy before changing anything, so
    the engine thread keeps vLLM's tensor and the features read it later, off that thread."""
    from types import SimpleNamespace

    from detector.engine.vllm_adapter import _deferred_features, _snapshot_logits

    logits = (torch.randn(2, 300, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    snap = _snapshot_logits(_runner(logits, [0.0, 0.7]))
    assert snap.logits.data_ptr() == logits.data_ptr()  # no copy on the engine thread
    processed = logits.float().div_(0.7)  # the sampler's own float32 copy
    sampled = {"r0": [int(processed[0].argmax())], "r1": [int(processed[1].argmin())]}
    compute = _deferred_features(SimpleNamespace(token_features=["logprob"]), snap, sampled)
    assert compute is not None  # nothing computed yet: the publisher's thread calls it
    out = compute()
    ref = token_features(logits.float(), torch.tensor([sampled["r0"][0], sampled["r1"][0]]),
                         ["logprob"])
    assert [out["r0"]["logprob"][0], out["r1"]["logprob"][0]] == pytest.approx(
        ref[:, 0].tolist(), abs=1e-5)


def test_serve_asks_the_engine_for_the_features_its_probes_read(tmp_path: Path,
                                                               monkeypatch) -> None:
    from detector.serving.serve import ServeOptions, engine_env

    monkeypatch.setenv("LIE_DETECTOR_TOKEN_FEATURES", "stale")
    pure = make_probe("pure", features=()).save(tmp_path / "pure")
    hyb = make_probe("hyb", features=("entropy",)).save(tmp_path / "hyb")
    env = engine_env(ServeOptions(model_dir=tmp_path, probes=[pure, hyb]), [4])
    assert env["LIE_DETECTOR_TOKEN_FEATURES"] == "entropy"
    env = engine_env(ServeOptions(model_dir=tmp_path, probes=[pure]), [4])
    assert "LIE_DETECTOR_TOKEN_FEATURES" not in env  # no probe asks: nothing computed

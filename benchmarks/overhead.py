"""What the plugin costs vLLM in decode throughput: capture + a scoring sidecar vs. plugin off.

Two vLLM OpenAI servers run side by side on the embedded model with the same flags:

* **A**: the plugin on (layers 8, 15, 22 captured), streaming to a real sidecar process that
  scores every step with a random-weight probe on layer 15;
* **B**: the same server with ``LIE_DETECTOR_DISABLE=1``.

Only one server generates at a time. Rounds run in ABBA order (A B B A A B B A ...); each round
sends ``--concurrency`` distinct greedy ``/v1/completions`` requests at once with
``ignore_eos`` and a fixed ``max_tokens``, and its throughput is generated tokens / wall time.
Each adjacent (A, B) pair of rounds uses the same prompts and gives one ratio A/B; machine
noise (other processes on a small box) hits both halves of a pair alike, so the median ratio
is the result, not the absolute numbers.

Every round is followed by the same quiet gap (``--gap``, default 2 s) whichever server ran:
vLLM's worker busy-polls its message queue for 1 s after its last step, and both servers'
workers are pinned to the same core, so a round started right after the other server's round
pays for that tail. Without the gap, one run on a 2-core machine gave median ratios of 0.95
for pairs run A-then-B and 0.78 for pairs run B-then-A; the summary reports both medians.

The plugin's own time per engine step comes from the sidecar's Prometheus metrics
(``lie_detector_hook_step_seconds`` sum/count deltas over the A rounds). That is the time
spent inside the engine thread only; the publisher's sender thread (encoding, ZeroMQ) and the
sidecar's scoring run beside it on the same cores and show up in the throughput ratio, and
the sidecar's CPU use is reported separately.

Each variant gets its own vLLM compile cache (``VLLM_CACHE_ROOT``). vLLM 0.32 keys its AOT
compile artifacts by its config and environment, while the plugin changes the compiled graph
(extra aux-hidden-state outputs); the hook now adds its capture to that key, and separate
roots keep the comparison fair even with a plugin version that does not.

Run from the repository root::

    .venv/bin/python -m benchmarks.overhead            # full mode
    .venv/bin/python -m benchmarks.overhead --quick    # a fast smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.streaming import prompts_for

logger = logging.getLogger("benchmarks.overhead")

LAYERS = [8, 15, 22]
PROBE_LAYER = 15
TARGET_LOSS_PCT = 2.0  # the budget: at most 2 % decode throughput lost
VLLM_ARGS = ["--dtype", "float32", "--max-num-seqs", "16", "--seed", "0"]
MAX_MODEL_LEN = 1024
START_TIMEOUT_S = 600.0
COMPILE_CACHE = Path.home() / ".cache" / "vllm-lie-detector" / "benchmark-vllm-cache"


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessGroups:
    """Every child runs in its own session, so one ``killpg`` ends it and its workers."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path,
              cpus: set[int] | None = None) -> subprocess.Popen:
        logger.info("starting %s (log %s)%s", name, log_path,
                    f" on CPUs {sorted(cpus)}" if cpus else "")
        logger.debug("%s: %s", name, " ".join(cmd))
        # Set in the child before exec, so every thread it ever starts inherits it.
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=pin)
        self.procs.append((name, proc))
        return proc

    def stop_all(self, timeout_s: float = 20.0) -> None:
        live = [(n, p) for n, p in self.procs if p.poll() is None]
        for name, proc in live:
            logger.info("stopping %s (pid %d)", name, proc.pid)
            _killpg(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in live:
            try:
                proc.wait(timeout=max(0.5, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing its process group", name)
                _killpg(proc, signal.SIGKILL)
                proc.wait()
        # The group may outlive its leader (an orphaned engine process): make sure it is gone.
        for _, proc in self.procs:
            _killpg(proc, signal.SIGKILL)
        self.procs.clear()


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Server:
    name: str
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    model: str = ""


def start_vllm(groups: ProcessGroups, name: str, model_dir: Path, workdir: Path, channel: str,
               *, plugin: bool, layers: list[int] | None = None, enforce_eager: bool = False,
               python: str | Path | None = None, extra_env: dict[str, str] | None = None,
               cache_variant: str | None = None, vllm_args: list[str] | None = None) -> Server:
    """One vLLM OpenAI server on the embedded model, with the benchmark's common flags.

    ``plugin=False`` sets ``LIE_DETECTOR_DISABLE=1``. ``python`` runs the server with another
    interpreter (the vllm-lens environment); ``extra_env`` is applied last; ``vllm_args``
    replaces the common ``VLLM_ARGS``. Each
    ``cache_variant`` gets its own compile cache (``VLLM_CACHE_ROOT``).
    """
    from detector.serving.serve import ServeOptions, engine_env, vllm_command

    layers = list(layers or LAYERS)
    port = free_port()
    opts = ServeOptions(model_dir=model_dir, port=port, channel=channel, layers=layers,
                        max_model_len=MAX_MODEL_LEN,
                        vllm_args=list(VLLM_ARGS if vllm_args is None else vllm_args),
                        enforce_eager=enforce_eager)
    cmd = vllm_command(opts)
    if python is not None:
        cmd[0] = str(python)
    # Same flags for all: compile mode unless asked (no --enforce-eager), no prefix caching.
    assert ("--enforce-eager" in cmd) == enforce_eager and "--no-enable-prefix-caching" in cmd
    env = engine_env(opts, layers)
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env.pop("LIE_DETECTOR_DISABLE", None)
    if not plugin:
        env["LIE_DETECTOR_DISABLE"] = "1"
    variant = cache_variant or (f"plugin-on-L{'_'.join(map(str, layers))}" if plugin
                                else "plugin-off")
    env["VLLM_CACHE_ROOT"] = str(COMPILE_CACHE / variant)
    env.update(extra_env or {})
    proc = groups.spawn(name, cmd, env, workdir / f"{name}.log")
    return Server(name, f"http://127.0.0.1:{port}", proc, workdir / f"{name}.log")


def wait_vllm(server: Server) -> None:
    from detector.serving.serve import wait_until_healthy

    try:
        wait_until_healthy(server.base_url, server.proc, timeout_s=START_TIMEOUT_S)
    except Exception as exc:
        tail = "\n".join(server.log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{server.name} did not start: {exc}\n{tail}") from None
    server.model = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    logger.info("%s healthy at %s", server.name, server.base_url)


@dataclass
class Sidecar:
    proc: subprocess.Popen
    grpc_address: str
    metrics_url: str
    log_path: Path


def start_sidecar(groups: ProcessGroups, channel: str, workdir: Path, probe: Path,
                  model_dir: Path, cpus: set[int] | None = None,
                  extra_env: dict[str, str] | None = None, name: str = "sidecar") -> Sidecar:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    grpc_port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "detector.cli", "sidecar", "--channel", channel,
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--model", str(model_dir), "--probe", str(probe)]
    log_path = workdir / f"{name}.log"
    proc = groups.spawn(name, cmd, {**os.environ, **(extra_env or {})}, log_path, cpus)
    address = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sidecar exited:\n{log_path.read_text()[-3000:]}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("sidecar not healthy after 120 s")
            time.sleep(0.2)
    logger.info("sidecar healthy (gRPC %s, metrics :%d)", address, metrics_port)
    return Sidecar(proc, address, f"http://127.0.0.1:{metrics_port}/metrics", log_path)


def make_random_probe(model_dir: Path, directory: Path, layer: int = PROBE_LAYER,
                      token_features: list[str] | None = None) -> Path:
    """A valid probe artifact with random weights: exercises scoring, measures nothing
    (a hybrid one reading ``token_features`` too, for ``--token-features``)."""
    import torch

    from detector.artifact import ProbeArtifact, ProbeMetadata
    from detector.model_identity import identify_model

    identity = identify_model(model_dir)
    g = torch.Generator().manual_seed(0)
    d = identity.hidden_size
    meta = ProbeMetadata(
        name="benchmark-random", model=identity, layers=[layer],
        hidden_size=identity.hidden_size, score_position="producer", calibration="none",
        threshold=0.5, training={"note": "random weights for the overhead benchmark"},
        token_features=list(token_features or []),
    )
    d += len(meta.token_features)
    art = ProbeArtifact(metadata=meta, weight=torch.randn(d, generator=g) / d**0.5,
                        bias=torch.zeros(1))
    return art.save(directory, overwrite=True)


# --------------------------------------------------------------------------- metrics
def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value} for the unlabelled lie_detector samples."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("lie_detector_") and not sample.labels:
                out[sample.name] = float(sample.value)
    return out


def settle(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Scrape until the step count stops moving: the sidecar has caught up with the engine."""
    last = scrape(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = scrape(url)
        if now.get("lie_detector_steps_received_total") == last.get(
                "lie_detector_steps_received_total"):
            return now
        last = now
    logger.warning("sidecar still receiving steps %.0f s after the round ended", timeout_s)
    return last


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


# --------------------------------------------------------------------------- CPU accounting
_CLK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds used so far) for every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode(errors="replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        # fields after the name: state ppid ... utime(12) stime(13) (0-based after name)
        table[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _CLK)
    return table


def _descendants(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    return seen


def cpu_snapshot(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree, by everything else, and in total."""
    table = _proc_table()
    out: dict[str, float] = {}
    ours: set[int] = set()
    for name, root in groups.items():
        pids = _descendants(table, root) if root in table else set()
        ours |= pids
        out[name] = sum(table[p][1] for p in pids)
    me = _descendants(table, os.getpid()) - ours
    out["benchmark_client"] = sum(table[p][1] for p in me)
    ours |= me
    out["_foreign_live"] = sum(v[1] for p, v in table.items() if p not in ours)
    with open("/proc/stat") as fh:
        fields = [float(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    out["_system_busy"] = (sum(fields) - idle) / _CLK
    return out


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    d = {k: round(after[k] - before.get(k, 0.0), 3) for k in after if not k.startswith("_")}
    # Busy CPU of the whole machine not explained by our processes: other users' work
    # (including processes that started and ended during the round).
    d["others"] = round(max(0.0, (after["_system_busy"] - before["_system_busy"])
                            - sum(d.values())), 3)
    return d


def heavy_processes(limit: int = 8) -> list[str]:
    """The busiest processes right now (ps %CPU is a lifetime average; a rough hint)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[:200] for line in out.splitlines()[1:limit + 1]]


# --------------------------------------------------------------------------- the load
@dataclass
class RoundResult:
    server: str
    index: int
    pair: int
    prompt_set: int
    wall_s: float
    completion_tokens: int
    prompt_tokens: int
    tokens_per_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    sidecar: dict[str, float] = field(default_factory=dict)


def run_round(client: httpx.Client, server: Server, prompts: list[str], max_tokens: int
              ) -> tuple[float, int, int]:
    def one(prompt: str) -> dict:
        body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        resp = client.post(f"{server.base_url}/v1/completions", json=body)
        resp.raise_for_status()
        return resp.json()

    with ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(one, prompts))
        wall = time.perf_counter() - t0
    completion = sum(r["usage"]["completion_tokens"] for r in results)
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    if completion != max_tokens * len(prompts):
        raise RuntimeError(f"{server.name}: {completion} tokens generated, expected "
                           f"{max_tokens * len(prompts)} (ignore_eos not honoured?)")
    return wall, completion, prompt


def quiet_until(round_end: float, gap_s: float) -> None:
    """Sleep so that the next round starts ``gap_s`` after the last one ended."""
    time.sleep(max(0.0, gap_s - (time.monotonic() - round_end)))


def abba(pairs: int) -> list[tuple[str, int]]:
    """(server, pair index): A B | B A | A B | B A ... (each pair shares one prompt set)."""
    order = []
    for p in range(pairs):
        first, second = ("A", "B") if p % 2 == 0 else ("B", "A")
        order += [(first, p), (second, p)]
    return order


# --------------------------------------------------------------------------- reporting
def source_state() -> dict[str, Any]:
    """Which code ran: the commit and the files changed on top of it (read-only git calls)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30,
                                  check=True).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no", "--", "detector")
    return {"commit": git("rev-parse", "HEAD"),
            "detector_changes": status.splitlines() if status else []}


def machine_info() -> dict[str, Any]:
    import torch
    import vllm

    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "max": s[-1],
            "q1": q[0], "q3": q[2], "mean": statistics.fmean(s)}


def summarise(rounds: list[RoundResult]) -> dict[str, Any]:
    a = [r for r in rounds if r.server == "A"]
    b = [r for r in rounds if r.server == "B"]
    by_pair: dict[int, dict[str, RoundResult]] = {}
    for r in rounds:
        by_pair.setdefault(r.pair, {})[r.server] = r
    complete = [p for p in sorted(by_pair) if set(by_pair[p]) == {"A", "B"}]
    ratios = [by_pair[p]["A"].tokens_per_s / by_pair[p]["B"].tokens_per_s for p in complete]
    ratio = _quantiles(ratios)
    # Order diagnostic: pairs run A-then-B vs B-then-A should agree if the gap is long enough.
    by_order: dict[str, list[float]] = {"AB": [], "BA": []}
    for p, value in zip(complete, ratios):
        first = "AB" if by_pair[p]["A"].index < by_pair[p]["B"].index else "BA"
        by_order[first].append(value)
    steps = sum(r.sidecar["steps"] for r in a)
    hook_s = sum(r.sidecar["hook_seconds"] for r in a)
    wall_a = sum(r.wall_s for r in a)
    per_round_fraction = [r.sidecar["hook_seconds"] / r.wall_s for r in a]
    sidecar_cpu = sum(r.cpu_s.get("sidecar", 0.0) for r in a)
    return {
        "throughput_tok_s": {"A": _quantiles([r.tokens_per_s for r in a]),
                             "B": _quantiles([r.tokens_per_s for r in b])},
        "ratio_a_over_b": {**ratio, "per_pair": ratios, "pairs": len(ratios),
                           "median_by_order": {k: statistics.median(v) if v else None
                                               for k, v in by_order.items()}},
        "throughput_loss_pct": {
            "median": 100 * (1 - ratio["median"]),
            # A bad pair has the lowest ratio, so the largest loss.
            "best": 100 * (1 - ratio["max"]), "worst": 100 * (1 - ratio["min"]),
            "iqr": [100 * (1 - ratio["q3"]), 100 * (1 - ratio["q1"])],
            "from_median_throughputs": 100 * (1 - statistics.median(r.tokens_per_s for r in a)
                                              / statistics.median(r.tokens_per_s for r in b)),
        },
        "target_loss_pct": TARGET_LOSS_PCT,
        "hook": {
            "steps_received": steps,
            "hook_seconds_total": hook_s,
            "mean_hook_s_per_step": hook_s / steps if steps else None,
            "mean_step_s": wall_a / steps if steps else None,
            "hook_fraction_of_step": hook_s / wall_a if wall_a else None,
            "hook_fraction_per_round": per_round_fraction,
            "rows_scored": sum(r.sidecar["rows_scored"] for r in a),
            "dropped_steps": sum(r.sidecar["dropped_steps"] for r in a),
            "rejected_messages": sum(r.sidecar["rejected_messages"] for r in a),
        },
        "cpu": {
            # CPU seconds per 1,000 generated tokens, by process tree, in each server's rounds.
            "per_1k_tokens": {
                key: {g: 1000 * sum(r.cpu_s.get(g, 0.0) for r in rs)
                      / sum(r.completion_tokens for r in rs)
                      for g in ("A", "B", "sidecar", "others")}
                for key, rs in (("A", a), ("B", b))
            },
            # Average number of cores the sidecar kept busy while A generated.
            "sidecar_cores_during_a": sidecar_cpu / wall_a if wall_a else None,
            "others_cores": {key: sum(r.cpu_s.get("others", 0.0) for r in rs)
                             / sum(r.wall_s for r in rs) for key, rs in (("A", a), ("B", b))},
        },
    }


def markdown(result: dict[str, Any]) -> str:
    s, cfg, m = result["summary"], result["config"], result["machine"]
    ta, tb = s["throughput_tok_s"]["A"], s["throughput_tok_s"]["B"]
    r, loss, h = s["ratio_a_over_b"], s["throughput_loss_pct"], s["hook"]
    verdict = "within" if loss["median"] <= TARGET_LOSS_PCT else "over"
    lines = [
        f"Decode throughput, plugin on (capture of layers {','.join(map(str, cfg['layers']))} "
        f"+ scoring sidecar) vs. off, {cfg['model']} float32, {cfg['concurrency']} concurrent "
        f"requests x {cfg['max_tokens']} tokens, {r['pairs']} interleaved A/B pairs "
        f"({cfg['mode']} mode), vLLM {m['vllm']} on {m['cpus_usable']} CPU cores "
        f"({m['cpu_model']}), {result['date'][:10]}."
        + (f" vLLM worker bound to cores {cfg['vllm_omp_binding']}." if cfg.get("vllm_omp_binding")
           else "")
        + (f" Sidecar pinned to CPUs {cfg['sidecar_cpus']}." if cfg.get("sidecar_cpus") else "")
        + (" Sidecar environment: " + ", ".join(f"{k}={v}" for k, v in cfg["sidecar_env"].items())
           + "." if cfg.get("sidecar_env") else ""),
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| Throughput, plugin off (B), median [min-max] | {tb['median']:.1f} tok/s "
        f"[{tb['min']:.1f}-{tb['max']:.1f}] |",
        f"| Throughput, plugin on (A), median [min-max] | {ta['median']:.1f} tok/s "
        f"[{ta['min']:.1f}-{ta['max']:.1f}] |",
        f"| Ratio A/B per pair, median [IQR] (min-max) | {r['median']:.3f} "
        f"[{r['q1']:.3f}-{r['q3']:.3f}] ({r['min']:.3f}-{r['max']:.3f}) |",
        f"| Ratio, pairs run A-B / B-A (order check) | {r['median_by_order']['AB']:.3f} / "
        f"{r['median_by_order']['BA']:.3f} |" if r["median_by_order"]["BA"] is not None else
        f"| Ratio, pairs run A-B (order check) | {r['median_by_order']['AB']:.3f} |",
        f"| Throughput loss, median (target <= {TARGET_LOSS_PCT:g} %) | "
        f"{loss['median']:.1f} % ({verdict} target) |",
        f"| Hook time per engine step, mean | {1e3 * h['mean_hook_s_per_step']:.3f} ms "
        f"(step {1e3 * h['mean_step_s']:.1f} ms) |" if h["mean_hook_s_per_step"] else
        "| Hook time per engine step, mean | n/a (no steps received) |",
        f"| Hook share of engine time | {100 * h['hook_fraction_of_step']:.2f} % |"
        if h["hook_fraction_of_step"] is not None else "| Hook share of engine time | n/a |",
        f"| Steps received / dropped by the sidecar | {h['steps_received']:.0f} / "
        f"{h['dropped_steps']:.0f} |",
        f"| Rows scored by the sidecar | {h['rows_scored']:.0f} |",
        f"| Sidecar CPU while A generated | {s['cpu']['sidecar_cores_during_a']:.2f} cores |",
        f"| Other processes' CPU during A / B rounds | {s['cpu']['others_cores']['A']:.2f} / "
        f"{s['cpu']['others_cores']['B']:.2f} cores |",
        "",
    ]
    return "\n".join(lines)


def omp_binding(path: Path) -> str | None:
    """The cores vLLM's CPU worker bound its OpenMP threads to, as its log says."""
    text = path.read_text(errors="replace") if path.exists() else ""
    match = re.search(r"local_rank=\d+, core ids=(\[[^\]]*\])", text)
    return match.group(1) if match else None


def vllm_log_notes(path: Path, limit: int = 40) -> dict[str, Any]:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = text.splitlines()
    # The plugin's own lines (its loggers are detector.*; its messages start "lie-detector:").
    detector = [ln[:300] for ln in lines if re.search(r"\[detector[.\]]|lie-detector:", ln)]
    problems = [ln[:300] for ln in lines
                if re.search(r"\b(ERROR|Traceback|CRITICAL)\b", ln)]
    warnings = [ln[:300] for ln in lines if re.search(r"\bWARNING\b", ln)]
    return {"lie_detector_lines": detector[:limit], "error_lines": problems[:limit],
            "warning_count": len(warnings), "warnings": warnings[:limit]}


# --------------------------------------------------------------------------- main
def _cpu_list(text: str) -> set[int]:
    """'1', '0,2' or '2-3' -> a set of CPU ids."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise argparse.ArgumentTypeError("empty CPU list")
    return cpus


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (2 pairs, 24 tokens per request)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measured rounds per server = A/B pairs (default 12, quick 2)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="concurrent requests per round (default 16 = vLLM --max-num-seqs)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens generated per request (default 64, quick 24)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder for overhead.json and overhead.md")
    p.add_argument("--gap", type=float, default=2.0,
                   help="idle seconds between rounds, the same after every round (default 2)")
    p.add_argument("--sidecar-cpus", type=_cpu_list, default=None, metavar="LIST",
                   help="pin the sidecar to these CPUs, e.g. 1 or 2-3 (default: unpinned). "
                   "vLLM's CPU worker pins itself to its own cores (see 'OpenMP thread "
                   "binding' in its log); this keeps the sidecar off them")
    p.add_argument("--sidecar-env", type=_env_pair, action="append", default=[],
                   metavar="KEY=VALUE", help="extra environment for the sidecar only, e.g. "
                   "OMP_NUM_THREADS=1 (repeatable)")
    p.add_argument("--warmup", type=int, default=1,
                   help="uncounted warm-up rounds per server (default 1)")
    p.add_argument("--token-features", action="store_true",
                   help="server A also computes token features (logprob, entropy) and the "
                   "probe is a hybrid one: compare its ratio with a run without the flag")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the servers' log folder (its path is logged) after the run")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 12)
    args.max_tokens = args.max_tokens or (24 if args.quick else 64)
    if args.rounds < 1 or args.concurrency < 1 or args.max_tokens < 1 or args.warmup < 1:
        p.error("--rounds, --concurrency, --max-tokens and --warmup must be positive")
    if args.gap < 0:
        p.error("--gap must not be negative")
    return args


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def setup_cli(verbose: bool = False) -> None:
    """Logging, and SIGTERM/SIGHUP unwinding like Ctrl-C, for a benchmark's ``main``: the
    ``finally`` that stops every server it started then runs whichever way it is ended."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


def write_results(out: Path, name: str, result: dict[str, Any], table: str) -> None:
    """``<name>.json`` and ``<name>.md`` in ``out`` (docs/results.md's tables are copied
    from the ``.md``, ``benchmarks.update_readme``), and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_cli(args.verbose)

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from detector.models.embedded import ensure_embedded_model

    started = time.monotonic()
    mode = "quick" if args.quick else "full"
    model_dir = ensure_embedded_model()
    workdir = Path(tempfile.mkdtemp(prefix="ld-overhead-"))
    channel = f"ipc://{workdir}/channel.sock"
    groups = ProcessGroups()
    load_before = os.getloadavg()
    heavy_before = heavy_processes()
    source = source_state()  # at start: what the servers import
    logger.info("mode %s: %d pairs, %d x %d tokens per round; work folder %s",
                mode, args.rounds, args.concurrency, args.max_tokens, workdir)
    logger.info("load average before: %.2f %.2f %.2f", *load_before)
    ok = False
    try:
        features = ["logprob", "entropy"] if args.token_features else []
        probe = make_random_probe(model_dir, workdir / "probe", token_features=features)
        sidecar = start_sidecar(groups, channel, workdir, probe, model_dir, args.sidecar_cpus,
                                dict(args.sidecar_env))
        # Both start together (start-up is not measured); generation never overlaps.
        servers = {
            "A": start_vllm(groups, "vllm-A-plugin-on", model_dir, workdir, channel, plugin=True,
                            extra_env=({"LIE_DETECTOR_TOKEN_FEATURES": ",".join(features)}
                                       if features else None)),
            "B": start_vllm(groups, "vllm-B-plugin-off", model_dir, workdir, channel,
                            plugin=False),
        }
        for server in servers.values():
            wait_vllm(server)
        startup_s = time.monotonic() - started
        roots = {"A": servers["A"].proc.pid, "B": servers["B"].proc.pid,
                 "sidecar": sidecar.proc.pid}

        limits = httpx.Limits(max_connections=args.concurrency * 2,
                              max_keepalive_connections=args.concurrency * 2)
        rounds: list[RoundResult] = []
        warmup: dict[str, list[dict[str, float]]] = {}
        with httpx.Client(timeout=600, limits=limits) as client, logging_redirect_tqdm():
            for w in range(args.warmup):
                for key in ("A", "B"):
                    wall, ntok, _ = run_round(client, servers[key],
                                              prompts_for(10_000 + w, args.concurrency),
                                              args.max_tokens)
                    warmup.setdefault(key, []).append({"wall_s": wall, "tokens_per_s": ntok / wall})
                    logger.info("warm-up %s: %.1f tok/s (not counted)", key, ntok / wall)
                    quiet_until(time.monotonic(), args.gap)
            settle(sidecar.metrics_url)
            received_warmup = scrape(sidecar.metrics_url).get("lie_detector_steps_received_total", 0)
            if received_warmup <= 0:
                raise RuntimeError("the sidecar received no steps from server A during warm-up: "
                                   "capture is not working (see the A log)")

            order = abba(args.rounds)
            for i, (key, pair) in enumerate(tqdm(order, desc="rounds", unit="round")):
                before_m = scrape(sidecar.metrics_url) if key == "A" else {}
                before_cpu = cpu_snapshot(roots)
                wall, ntok, nprompt = run_round(client, servers[key],
                                                prompts_for(pair, args.concurrency),
                                                args.max_tokens)
                round_end = time.monotonic()
                after_cpu = cpu_snapshot(roots)
                side: dict[str, float] = {}
                if key == "A":
                    after_m = settle(sidecar.metrics_url)
                    side = {
                        "steps": delta(after_m, before_m, "lie_detector_steps_received_total"),
                        "hook_seconds": delta(after_m, before_m,
                                              "lie_detector_hook_step_seconds_sum"),
                        "hook_count": delta(after_m, before_m,
                                            "lie_detector_hook_step_seconds_count"),
                        "rows_scored": delta(after_m, before_m, "lie_detector_rows_scored_total"),
                        "dropped_steps": delta(after_m, before_m,
                                               "lie_detector_channel_dropped_steps_total"),
                        "rejected_messages": delta(
                            after_m, before_m, "lie_detector_channel_rejected_messages_total"),
                    }
                result = RoundResult(key, i, pair, pair, wall, ntok, nprompt, ntok / wall,
                                     cpu_delta(after_cpu, before_cpu), side)
                rounds.append(result)
                logger.info("round %d %s (pair %d): %.1f tok/s in %.2f s%s", i, key, pair,
                            result.tokens_per_s, wall,
                            f", {side['steps']:.0f} steps, hook {1e3 * side['hook_seconds']:.0f} ms"
                            if side else "")
                quiet_until(round_end, args.gap)
        final_metrics = scrape(sidecar.metrics_url)
        for name, proc in groups.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited early with status {proc.returncode}")

        result = {
            "benchmark": "overhead",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": mode,
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.overhead",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine_info(),
            "source": source,
            "config": {
                "mode": mode, "model": model_dir.name, "model_dir": str(model_dir),
                "layers": LAYERS, "probe_layer": PROBE_LAYER, "pairs": args.rounds,
                "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                "warmup_rounds": args.warmup, "gap_s": args.gap,
                "sidecar_cpus": sorted(args.sidecar_cpus) if args.sidecar_cpus else None,
                "sidecar_env": dict(args.sidecar_env),
                "vllm_omp_binding": omp_binding(servers["A"].log_path),
                "compile_cache": str(COMPILE_CACHE),
                "vllm_args": VLLM_ARGS + ["--max-model-len", str(MAX_MODEL_LEN),
                                          "--no-enable-prefix-caching"],
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1",
                        "A": {"LIE_DETECTOR_LAYERS": ",".join(map(str, LAYERS)),
                              **({"LIE_DETECTOR_TOKEN_FEATURES": ",".join(features)}
                                 if features else {})},
                        "B": {"LIE_DETECTOR_DISABLE": "1"}},
                "order": [k for k, _ in abba(args.rounds)],
            },
            "summary": summarise(rounds),
            "rounds": [vars(r) for r in rounds],
            "warmup": warmup,
            "sidecar_metrics_final": final_metrics,
            "noise": {
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                "heavy_processes_before": heavy_before,
                "heavy_processes_after": heavy_processes(),
                "others_cpu_s_total": round(sum(r.cpu_s.get("others", 0.0) for r in rounds), 2),
                "idle_server_cpu_s_total": round(sum(
                    r.cpu_s.get("B" if r.server == "A" else "A", 0.0) for r in rounds), 2),
            },
            "logs": {"A": vllm_log_notes(servers["A"].log_path),
                     "B": vllm_log_notes(servers["B"].log_path),
                     "sidecar": vllm_log_notes(sidecar.log_path),
                     "folder": str(workdir) if args.keep_logs else None},
            "startup_s": round(startup_s, 1),
            "runtime_s": round(time.monotonic() - started, 1),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
        table = markdown(result)
        (args.out / "overhead.md").write_text(table)
        logger.info("wrote %s and %s", args.out / "overhead.json", args.out / "overhead.md")
        print(table)
        ok = True
        return 0
    except KeyboardInterrupt:
        logger.warning("interrupted; stopping the servers")
        return 130
    finally:
        groups.stop_all()
        if args.keep_logs or not ok:
            logger.info("logs kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

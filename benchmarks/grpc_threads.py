"""The sidecar's threads under a burst of streams: at rest, with N streams open, after.

Issue 24: the thread-per-call gRPC server held a thread for every open ``StreamScores``;
the asyncio server (``detector.sidecar.server``) holds none, and its worker pool shrinks
back after a burst. This counts it. The sidecar runs in a child process (this file with
``--serve``) fed by the tests' fake engine (``tests/reliability/tiny_engine.py``, no vLLM),
and its threads are read from ``/proc/<pid>/task``: every thread, Python's and gRPC core's.

Phases, each reported with the child's OS and Python thread counts:

- ``rest``: started, no call yet;
- ``held``: N streams open on request ids never seen (each waits for its request);
- ``held_ended``: those cancelled, ``idle_s`` + 1 s later;
- ``live``: N streams following N requests the fake engine generates (``tokens`` each, a
  step every ``step_s`` carrying every request); the peak over the run;
- ``live_ended``: every stream got its final update, ``idle_s`` + 1 s later.

Counts, not timings: the figures do not depend on the machine's speed. Beside them, timings
of the live phase (compare runs on one machine only): how long feeding its steps took, the
latency of health checks sent every 50 ms during it, and each token's delay from the
ingestion of the step that sampled it to its arrival at the client.

    .venv/bin/python -m benchmarks.grpc_threads                  # 256 streams
    .venv/bin/python -m benchmarks.grpc_threads --streams 64 --name grpc_threads-64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.grpc_threads")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------- the child: a sidecar
def _thread_counts(sidecar: Any) -> dict[str, Any]:
    names: dict[str, int] = {}
    for t in threading.enumerate():
        prefix = t.name.rstrip("0123456789").rstrip("_-")
        names[prefix] = names.get(prefix, 0) + 1
    return {"os_threads": len(os.listdir("/proc/self/task")),
            "python_threads": threading.active_count(),
            "python_thread_names": names,
            "open_calls": sidecar.service.open_calls}


def _steps(n: int, tokens: int) -> list:
    """One request per stream, ``tokens`` generated each; every step carries all of them."""
    sys.path.insert(0, str(ROOT / "tests" / "reliability"))
    from tiny_engine import engine, make_step  # the tests' fake engine

    eng = engine()
    prompt = [11, 12, 13, 14]
    ids = [f"live-{i}" for i in range(n)]
    plan = {rid: (prompt, [100 + (i + g) % 50 for g in range(tokens)])
            for i, rid in enumerate(ids)}
    steps = [make_step(0, [(rid, 0, len(prompt), True) for rid in ids], [], eng, plan)]
    for g in range(1, tokens):
        steps.append(make_step(g, [(rid, len(prompt) + g - 1, 1, True) for rid in ids],
                               ids if g == tokens - 1 else [], eng, plan))
    return steps


def serve(args: argparse.Namespace) -> int:
    """The child: a sidecar on a loopback port; commands on stdin, JSON replies on stdout."""
    sys.path.insert(0, str(ROOT / "tests" / "reliability"))
    from tiny_engine import probe

    from detector.sidecar.app import Sidecar, SidecarSettings

    work = Path(args.workdir)
    probe_path = probe("p", [1, 3], "producer", 1).save(work / "p")
    sidecar = Sidecar(SidecarSettings(
        channel=f"ipc://{work}/ch.sock", grpc_address=f"127.0.0.1:{args.port}",
        metrics_port=None, probes=[probe_path], shutdown_grace_s=0,
        max_streams=args.streams, grpc_idle_thread_s=args.idle_s))
    sidecar.start()
    steps = _steps(args.streams, args.tokens)  # built before any count: not the server's

    def reply(value: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        command = line.split()
        if command == ["count"]:
            reply(_thread_counts(sidecar))
        elif command == ["feed"]:
            peak = _thread_counts(sidecar)
            ingested = []  # when each step was in the store (wall clock, as the parent's)
            for message in steps:
                started = time.monotonic()
                sidecar.pipeline.handle(message)
                ingested.append(time.time())
                # The engine's pace: a step every ``step_s`` (a slow ingestion takes from
                # the gap, down to none).
                time.sleep(max(0.0, args.step_s - (time.monotonic() - started)))
                now = _thread_counts(sidecar)
                if now["os_threads"] > peak["os_threads"]:
                    peak = now
            reply({**peak, "ingested": ingested})
        elif command == ["quit"]:
            break
    sidecar.stop()
    return 0


# ----------------------------------------------------------------------- the parent
class Child:
    def __init__(self, args: argparse.Namespace, workdir: Path, port: int) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--workdir",
               str(workdir), "--port", str(port), "--streams", str(args.streams),
               "--tokens", str(args.tokens), "--idle-s", str(args.idle_s),
               "--step-s", str(args.step_s)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.ask_lock = threading.Lock()
        assert self._read().get("ready"), "the sidecar did not start"

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the sidecar child ended (exit {self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        with self.ask_lock:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return self._read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


async def _until_open(child: Child, n: int, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = await asyncio.to_thread(child.ask, "count")
        if counts["open_calls"] == n:
            return counts
        if time.monotonic() > deadline:
            raise TimeoutError(f"{counts['open_calls']} calls open, waited for {n}")
        await asyncio.sleep(0.1)


async def _settled(child: Child, idle_s: float) -> dict[str, Any]:
    await _until_open(child, 0)
    await asyncio.sleep(idle_s + 1.0)
    return await asyncio.to_thread(child.ask, "count")


async def measure(args: argparse.Namespace, child: Child, address: str) -> dict[str, Any]:
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from detector.api.liedetector.v1 import detector_pb2 as pb
    from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc

    n = args.streams
    phases: dict[str, Any] = {"rest": await asyncio.to_thread(child.ask, "count")}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DetectorStub(channel)
        held = [stub.StreamScores(pb.StreamScoresRequest(request_id=f"never-{i}"),
                                  timeout=300) for i in range(n)]
        readers = [asyncio.ensure_future(call.read()) for call in held]  # starts each call
        phases["held"] = await _until_open(child, n)
        for call in held:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        phases["held_ended"] = await _settled(child, args.idle_s)

        arrivals: list[tuple[int, float]] = []  # (token index, when it reached the client)

        async def follow(i: int) -> tuple[int, bool]:
            tokens, final = 0, False
            call = stub.StreamScores(pb.StreamScoresRequest(request_id=f"live-{i}"),
                                     timeout=300)
            async for update in call:
                now = time.time()
                arrivals.extend((t.index, now) for t in update.tokens)
                tokens += len(update.tokens)
                final = final or update.final
            return tokens, final

        latencies: list[float] = []
        failures: list[str] = []
        probing = asyncio.Event()

        async def probe_health() -> None:
            async with grpc.aio.insecure_channel(address) as own:  # a kubelet's own channel
                health = health_pb2_grpc.HealthStub(own)
                while not probing.is_set():
                    started = time.perf_counter()
                    try:
                        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                        latencies.append(time.perf_counter() - started)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc.code().name)
                    await asyncio.sleep(0.05)

        followers = [asyncio.ensure_future(follow(i)) for i in range(n)]
        await _until_open(child, n)
        prober = asyncio.ensure_future(probe_health())
        started = time.monotonic()
        phases["live"] = await asyncio.to_thread(child.ask, "feed")
        feed_s = time.monotonic() - started
        ingested = phases["live"].pop("ingested")
        results = await asyncio.gather(*followers)
        probing.set()
        await prober
        phases["live_ended"] = await _settled(child, args.idle_s)
    complete = sum(1 for tokens, final in results if final and tokens == args.tokens)
    # Token g is sampled in step g: its delay is from that step's ingestion to the client.
    delays = [max(0.0, at - ingested[index]) for index, at in arrivals]
    return {"label": args.label, "streams": n, "tokens_per_request": args.tokens,
            "idle_s": args.idle_s, "streams_complete": complete, "phases": phases,
            "live_feed_s": round(feed_s, 2),
            "health_during_live": _latency_summary(latencies, failures),
            "token_delay": _latency_summary(delays, [])}


def _latency_summary(latencies: list[float], failures: list[str]) -> dict[str, Any]:
    ordered = sorted(latencies)

    def q(p: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e3, 2) \
            if ordered else None

    return {"n": len(ordered), "failures": failures, "p50_ms": q(0.5),
            "p99_ms": q(0.99), "max_ms": round(ordered[-1] * 1e3, 2) if ordered else None}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['label']}\n",
             f"| phase ({result['streams']} streams) | OS threads | Python threads | "
             "open calls |", "|---|---|---|---|"]
    for name, c in result["phases"].items():
        lines.append(f"| {name} | {c['os_threads']} | {c['python_threads']} | "
                     f"{c['open_calls']} |")
    lines.append(f"\nStreams that got their final update and every token: "
                 f"{result['streams_complete']} of {result['streams']}.")
    h, d = result["health_during_live"], result["token_delay"]
    lines.append(f"\nTimings (this machine, this run; compare runs on one machine only): the "
                 f"live phase's {result['tokens_per_request']} steps took "
                 f"{result['live_feed_s']} s to feed; health checks during it: {h['n']}, "
                 f"p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms, "
                 f"{len(h['failures'])} failed; a token's delay from its step's ingestion to "
                 f"the client: p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms. "
                 f"{result['cpus']} CPUs, load average (1 min) {result['load_average']['before'][0]:.1f} "
                 f"before, {result['load_average']['after'][0]:.1f} after.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="generated per live request")
    p.add_argument("--step-s", type=float, default=0.1,
                   help="the fake engine's pace: a step every this long (if ingestion keeps up)")
    p.add_argument("--idle-s", type=float, default=2.0,
                   help="grpc_idle_thread_s: how long an idle worker thread lives")
    p.add_argument("--name", default="grpc_threads", help="results file name, no suffix")
    p.add_argument("--label", default="asyncio gRPC server (detector.sidecar.server)",
                   help="what is measured, for the results' first line")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.serve:
        return serve(args)
    from benchmarks.overhead import free_port, source_state, write_results

    workdir = Path(tempfile.mkdtemp(prefix="ld-grpc-threads-"))
    port = free_port()
    load_before = os.getloadavg()
    child = Child(args, workdir, port)
    try:
        result = asyncio.run(measure(args, child, f"127.0.0.1:{port}"))
    finally:
        child.close()
    import detector

    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    result["cpus"] = os.cpu_count()
    result["detector"] = str(Path(detector.__file__).parent)
    result["source"] = source_state()
    write_results(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file (the child): PYTHONPATH's packages first
        sys.path.append(str(ROOT))
    raise SystemExit(main())

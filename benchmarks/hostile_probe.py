"""What one hostile probe file costs a running sidecar: time to refuse it, peak RSS, health.

A sidecar process (no engine, no probe) is started with an admin token and a probe root;
the root holds a copy of the shipped probe whose ``probe.json`` is padded, under
``training``, with ``[[],[],...]`` up to ``--mib`` MiB (issue 23: 16 MiB of ``[]`` took
50 s and 5 GB of RSS to refuse). ``LoadProbe`` is called once while a health check runs
every 0.5 s (10 s deadline); the sidecar's peak RSS is the kernel's ``VmHWM``.

    .venv/bin/python -m benchmarks.hostile_probe            # 16 MiB, as reported
    .venv/bin/python -m benchmarks.hostile_probe --mib 1    # just under today's limit
    .venv/bin/python -m benchmarks.hostile_probe --field training  # valid but huge

Prints one JSON object; the same command measures any checkout (``PYTHONPATH=<checkout>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.overhead import ProcessGroups, free_port
from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.artifact import METADATA_FILE, TENSORS_FILE, default_probe_dir

logger = logging.getLogger("benchmarks.hostile_probe")
TOKEN = "hostile-probe-bench"
MiB = 1 << 20


def hostile_probe(directory: Path, size: int, field: str = "extra") -> Path:
    """A copy of the shipped probe whose metadata is ``size`` bytes of mostly ``[],``: in
    ``training`` (free-form, so the old code loaded it) or in an unknown field (refused)."""
    shipped = default_probe_dir()
    if shipped is None:
        raise SystemExit("the shipped probe is not installed (detector/default_probe)")
    directory.mkdir(parents=True)
    shutil.copy2(shipped / TENSORS_FILE, directory / TENSORS_FILE)
    text = json.dumps(json.loads((shipped / METADATA_FILE).read_text()))
    if field == "training":
        head, tail = text[:-1] + ', "training": {"x": [', "]}}"
    else:
        head, tail = text[:-1] + ', "x": [', "]}"
    pairs = max(1, (size - len(head) - len(tail) - 1) // 3)
    (directory / METADATA_FILE).write_text(head + "[]," * (pairs - 1) + "[]" + tail)
    return directory


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(size: int, workdir: Path, field: str = "extra") -> dict[str, Any]:
    root = workdir / "probes"
    probe = hostile_probe(root / "hostile", size, field)
    port = free_port()
    env = {**os.environ, "LIE_DETECTOR_ADMIN_TOKEN": TOKEN,
           "LIE_DETECTOR_PROBE_ROOTS": json.dumps([str(root)])}
    cmd = [sys.executable, "-m", "detector.cli", "sidecar", "--no-default-probe",
           "--channel", f"ipc://{workdir}/ch.sock", "--grpc-port", str(port), "--no-metrics"]
    groups = ProcessGroups()
    proc = groups.spawn("sidecar", cmd, env, workdir / "sidecar.log")
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError((workdir / "sidecar.log").read_text()[-3000:])
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            before = {"rss_kib": _status_kib(proc.pid, "VmRSS"),
                      "hwm_kib": _status_kib(proc.pid, "VmHWM")}
            checks: list[float | None] = []
            done = threading.Event()

            def check_health() -> None:
                while not done.is_set():
                    t0 = time.monotonic()
                    try:
                        health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                        checks.append(time.monotonic() - t0)
                    except grpc.RpcError:
                        checks.append(None)
                    done.wait(0.5)

            checker = threading.Thread(target=check_health, daemon=True)
            checker.start()
            t0 = time.monotonic()
            try:
                pb_grpc.DetectorStub(ch).LoadProbe(
                    pb.LoadProbeRequest(path=str(probe)), timeout=300,
                    metadata=(("authorization", f"Bearer {TOKEN}"),))
                code, details = "OK", ""
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            seconds = time.monotonic() - t0
            done.set()
            checker.join()
            after = {"rss_kib": _status_kib(proc.pid, "VmRSS"),
                     "hwm_kib": _status_kib(proc.pid, "VmHWM")}
            served = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    finally:
        groups.stop_all()
    answered = [c for c in checks if c is not None]
    return {
        "file_bytes": (probe / METADATA_FILE).stat().st_size,
        "load_probe": {"code": code, "details": details[:200], "seconds": round(seconds, 3)},
        "sidecar_rss_mib": {"before": round(before["rss_kib"] / 1024, 1),
                            "peak": round(after["hwm_kib"] / 1024, 1),
                            "after": round(after["rss_kib"] / 1024, 1)},
        "health_during": {"checks": len(checks), "failed": len(checks) - len(answered),
                          "max_s": round(max(answered), 3) if answered else None},
        "health_after": health_pb2.HealthCheckResponse.ServingStatus.Name(served),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=16.0,
                        help="size of the hostile probe.json (default 16: just under the old "
                        "16 MiB limit)")
    parser.add_argument("--field", choices=("extra", "training"), default="extra",
                        help="where the padding goes: an unknown top-level field (the metadata "
                        "is invalid) or the free-form training record (valid)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    size = int(args.mib * MiB) - 4096
    with tempfile.TemporaryDirectory(prefix="hostile-probe-") as tmp:
        result = measure(size, Path(tmp), args.field)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

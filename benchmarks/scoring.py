"""Sidecar scoring throughput: the fused scorer against a plain matrix-product bound.

For each probe count, one engine step's worth of rows (``--rows`` tokens x the captured
layers) goes through ``FusedProbeScorer`` (layout copy + one GEMM + calibration), and through
a bare ``torch.mm`` of the same shape on rows already laid out for it: the best any scorer
of this design can do on this machine. Both are timed interleaved, many times; the result is
rows per second and the ratio fused / bound. On a GPU the same command measures the GPU
(``--device cuda``) and also measures the device's memory bandwidth (a large device-to-device
copy) and the rows/s that bandwidth allows: scoring reads every row once, so on a GPU the
bound that matters is bytes moved, not FLOPs. Every figure carries the device it came from.

    .venv/bin/python -m benchmarks.scoring            # full
    .venv/bin/python -m benchmarks.scoring --quick    # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from detector.artifact import ProbeArtifact, ProbeMetadata
from detector.model_identity import ModelIdentity
from detector.sidecar.scorer import FusedProbeScorer

logger = logging.getLogger("benchmarks.scoring")

HIDDEN = 576  # SmolLM2-135M
LAYERS = [8, 15, 22]
MODEL = ModelIdentity(name="bench", fingerprint="0" * 16, hidden_size=HIDDEN, num_layers=30)


def random_probes(n: int, seed: int = 0) -> list[ProbeArtifact]:
    g = torch.Generator().manual_seed(seed)
    probes = []
    for i in range(n):
        layer = LAYERS[i % len(LAYERS)]
        meta = ProbeMetadata(name=f"p{i}", model=MODEL, layers=[layer], hidden_size=HIDDEN,
                             score_position="producer", calibration="platt", platt_a=1.0,
                             platt_b=0.0, threshold=0.5)
        probes.append(ProbeArtifact(metadata=meta,
                                    weight=torch.randn(HIDDEN, generator=g) / HIDDEN ** 0.5,
                                    bias=torch.zeros(1)))
    return probes


def _time(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def memory_bandwidth(device: torch.device, mib: int = 512, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / statistics.median(times)


def measure(num_probes: int, rows: int, device: torch.device, rounds: int, repeats: int,
            bandwidth_bytes_s: float | None = None) -> dict:
    scorer = FusedProbeScorer(random_probes(num_probes), captured_layers=LAYERS,
                              hidden_size=HIDDEN, device=device)
    # As the channel delivers them: (layers, rows, hidden) on the host.
    step_rows = torch.randn(len(LAYERS), rows, HIDDEN)
    if device.type == "cuda":
        step_rows = step_rows.pin_memory()
    flat = step_rows.permute(1, 0, 2).reshape(rows, -1).contiguous().to(device)
    weight = scorer.weight.to(device)

    def fused() -> None:
        scorer.probabilities(scorer.logits(step_rows))

    def bound() -> None:
        torch.mm(flat, weight)

    for fn in (fused, bound):  # warm-up
        _time(fn, device, 3)
    fused_t: list[float] = []
    bound_t: list[float] = []
    for _ in range(rounds):  # interleaved so machine noise hits both alike
        fused_t += _time(fused, device, repeats)
        bound_t += _time(bound, device, repeats)
    f, b = statistics.median(fused_t), statistics.median(bound_t)
    result = {
        "probes": num_probes, "rows_per_step": rows,
        "fused_rows_per_s": rows / f, "bound_rows_per_s": rows / b,
        "fused_over_bound": b / f,
        "fused_ms_per_step": f * 1e3, "bound_ms_per_step": b * 1e3,
        "fused_p90_ms": sorted(fused_t)[int(0.9 * len(fused_t))] * 1e3,
    }
    result["device"] = str(device)
    if device.type == "cuda" or bandwidth_bytes_s:
        # Bytes one step must move at least: the rows and weights read, the logits written.
        bytes_moved = (flat.numel() + weight.numel() + rows * weight.shape[1]) * 4
        result["bound_gb_per_s"] = bytes_moved / b / 1e9
        result["fused_gb_per_s"] = bytes_moved / f / 1e9
        if bandwidth_bytes_s:
            bw_step_s = bytes_moved / bandwidth_bytes_s
            result["bandwidth_bound_rows_per_s"] = rows / bw_step_s
            result["fused_over_bandwidth_bound"] = bw_step_s / f
    return result


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
        info["cpu"] = cpu
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(counts: list[int], rows: int, device: torch.device | str, *, quick: bool,
        threads: int = 1) -> dict:
    """The whole measurement as one JSON-able payload (used by ``benchmarks.run_all``)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    torch.set_num_threads(threads)
    rounds, repeats = (3, 5) if quick else (10, 20)
    bandwidth = memory_bandwidth(device) if device.type == "cuda" else None
    results = [measure(n, rows, device, rounds, repeats, bandwidth)
               for n in tqdm(counts, desc="probe counts", disable=None)]
    info = machine(device)
    if bandwidth:
        info["memory_bandwidth_gb_per_s"] = bandwidth / 1e9
    return {"date": datetime.now(timezone.utc).isoformat(), "quick": quick, "device": str(device),
            "machine": info, "layers": LAYERS, "hidden": HIDDEN, "rows_per_step": rows,
            "rounds": rounds, "repeats_per_round": repeats, "results": results}


def to_markdown(results: list[dict], info: dict) -> str:
    lines = [
        f"Sidecar scoring on `{info['device']}` ({info.get('gpu') or info.get('cpu', '?')}, "
        f"{info['threads']} threads), {results[0]['rows_per_step']} rows per step, "
        f"{len(LAYERS)} layers x {HIDDEN}:",
        "",
        "| probes | fused rows/s | GEMM bound rows/s | fused / bound | fused ms/step |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['probes']} | {r['fused_rows_per_s']:,.0f} | "
                     f"{r['bound_rows_per_s']:,.0f} | {r['fused_over_bound']:.2f} | "
                     f"{r['fused_ms_per_step']:.3f} |")
    if any("bandwidth_bound_rows_per_s" in r for r in results):
        lines += ["", f"Memory-bandwidth bound on `{info['device']}` "
                  f"({info.get('memory_bandwidth_gb_per_s', 0):,.0f} GB/s measured by a copy):", "",
                  "| probes | fused rows/s | bandwidth bound rows/s | fused / bound |",
                  "| ---: | ---: | ---: | ---: |"]
        for r in results:
            lines.append(f"| {r['probes']} | {r['fused_rows_per_s']:,.0f} | "
                         f"{r['bandwidth_bound_rows_per_s']:,.0f} | "
                         f"{r['fused_over_bandwidth_bound']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (CI smoke run)")
    parser.add_argument("--probes", default="1,8,16,64")
    parser.add_argument("--rows", type=int, default=256, help="rows per engine step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the sidecar's default cpu_threads is 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    counts = [int(p) for p in args.probes.split(",")]
    payload = run(counts, args.rows, device, quick=args.quick, threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scoring-{device.type}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    table = to_markdown(payload["results"], payload["machine"])
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

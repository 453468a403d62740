#!/usr/bin/env bash
# Set up (idempotent, see scripts/setup.sh: the demo stage, then the test stage with the dev, train
# and guardrails extras) and run the whole test suite: fast unit tests, then the integration tests
# against real vLLM CPU servers on the embedded model.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k capture`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest tests -ra --durations=15 "$@"

"""The modules application code imports are type-checked (mypy, strict; see pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What a user's code imports: these must stay checkable under their own type checker.
TYPED_MODULES = ["detector/serving/client.py", "detector/serving/openai_middleware.py",
                 "detector/serving/guardrails.py", "detector/settings.py"]


def test_typed_modules_pass_mypy_strict() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", *TYPED_MODULES], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

"""The engine hook: vLLM's ``vllm.general_plugins`` entry point.

vLLM imports general plugins in every one of its processes (API server, engine core,
workers). ``register`` must therefore be cheap and idempotent: it imports nothing from
vLLM and only arranges for ``vllm_adapter`` to patch the model-runner modules when (and
if) a process imports them, which only the processes that run the model do.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import types
from collections.abc import Sequence

logger = logging.getLogger("detector.engine")

_registered = False


def register() -> None:
    """Entry point called by vLLM. ``LIE_DETECTOR_DISABLE=1`` makes it a no-op."""
    global _registered
    if _registered:
        return
    _registered = True
    _ensure_log_handler()
    from detector.settings import HookSettings

    try:
        settings = HookSettings()
    except Exception as exc:  # a bad setting must not stop vLLM
        logger.error("lie-detector: invalid LIE_DETECTOR_* settings, plugin off: %s", exc)
        return
    if settings.disable:
        logger.info("lie-detector: disabled by LIE_DETECTOR_DISABLE")
        return

    from detector.engine import vllm_adapter

    targets = (
        vllm_adapter.GPU_RUNNER_MODULE,
        vllm_adapter.CPU_RUNNER_MODULE,
        vllm_adapter.V2_RUNNER_MODULE,
    )

    def patch(module: types.ModuleType) -> None:
        try:
            vllm_adapter.patch_model_runner_module(module, settings)
        except Exception:
            logger.exception("lie-detector: could not patch %s; capture is off", module.__name__)

    for name in targets:
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PostImportFinder(set(targets) - set(sys.modules), patch))


def _ensure_log_handler() -> None:
    """vLLM configures only its own loggers; give ours a handler so they show in its log."""
    root = logging.getLogger("detector")
    if root.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                           "%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` right after one of ``names`` is first imported."""

    def __init__(self, names: set[str], callback: types.FunctionType) -> None:
        self._names = names
        self._callback = callback

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self._names:
            return None
        self._names.discard(fullname)  # let the normal finders locate it
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module
        callback = self._callback

        def exec_and_patch(module: types.ModuleType) -> None:
            exec_module(module)
            callback(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec

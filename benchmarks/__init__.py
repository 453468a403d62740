"""Benchmarks of vllm-lie-detector (run as modules, e.g. ``python -m benchmarks.overhead``)."""

"""Offline probe training: datasets, capture through vLLM with the plugin, training, evaluation.

``datasets/`` (knowledge-base builders, prompts, the user JSONL format) -> ``labeling`` ->
``capture`` (with ``server``, ``tap``, ``store``) -> ``spans`` -> ``train`` (with ``linear``)
-> ``evaluate`` -> ``report``; ``pipeline`` glues them and ``lie-detector train-default``
runs it all for the embedded model. See docs/training.md.
"""

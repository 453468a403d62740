"""vllm-lie-detector: watch a vLLM model's residual stream and flag the spans it makes up.

Data flow: engine hook (``detector.engine``) -> channel (``detector.channel``) ->
sidecar scoring (``detector.sidecar``) -> spans -> gRPC API and Prometheus metrics.
"""

__version__ = "0.1.0"

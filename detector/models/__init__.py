"""Models: the embedded model, importing other models, and a model's identity.

Converting a GGUF or transformers checkpoint into a folder vLLM and the probes share
(``importer``, with ``gguf_header`` reading GGUF metadata without loading weights), the
embedded SmolLM2 model (``embedded``), and the identity a probe is checked against
(``identity``).
"""

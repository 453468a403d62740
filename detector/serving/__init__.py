"""Serving: what runs a detector-equipped vLLM and reads its verdicts.

The ``serve`` launcher (vLLM + sidecar under one supervisor) and its launch checks, the
OpenAI middleware that annotates responses, the typed gRPC client and the NeMo Guardrails
output rail. Built on the engine plugin, the channel and the sidecar; below the CLI.
"""

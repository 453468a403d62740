"""Engine -> sidecar channel: a bounded, non-blocking ZeroMQ PUSH/PULL link, one message per step."""

"""Generated gRPC stubs for ``proto/liedetector/v1`` (regenerate with scripts/gen_proto.sh)."""

#!/usr/bin/env python3
"""Container health check: exit 0 when the sidecar's grpc.health.v1 says SERVING.

Usage: lie-detector-healthcheck [HOST:PORT] [SERVICE]   (default 127.0.0.1:50051, "")
Used by the sidecar image's HEALTHCHECK, so that compose starts vLLM only once the sidecar
has bound the channel. Kubernetes uses the kubelet's native gRPC probes instead.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = argv[1] if len(argv) > 1 else "127.0.0.1:50051"
    service = argv[2] if len(argv) > 2 else ""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0)
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""`recserve health`: one grpc.health.v1 Check against a running server; exit 0 when it answers SERVING.

The image's HEALTHCHECK runs it as `python -m recserve.health`, which imports only grpc and the health
stubs (no settings, no ONNX Runtime), so a check every few seconds costs little.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1
# Addresses a server binds to listen everywhere; a check on the same host dials loopback instead.
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def default_address() -> str:
    """The server of this container: RECSERVE_HOST and RECSERVE_PORT, as `recserve serve` reads them."""
    host = os.environ.get("RECSERVE_HOST", "127.0.0.1")
    port = os.environ.get("RECSERVE_PORT", "50051")
    return f"{'127.0.0.1' if host in WILDCARDS else host}:{port}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Ask a recserve server (any grpc.health.v1 server) for its status. Exit codes: 0 SERVING; "
        "1 anything else (NOT_SERVING, unreachable, timed out)."
    )
    parser.add_argument(
        "--address",
        default=default_address(),
        metavar="HOST:PORT",
        help="server to check; default: 127.0.0.1 (or RECSERVE_HOST when it is not a wildcard) and "
        "RECSERVE_PORT (50051), i.e. the server of this container (default now: %(default)s)",
    )
    parser.add_argument("--service", default="", help="service name to check; default: '' (the whole server)")
    parser.add_argument(
        "--timeout-s", type=float, default=3.0, metavar="S", help="deadline of the check (default: 3.0)"
    )
    parser.add_argument(
        "--tls-ca-file",
        type=Path,
        metavar="PEM",
        help="check over TLS, trusting this CA bundle (a server started with --tls-cert-file)",
    )


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca_file.read_bytes())
        channel = grpc.secure_channel(args.address, credentials)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
        except grpc.RpcError as error:
            print(f"recserve health: {args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_UNHEALTHY
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"recserve health: {args.address}: {status}")
    return EXIT_SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNHEALTHY


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recserve.health")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

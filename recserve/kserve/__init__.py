"""The KServe v2 / Open Inference Protocol modules generated from protos/recserve/kserve (`make proto`),
in a descriptor pool of their own (`POOL`).

The protocol's package is `inference`, and tritonclient registers the very same names (from Triton's own
grpc_service.proto) in protobuf's default pool: two files that define one name cannot share a pool, so
whichever of the two were imported second would fail. The server and Triton's client then meet in one
process (the tests, the benchmark harness), so this package builds its modules into `POOL` instead.

NOTE: the generated code adds its file to `descriptor_pool.Default()`; while this package imports it, that
function answers `POOL`. Any import of a module under recserve.kserve runs this first, so none of them can
reach the default pool. The swap lasts as long as the import and is undone even if it fails.
"""

from __future__ import annotations

# NOTE: protobuf's modules that the generated code imports are imported here, before the swap: some bind
# the default pool when first imported (symbol_database's default database does), and must bind the real one.
from google.protobuf import descriptor, descriptor_pool, runtime_version, symbol_database  # noqa: F401
from google.protobuf.internal import builder  # noqa: F401

POOL = descriptor_pool.DescriptorPool()


def _load() -> None:
    default = descriptor_pool.Default
    descriptor_pool.Default = lambda: POOL
    try:
        from recserve.kserve import grpc_service_pb2  # noqa: F401
    finally:
        descriptor_pool.Default = default


_load()

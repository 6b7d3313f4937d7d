"""gRPC server reflection, as grpc.reflection.v1 and v1alpha, so that grpcurl, Postman and Evans find every
service without its .proto (newer tools ask v1 first, older ones know only v1alpha).

grpcio-reflection ships only a v1alpha servicer. The v1 messages are v1alpha's, field for field, in
another package, so the same servicer answers both names: the bytes on the wire are the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(services: Iterable[ServiceDescriptor], server: grpc.aio.Server) -> None:
    """Reflection of `services` and of itself (both versions) on `server`.

    NOTE: the descriptors are answered from a pool of their own, not protobuf's default one: the KServe
    service's files live in another pool (recserve/kserve/__init__.py says why), and a reflection servicer
    reads one pool.
    """
    pool = descriptor_pool.DescriptorPool()
    services = list(services)
    for service in services:
        _add(pool, service.file)
    _add(pool, reflection_pb2.DESCRIPTOR)
    pool.AddSerializedFile(_v1_file())
    names = [*(service.full_name for service in services), V1ALPHA, V1]
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for name in (V1ALPHA, V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)


def _add(pool: descriptor_pool.DescriptorPool, file: FileDescriptor) -> None:
    """`file` and, first, everything it imports (a pool refuses a file before its dependencies)."""
    try:
        pool.FindFileByName(file.name)
        return
    except KeyError:
        pass
    for dependency in file.dependencies:
        _add(pool, dependency)
    pool.AddSerializedFile(file.serialized_pb)


def _v1_file() -> bytes:
    """grpc/reflection/v1/reflection.proto: the v1alpha file with its package (and the references to its own
    messages) renamed, so that describing the v1 service works too."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{proto.package}.", f".{V1.rpartition('.')[0]}."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = new.strip(".")
    proto.ClearField("options")  # language packages named after v1alpha

    def renamed(type_name: str) -> str:
        return new + type_name.removeprefix(old) if type_name.startswith(old) else type_name

    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.type_name:
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    return proto.SerializeToString()

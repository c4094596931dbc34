"""Generated code of the envelope contract (``proto/envelope_grpc/v1``).

The contract imports ``buf/validate/validate.proto``. protovalidate 2.x ships
that file's descriptor but no ``buf.validate.validate_pb2`` module, which
protoc-generated code imports; register one, built from protovalidate's own
descriptor, before any generated module of this package loads.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _register_buf_validate() -> None:
    if importlib.util.find_spec("buf") is not None or "buf.validate.validate_pb2" in sys.modules:
        return
    # The imports of validate.proto (descriptor, duration, field_mask,
    # timestamp) are google.protobuf's own, loaded by these imports.
    from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, field_mask_pb2, timestamp_pb2  # noqa: F401
    from google.protobuf.internal import builder
    from protovalidate._gen.buf.validate import validate_pb

    module = types.ModuleType("buf.validate.validate_pb2")
    module.DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(validate_pb.desc().proto.to_binary())  # type: ignore[attr-defined]
    builder.BuildMessageAndEnumDescriptors(module.DESCRIPTOR, module.__dict__)  # type: ignore[attr-defined]
    builder.BuildTopDescriptorsAndMessages(module.DESCRIPTOR, "buf.validate.validate_pb2", module.__dict__)  # type: ignore[attr-defined]
    for name in ("buf", "buf.validate"):
        package = types.ModuleType(name)
        package.__path__ = []
        sys.modules.setdefault(name, package)
    sys.modules["buf.validate"].validate_pb2 = module  # type: ignore[attr-defined]
    sys.modules["buf.validate.validate_pb2"] = module


_register_buf_validate()

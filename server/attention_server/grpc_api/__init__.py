"""gRPC transport: server assembly, servicers, protobuf conversion and status mapping."""

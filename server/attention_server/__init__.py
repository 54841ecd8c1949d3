"""The attention service: per-head attention of an ONNX transformer over gRPC."""

__version__ = "0.1.0"

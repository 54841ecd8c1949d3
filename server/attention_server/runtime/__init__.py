"""Model runtime: repository, tokenizer, ONNX Runtime sessions, analysis and the
engine that ties them together. Nothing here imports grpc."""

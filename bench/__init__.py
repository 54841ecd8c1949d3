"""`make bench`: the service against in-process ONNX Runtime and HF transformers."""

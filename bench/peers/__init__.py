"""The peers of `make bench` (section `peers`): KServe's Python model server and
MLServer, each in a venv of its own (`make bench-peers`), each running the
service's `model.onnx` with ONNX Runtime in the smallest custom runtime its
documentation shows, and all driven, with the service, over the Open Inference
Protocol by one tritonclient gRPC load generator (bench.oip_loadgen).

The runtimes (`session`, `kserve_runtime`, `mlserver_runtime`) are imported in
the peers' venvs, where only numpy, onnxruntime and the peer's own packages are."""

"""The two protocols' logic, transport-neutral: attention.v1 (`attention`) and the
Open Inference Protocol (`inference`), each with its one conversion module
(`converters`, `oip_codec`). The gRPC (grpc_api) and HTTP (http_api) layers are
thin adapters over them; nothing here imports grpc or an HTTP framework."""

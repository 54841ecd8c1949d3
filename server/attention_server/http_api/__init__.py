"""The HTTP/REST port: the Open Inference Protocol's REST API (oip.py), attention.v1
as JSON (v1.py) and the explorer page, an ASGI app (Starlette) served by uvicorn
in the gRPC server's process and event loop, over the same services."""

"""serve-proxy: HTTP (ASGI) and gRPC ingress, started and supervised by the controller.

Not imported by the SDK: user programs never load uvicorn or Starlette through ``import serve``.
"""

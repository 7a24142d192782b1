"""Generated code of serve's public gRPC API (``proto/api``; ``make proto``), as Ray's
``ray.serve.generated``: ``serve_pb2`` and ``serve_pb2_grpc`` with ``RayServeAPIService``."""

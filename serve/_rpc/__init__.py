"""The gRPC edge of the SDK: the only serve code that imports ``grpc`` or ``serve._proto``."""

import os

# gRPC reads these once, when it is first imported (which happens through this package).
# Its C core logs INFO lines (fork handlers, GOAWAY) to stderr unless told otherwise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# Serve processes fork only to exec (the controller launching replicas). gRPC's fork handlers
# run in that child between fork and exec and crash it now and then (SIGSEGV) while other
# threads use gRPC; nothing needs them, so they are off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

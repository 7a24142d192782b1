"""The gRPC edge of the SDK: the only serve code that imports ``grpc`` or ``serve._proto``."""

import os

# gRPC's C core logs INFO lines (fork handlers, GOAWAY) to stderr unless told otherwise; it reads
# this once, when grpc is first imported, which happens through this package.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

"""Generated protobuf and gRPC code (``make proto``); do not edit."""

import os

# gRPC's C core logs INFO lines (fork handlers, GOAWAY) to stderr unless told otherwise; it reads
# this once, when grpc is first imported, which happens through this package.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

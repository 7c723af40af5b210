"""der-sdk's benchmarks: ``python -m bench`` (see ``docs/performance.md``)."""

import os

# The benchmark process holds gRPC channels and starts child processes (the headend, raw
# servers, a second load generator). With grpcio's fork handlers on, about one child in
# four died in a segfault inside gRPC before it ran; they must be off before grpc is
# imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

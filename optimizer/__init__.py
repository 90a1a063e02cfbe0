"""optimize: the best Triton Inference Server configuration for an ONNX model, found by one Bayesian study."""

import os

# The server is started (and restarted after a crash) by fork and exec while gRPC's threads measure; gRPC's
# fork handlers then only print "Other threads are currently calling into gRPC, skipping fork() handlers".
# Nothing of ours uses gRPC in a forked child, so the handlers are not needed (set before gRPC starts).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

"""Generated gRPC modules for jblock.v1 (python -m tools.gen_protos regenerates them)."""

"""The wire protocol, jblock.v1: the .proto, its generated gRPC modules (python -m
tools.gen_protos regenerates them) and the numpy <-> Tensor codec (tensor_codec)."""

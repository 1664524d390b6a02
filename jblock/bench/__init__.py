"""The multi-tenant benchmark: block serving vs per-model serving vs transformers.

workload (seeded requests), zoo_setup (base, variants, zoo), driver (open-loop gRPC load),
server_proc / servers (one server process per mode), hf_baseline (transformers behind the
engine interface), roofline, report, and runner (the whole benchmark; tools/bench.py is its
command line).
"""

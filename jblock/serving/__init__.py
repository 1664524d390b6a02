"""The serving layer: gRPC and HTTP frontends, coordinator servicers, the worker servicer, tenants,
metrics, text."""

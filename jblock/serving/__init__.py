"""The serving layer: gRPC API, coordinator, metrics, tensor codec."""

"""Short absl-flag entry scripts: serve (all-in-one), coordinator, worker."""

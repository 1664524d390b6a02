"""Short absl-flag offline tools: convert, zoo inspection, variant maker, bench, client CLI."""

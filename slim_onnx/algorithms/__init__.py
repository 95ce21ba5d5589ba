"""Per-layer compression algorithms (quantizers, 2:4 masks, low-rank adapters)."""
